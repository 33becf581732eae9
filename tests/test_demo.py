"""``kvpoll demo``: the README's main job, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvpoll", "demo", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_demo_with_no_arguments_passes() -> None:
    out = demo()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "demo passed" in out.stdout
    for line in (
        "WaitingForInput -> Success",
        "Transferring -> Transferring",
        "Transferring -> Failed",
        "killed the encoder",
    ):
        assert line in out.stdout
    assert "Traceback" not in out.stderr


def check_summary(summary: dict[str, Any], destinations: int) -> None:
    assert summary["ok"], summary["problems"]
    rooms = summary["rooms"]
    assert [r["expected"] for r in rooms] == ["Success", "Success", "Success", "Failed"]
    for room in rooms[:3]:
        ranks = [w for w in room["sides"] if w.startswith("lm rank")]
        assert len(ranks) == destinations
        for who in ranks:
            side = room["sides"][who]
            assert side["data_matched"] is True
            assert side["final"] == "Success"
            assert side["bytes"] == room["tokens"] * 512 * 2
            assert side["seconds"] > 0
        assert room["sides"]["encoder"]["final"] == "Success"
    assert [r["sides"]["lm rank 0"]["chunks"] for r in rooms[:3]] == [1, 2, 5]
    seq = rooms[1]["sides"]["lm rank 0"]["statuses"]
    assert seq == ["Bootstrapping", "WaitingForInput", "Transferring", "Transferring", "Success"]
    failed = rooms[3]
    assert failed["sides"]["encoder"]["final"] == "killed"
    assert all(failed["sides"][w]["final"] == "Failed" for w in failed["sides"] if w != "encoder")
    assert summary["failure_detected_after_s"] < 0.5 * 3 + 2


def _why_it_failed(out: subprocess.CompletedProcess[str]) -> str:
    """The summary's problems when the demo printed one, else the output's tails."""
    try:
        summary = json.loads(out.stdout)
    except ValueError:
        return f"no JSON summary\nstdout: {out.stdout[-3000:]}\nstderr: {out.stderr[-3000:]}"
    return (
        f"problems: {summary.get('problems')}\n"
        f"failure noticed after {summary.get('failure_detected_after_s')} s\n"
        f"stderr: {out.stderr[-2000:]}"
    )


@pytest.mark.parametrize(
    ("destinations", "options"),
    [(1, []), (2, ["--option", "shm=false"])],
    ids=["shm-1-rank", "tcp-2-ranks"],
)
def test_the_demo_json_summary(destinations: int, options: list[str]) -> None:
    out = demo("--json", "--hidden", "512", "--destinations", str(destinations), *options)
    assert out.returncode == 0, _why_it_failed(out)
    summary = json.loads(out.stdout)
    check_summary(summary, destinations)
    assert "lm rank 0" in out.stderr  # the live steps went to stderr


def test_the_demo_refuses_an_in_process_transport() -> None:
    out = demo("--transport", "loopback")
    assert out.returncode == 2
    assert "works within one process" in out.stderr


def test_the_demo_names_an_unknown_transport() -> None:
    out = demo("--transport", "smoke-signals")
    assert out.returncode == 2
    assert "unknown transport 'smoke-signals'" in out.stderr


def paged_transports() -> list[Any]:
    import os

    from kvpoll.transports import TransportUnavailable, resolve

    out: list[Any] = [
        pytest.param(["--option", "shm=true"], id="zmq-shm"),
        pytest.param(["--option", "shm=false"], id="zmq-tcp"),
    ]
    for name in ("ucx", "nixl", "mooncake"):
        try:
            resolve(name)
            out.append(pytest.param(["--transport", name], id=name))
        except TransportUnavailable as exc:
            if os.environ.get("CI_REQUIRE_ENGINES") == "1":
                raise
            out.append(pytest.param([], id=name, marks=pytest.mark.skip(reason=str(exc))))
    return out


def check_paged(summary: dict[str, Any], destinations: int, tokens: list[int]) -> None:
    assert summary["ok"], summary["problems"]
    rooms = summary["rooms"]
    assert summary["settings"]["paged"] is True
    assert [r["tokens"] for r in rooms[:-1]] == tokens
    for room in rooms[:-1]:
        for who in (f"lm rank {r}" for r in range(destinations)):
            side = room["sides"][who]
            assert side["data_matched"] is True  # both buffers and the aux row
            assert side["final"] == "Success"
            row_bytes = 256 * 2 + 3 * 4  # embeddings and positions
            assert side["bytes"] == room["tokens"] * row_bytes + 4 * 8  # and the aux row
            assert "WaitingForInput" in side["statuses"]
    failed = rooms[-1]
    assert failed["sides"]["encoder"]["final"] == "killed"
    assert all(failed["sides"][w]["final"] == "Failed" for w in failed["sides"] if w != "encoder")


@pytest.mark.slow
@pytest.mark.parametrize("transport", paged_transports())
def test_the_paged_demo_over_every_transport(transport: list[str]) -> None:
    out = demo("--paged", "--json", "--hidden", "256", *transport)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    summary = json.loads(out.stdout)
    check_paged(summary, 1, [500, 2000, 5000])
    rooms = summary["rooms"]
    # 500 tokens fit the 1024 offered: one step; 2000 and 5000 need resumes
    assert rooms[0]["sides"]["lm rank 0"]["statuses"] == [
        "Bootstrapping",
        "WaitingForInput",
        "Success",
    ]
    assert rooms[1]["sides"]["lm rank 0"]["events"].count("resumed") == 1
    assert rooms[2]["sides"]["lm rank 0"]["events"].count("resumed") == 4


@pytest.mark.slow
@pytest.mark.parametrize("transport", paged_transports())
def test_the_paged_demo_with_two_ranks_and_small_memory(transport: list[str]) -> None:
    out = demo(
        "--paged",
        "--json",
        "--hidden",
        "256",
        "--tokens",
        "3000",
        "--capacity",
        "512",
        "--destinations",
        "2",
        *transport,
    )
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    summary = json.loads(out.stdout)
    check_paged(summary, 2, [3000])
    assert summary["rooms"][0]["scenario"] == "6 chunks, 5 resumes"  # follows --tokens/--capacity
    for who in ("lm rank 0", "lm rank 1"):
        assert summary["rooms"][0]["sides"][who]["events"].count("resumed") == 5
