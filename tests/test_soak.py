"""``kvpoll soak``: real processes, kills and hostile traffic; nothing lost or leaked."""

from __future__ import annotations

import json
import subprocess


def test_a_short_soak_loses_and_leaks_nothing(
    kvpoll_cmd: list[str], clean_env: dict[str, str]
) -> None:
    run = subprocess.run(
        [*kvpoll_cmd, "soak", "--minutes", "0.3", "--kill-every", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
        env=clean_env,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert report["ok"] is True
    assert report["lost"] == []
    assert report["leaks"] == []
    assert report["kills"] >= 2
    assert report["delivered"] > 100
    assert report["interrupted"] >= 1  # a kill caught rooms in flight, and they ended
    assert max(report["fail_after_kill_s"]) < 10  # the survivor failed them, no hang
    assert report["injected"]["malformed frames"] > 1000
    assert report["injected"]["forged bootstraps"] > 50


def test_soak_refuses_a_bad_duration(kvpoll_cmd: list[str], clean_env: dict[str, str]) -> None:
    run = subprocess.run(
        [*kvpoll_cmd, "soak", "--minutes", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env,
        check=False,
    )
    assert run.returncode == 2
    assert "--minutes must be positive" in run.stderr
