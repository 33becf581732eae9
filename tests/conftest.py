from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


FAST: dict[str, Any] = {"heartbeat_interval": 0.2, "heartbeat_misses": 8}
"""Endpoint options that notice a dead peer within 1.6 s. (Three misses, 0.6 s,
declared live peers dead when a clean-clone CI ran 2.5x slower than usual: a
thousand rooms in one I/O turn kept heartbeats waiting past 0.7 s.)"""


@pytest.fixture
def spawn() -> Iterator[Any]:
    """(context, start): ``start(target, *args)`` runs a daemon process, killed after."""
    ctx = mp.get_context("spawn")
    procs: list[Any] = []

    def start(target: Any, *args: Any) -> Any:
        proc = ctx.Process(target=target, args=args, daemon=True)
        proc.start()
        procs.append(proc)
        return proc

    yield ctx, start
    for proc in procs:
        proc.kill()
        proc.join(10)


@pytest.fixture(params=[True, False], ids=["shm", "tcp"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any]]:
    """A zmq Sender and Receiver, over shared memory and over TCP."""
    from kvpoll import Receiver, Sender

    options = {"shm": request.param}
    tx = Sender("zmq", transport_options=options, **FAST)
    rx = Receiver("zmq", transport_options=options, **FAST)
    yield tx, rx
    tx.close()
    rx.close()


@pytest.fixture
def secret(tmp_path: Path) -> str:
    """A cluster secret file (mode 0600) for endpoints that must authenticate."""
    path = tmp_path / "secret"
    path.write_bytes(os.urandom(32).hex().encode())
    path.chmod(0o600)
    return str(path)
