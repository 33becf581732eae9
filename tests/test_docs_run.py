"""The Python examples of the pages this test names run as written (each block in
a fresh interpreter), so they cannot drift from the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    "README.md",
    "docs/memory.md",
    "docs/transfers.md",
    "docs/transports.md",
    "docs/transports/third-party.md",
]


def blocks() -> list[object]:
    out: list[object] = []
    for page in PAGES:
        text = (ROOT / page).read_text()
        found = re.findall(r"```python\n(.*?)```", text, re.S)
        assert found, f"{page} has no Python example"
        out.extend(pytest.param(code, id=f"{page}:{i}") for i, code in enumerate(found))
    return out


@pytest.mark.parametrize("code", blocks())
def test_the_example_runs(code: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
