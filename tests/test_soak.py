"""``kvpoll soak``: real processes, kills and hostile traffic; nothing lost or leaked."""

from __future__ import annotations

import json
import subprocess


def test_a_short_soak_loses_and_leaks_nothing(
    kvpoll_cmd: list[str], clean_env: dict[str, str]
) -> None:
    run = subprocess.run(
        [*kvpoll_cmd, "soak", "--minutes", "0.15", "--kill-every", "1.5", "--json"],
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
    assert report["delivered"] > 50
    # rooms a kill caught in flight ended at the sender (heartbeats, or the bootstrap
    # time-out for those the killed receiver had not bootstrapped yet), none hung
    assert max(report["fail_after_kill_s"], default=0) < 10
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
