"""The built wheel carries spec/, so the runner works from an installed package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_carries_the_spec_and_the_runner_works_from_it(tmp_path: Path) -> None:
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("kvpoll-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "kvpoll/spec/transitions.json" in names
    assert "kvpoll/spec/case-schema.json" in names
    assert any(n.startswith("kvpoll/spec/cases/") and n.endswith(".json") for n in names)
    assert "kvpoll/py.typed" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # Run from the unpacked wheel only: the checkout's src/ must not be importable.
    probe = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            "import sys; sys.path[:0] = [sys.argv[1]]; "
            "import kvpoll, kvpoll.testing as t; "
            "assert kvpoll.__file__.startswith(sys.argv[1]), kvpoll.__file__; "
            "r = t.run_cases(t.KvpollImplementation(), t.load_cases()); "
            "print(sum(x.passed for x in r), len(r))",
            str(site),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": ":".join(p for p in sys.path if "site-packages" in p),
        },
    )
    assert probe.returncode == 0, probe.stderr
    passed, total = map(int, probe.stdout.split())
    assert passed == total >= 40
