from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def kvpoll_cmd() -> list[str]:
    """The kvpoll command, run by the same interpreter as the tests."""
    return [sys.executable, "-m", "kvpoll"]


@pytest.fixture
def clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    return env
