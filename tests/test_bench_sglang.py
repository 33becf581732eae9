"""``kvpoll bench sglang``: SGLang's classes in two processes, kvpoll beside SGLang's
own backends; a small run of the real command, and its rules."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from typing import Any

import pytest

from kvpoll.bench.sglang_load import BACKENDS, BASELINES, Outcome, SglangResult, walk_ok
from kvpoll.bench.sglang_peer import Plan
from kvpoll.cli import BACKEND_NAMES

SMALL = (
    *("--repeat", "1", "--requests", "24", "--pages", "6", "--latency-requests", "5"),
    *("--bulk-pages", "32", "--deadline", "60", "--json"),
)


def _sglang() -> None:
    if importlib.util.find_spec("sglang") is None:  # its import needs the CPU stand-ins
        if os.environ.get("CI_REQUIRE_ENGINES"):
            pytest.fail("SGLang is required here (make test's set-up installs it)")
        pytest.skip("SGLang is not installed (make test's set-up installs it)")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kvpoll_and_sglangs_own_backends_side_by_side(kvpoll_cmd: list[str]) -> None:
    """kvpoll (over zmq) beside SGLang's mooncake and nixl backends:
    every request completes on both sides with the same status, every page and aux
    row is right, every walk moves forward, the killed prefill's request fails on
    the decode, and each figure comes with ratios against SGLang's backends."""
    _sglang()
    backends = ["kvpoll-zmq-tcp", "sglang-mooncake", "sglang-nixl"]
    args = [arg for b in backends for arg in ("--backend", b)]
    out = subprocess.run(
        [*kvpoll_cmd, "bench", "sglang", *args, *SMALL],
        capture_output=True,
        text=True,
        timeout=580,
        check=False,
    )
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    result = json.loads(out.stdout)
    assert result["problems"] == []
    assert result["backends"] == backends
    for run in result["runs"]:
        assert run["error"] is None, run
        assert run["requests"] == run["completed"] == 24 + 5 + 1
        assert run["disagreements"] == run["wrong_pages"] == run["bad_walks"] == 0
        assert run["requests_per_s"] > 0
        assert 0 < run["latency_p50_ms"] <= run["latency_p99_ms"]
        assert run["bulk_gbps"] > 0
        assert run["kill_seconds"] is not None
        assert 0 < run["kill_seconds"] < 30
    ratios = result["ratios"]["kvpoll-zmq-tcp"]
    assert set(ratios) == {"sglang-mooncake", "sglang-nixl"}
    assert ratios["sglang-nixl"]["requests_per_s"]["median"] > 0
    assert result["page_bytes"] == 16 * 1024


def test_bench_sglang_refuses_a_backend_it_does_not_know(kvpoll_cmd: list[str]) -> None:
    out = subprocess.run(
        [*kvpoll_cmd, "bench", "sglang", "--backend", "carrier-pigeon"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "invalid choice" in out.stderr


def test_the_names_the_command_takes_are_the_backends_it_runs() -> None:
    assert tuple(BACKENDS) == BACKEND_NAMES
    assert set(BASELINES) <= set(BACKENDS)


def test_a_walk_moves_forward_only() -> None:
    assert walk_ok([1, 2, 3, 4])
    assert walk_ok([1, 2, 4])
    assert walk_ok([2, 3, 0])  # Failed from any unfinished status
    assert walk_ok([4])
    assert not walk_ok([1, 3, 2])  # the reset on resume
    assert not walk_ok([2, 4, 3])  # out of Success
    assert not walk_ok([1, 0, 2])  # out of Failed


def test_disagreements_and_wrong_pages_are_problems() -> None:
    plan = Plan("kvpoll", 0, 2, 64, 2, 2, 1, 4, 2, kill=False)
    good = Outcome("kvpoll-zmq-shm", requests=4, completed=4, load_seconds=1.0)
    bad = Outcome("sglang-nixl", requests=4, completed=3, disagreements=1, wrong_pages=2)
    result = SglangResult(plan, ["kvpoll-zmq-shm", "sglang-nixl"], [good, bad])
    problems = result.problems()
    assert any("1 disagreements" in p for p in problems)
    assert any("2 wrong pages" in p for p in problems)
    assert any("3 of 4 requests completed" in p for p in problems)
    assert not any(p.startswith("kvpoll") for p in problems)
    report: Any = result.to_json()
    assert report["figures"]["kvpoll-zmq-shm"]["requests_per_s"]["median"] == 4.0
