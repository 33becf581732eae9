"""The kvpoll command, run as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from kvpoll.statemachine.diagram import mermaid
from tests.helpers import need_transport


def run(cmd: list[str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cmd, *args], input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


def test_help_lists_the_commands(kvpoll_cmd: list[str]) -> None:
    out = run(kvpoll_cmd, "--help")
    assert out.returncode == 0
    for command in ("demo", "diagram", "check-trace", "conformance", "bench"):
        assert command in out.stdout
    assert run(kvpoll_cmd).returncode == 2
    assert "kvpoll 0.1.0" in run(kvpoll_cmd, "--version").stdout
    bad = run(kvpoll_cmd, "no-such-command")
    assert bad.returncode == 2
    assert "invalid choice" in bad.stderr


def test_walkthrough_prints_each_transition(kvpoll_cmd: list[str]) -> None:
    out = run(kvpoll_cmd, "walkthrough")
    assert out.returncode == 0, out.stderr
    assert "WaitingForInput -> Success" in out.stdout
    assert "Transferring -> Transferring" in out.stdout
    assert "rejected: room 5: cannot handle event resumed(sent_tokens=0)" in out.stdout


def test_diagram(kvpoll_cmd: list[str]) -> None:
    out = run(kvpoll_cmd, "diagram")
    assert out.returncode == 0
    assert out.stdout == mermaid()
    fenced = run(kvpoll_cmd, "diagram", "--markdown").stdout
    assert fenced.startswith("```mermaid\n")
    assert fenced.endswith("```\n")


GOOD: list[dict[str, object]] = [
    {"room": 1, "status": "Bootstrapping"},
    {"room": 2, "status": "Bootstrapping"},
    {"room": 1, "status": "WaitingForInput", "sent_tokens": 0},
    {"room": 1, "status": "WaitingForInput"},
    {"room": 1, "status": "Transferring", "sent_tokens": 1024},
    {"room": 2, "status": 1},
    {"room": 1, "status": "Transferring", "sent_tokens": 2048},
    {"room": 1, "status": "Success", "sent_tokens": 2500},
]


def lines(records: list[dict[str, object]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_check_trace_accepts_a_good_log(kvpoll_cmd: list[str], tmp_path: Path) -> None:
    log = tmp_path / "good.jsonl"
    log.write_text(lines(GOOD))
    out = run(kvpoll_cmd, "check-trace", str(log))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == ""
    assert "8 lines, 2 rooms: 0 violations" in out.stderr


def test_check_trace_reports_each_violation(kvpoll_cmd: list[str]) -> None:
    bad = [
        *GOOD[:5],
        {"room": 1, "status": "WaitingForInput"},  # line 6: reset on resume
        {"room": 2, "status": "Success"},  # line 7: Bootstrapping -> Success
        {"room": 1, "status": "Success", "sent_tokens": 10},  # line 8: rewind
        {"room": 1, "status": "Failed"},
    ]  # line 9: leaves a final state
    out = run(kvpoll_cmd, "check-trace", "-", stdin=lines(bad))
    assert out.returncode == 1
    report = out.stdout.splitlines()
    assert report[0].startswith("line 6: room 1: Transferring -> WaitingForInput: ")
    assert "only moves forward" in report[0]
    assert report[1] == (
        "line 7: room 2: Bootstrapping -> Success: no legal event moves Bootstrapping to Success"
    )
    assert report[2].startswith("line 8: room 1: WaitingForInput -> Success: sent_tokens went back")
    assert report[3] == "line 9: room 1: Success -> Failed: Success is final and nothing leaves it"
    assert len(report) == 4


def test_check_trace_allow_skips(kvpoll_cmd: list[str]) -> None:
    sampled = [{"room": 1, "status": "Bootstrapping"}, {"room": 1, "status": "Success"}]
    assert run(kvpoll_cmd, "check-trace", "-", stdin=lines(sampled)).returncode == 1
    assert (
        run(kvpoll_cmd, "check-trace", "--allow-skips", "-", stdin=lines(sampled)).returncode == 0
    )


def test_check_trace_sglang_codes(kvpoll_cmd: list[str]) -> None:
    # SGLang: Failed=0, Bootstrapping=1, WaitingForInput=2, Transferring=3, Success=4
    log = lines(
        [
            {"room": 9, "status": 1},
            {"room": 9, "status": 2},
            {"room": 9, "status": 3},
            {"room": 9, "status": 0},
        ]
    )
    assert run(kvpoll_cmd, "check-trace", "--codes", "sglang", "-", stdin=log).returncode == 0
    # the same numbers read as kvpoll's codes: 3 (Success) -> 0 (Bootstrapping)
    out = run(kvpoll_cmd, "check-trace", "-", stdin=log)
    assert out.returncode == 1
    assert "Success -> Bootstrapping" in out.stdout


def test_check_trace_bad_lines_never_traceback(kvpoll_cmd: list[str]) -> None:
    log = (
        "\n".join(
            [
                '{"room": 1, "status": "Bootstrapping"}',
                "not json",
                "[1, 2]",
                '{"room": "x", "status": 1}',
                '{"room": 1, "status": "Nope"}',
                '{"room": 1, "status": 17}',
                '{"room": 1, "status": 1, "sent_tokens": -4}',
                '{"room": 1, "status": "WaitingForInput"}',
            ]
        )
        + "\n"
    )
    out = run(kvpoll_cmd, "check-trace", "-", stdin=log)
    assert out.returncode == 1
    assert "Traceback" not in out.stdout + out.stderr
    malformed = [line for line in out.stdout.splitlines() if "malformed" in line]
    assert [m.split(":")[0] for m in malformed] == [f"line {n}" for n in range(2, 8)]
    assert "1 violations" not in out.stderr  # line 8 is a legal step


def test_check_trace_json_output(kvpoll_cmd: list[str]) -> None:
    log = lines(
        [
            {"room": 3, "status": "WaitingForInput"},
            {"room": 3, "status": "Transferring"},
            {"room": 3, "status": "WaitingForInput"},
        ]
    )
    out = run(kvpoll_cmd, "check-trace", "--json", "-", stdin=log)
    finding = json.loads(out.stdout)
    assert finding["line"] == 3
    assert (finding["room"], finding["from"], finding["to"]) == (
        3,
        "Transferring",
        "WaitingForInput",
    )


def test_check_trace_missing_file(kvpoll_cmd: list[str], tmp_path: Path) -> None:
    out = run(kvpoll_cmd, "check-trace", str(tmp_path / "absent.jsonl"))
    assert out.returncode == 2
    assert "cannot read" in out.stderr
    assert "Traceback" not in out.stderr


def test_conformance_command(kvpoll_cmd: list[str]) -> None:
    out = run(kvpoll_cmd, "conformance")
    assert out.returncode == 0, out.stdout
    assert "kvpoll: 52 passed, 0 failed, 0 unsupported" in out.stdout
    ref = run(kvpoll_cmd, "conformance", "--implementation", "transitions")
    assert ref.returncode == 0
    assert "0 failed" in ref.stdout
    bad = run(kvpoll_cmd, "conformance", "--implementation", "nope")
    assert bad.returncode == 2
    assert "unknown implementation" in bad.stderr


@pytest.mark.slow
def test_bench_statemachine_json(kvpoll_cmd: list[str]) -> None:
    out = run(
        kvpoll_cmd,
        "bench",
        "statemachine",
        "--repeat",
        "1",
        "--rooms",
        "2000",
        "--transitions-rooms",
        "500",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    figures = result["figures"]
    for key in (
        "kvpoll_walk_ns",  # the default settings (history kept)
        "transitions_walk_ns",
        "kvpoll_vs_dict_walk",
        "transitions_vs_kvpoll_walk",
        "dict_ns",
        "kvpoll_ns",
        "transitions_ns",
        "bytes_per_room",
        "kvpoll_vs_dict_step",
        "transitions_vs_kvpoll_add",
    ):
        assert figures[key]["median"] > 0
        assert figures[key]["min"] <= figures[key]["median"] <= figures[key]["max"]
    assert set(result["met"]) == set(result["targets"])


@pytest.mark.slow
def test_bench_transfer_json(kvpoll_cmd: list[str]) -> None:
    out = run(
        kvpoll_cmd,
        *("bench", "transfer", "--sizes", "1", "--repeat", "2", "--warm-up", "3"),
        *("--rooms", "50", "--json"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["warm_up_rounds"] == 3
    for path in ("zmq-shm", "zmq-tcp"):  # round trips timed between the path's rooms too
        room = result["latency_us"][path]
        assert room["samples"] == 200
        assert 0 < room["rtt_p50_us"] <= room["rtt_p99_us"]
    assert result["latency_us"]["pyzmq-rtt"]["p50_us"] > 0
    for path in ("copy", "pyzmq", "zmq-shm", "zmq-tcp"):
        fig = result["gib_per_s"][path]["1 MiB"]
        assert fig["min"] <= fig["median"] <= fig["max"]
        assert fig["median"] > 0
    assert set(result["ratios"]) == {"zmq-shm/copy", "zmq-tcp/pyzmq", "zmq-shm/pyzmq"}
    for path in ("zmq-shm", "zmq-tcp"):
        rooms = result["concurrent_rooms"][path]
        assert rooms["succeeded"] == rooms["cold_succeeded"] == 50
        assert rooms["rooms_per_s"] > 0
        assert rooms["cold_rooms_per_s"] > 0


@pytest.mark.slow
def test_bench_transfer_every_transport_with_its_raw_engine_and_a_plot(
    kvpoll_cmd: list[str], tmp_path: Path
) -> None:
    for name in ("ucx", "nixl", "mooncake"):
        need_transport(name)
    png = tmp_path / "transfer.png"
    out = run(
        kvpoll_cmd,
        *("bench", "transfer", "--transport", "all", "--sizes", "1", "--repeat", "1"),
        *("--rooms", "20", "--json", "--plot", str(png)),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    paths = ["zmq-shm", "zmq-tcp", "ucx", "nixl", "mooncake"]
    raws = ["raw-ucxx", "raw-nixl", "raw-mooncake"]
    for name in [*paths, *(f"{p}.write" for p in paths), *raws]:
        assert result["gib_per_s"][name]["1 MiB"]["median"] > 0, name
    for path, raw in zip(["ucx", "nixl", "mooncake"], raws, strict=True):
        assert f"{path}/{raw}" in result["ratios"]
        assert f"{path}.write/{raw}" in result["ratios"]
        assert result["concurrent_rooms"][path]["succeeded"] == 20
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_transfer_paged_beside_each_engines_batch_call(kvpoll_cmd: list[str]) -> None:
    from kvpoll.transports import TransportUnavailable, resolve

    transports = ["zmq"]
    for name in ("ucx", "nixl", "mooncake"):
        try:
            resolve(name)
            transports.append(name)
        except TransportUnavailable as exc:
            if os.environ.get("CI_REQUIRE_ENGINES") == "1":
                pytest.fail(str(exc))
    args = [a for t in transports for a in ("--transport", t)]
    out = run(
        kvpoll_cmd,
        "bench",
        "transfer",
        "--paged",
        *args,
        "--repeat",
        "1",
        "--warm-up",
        "2",
        "--json",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["warm_up_rounds"] == 2
    assert result["layout"]["layers"] == 16
    assert result["layout"]["page_size"] == 16
    assert result["layout"]["tokens"] == 4096
    assert result["ranges_per_destination"] > 32  # scattered pages: many ranges per room
    raws = {"zmq-shm": "copy-loop", "ucx": "raw-ucxx", "nixl": "raw-nixl"}
    raws["mooncake"] = "raw-mooncake"
    for path, raw in raws.items():
        if path.split("-")[0] in transports:
            assert result["gib_per_s"][path]["median"] > 0, path
            assert result["gib_per_s"][raw]["median"] > 0, raw
            assert f"{path}/{raw}" in result["ratios"]


def test_bench_transfer_refuses_an_unknown_transport(kvpoll_cmd: list[str]) -> None:
    out = run(kvpoll_cmd, "bench", "transfer", "--transport", "carrier-pigeon")
    assert out.returncode == 2
    assert "carrier-pigeon" in out.stderr


def test_option_values_read_like_variables() -> None:
    from kvpoll.cli import _options

    assert _options(['ucx={ TLS = "tcp" }', "shm=false", "port=0", "host=10.0.0.5"]) == {
        "ucx": {"TLS": "tcp"},
        "shm": False,
        "port": 0,
        "host": "10.0.0.5",
    }


def test_check_trace_starts_every_room_in_bootstrapping(kvpoll_cmd: list[str]) -> None:
    log = lines([{"room": 1, "status": "Success"}, {"room": 2, "status": "WaitingForInput"}])
    out = run(kvpoll_cmd, "check-trace", "-", stdin=log)
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        "line 1: room 1: Bootstrapping -> Success: no legal event moves Bootstrapping to Success"
    ]
    assert out.stderr.strip() == "2 lines, 2 rooms: 1 violation, 0 malformed lines"
    skipping = run(kvpoll_cmd, "check-trace", "--allow-skips", "-", stdin=log)
    assert skipping.returncode == 0, skipping.stdout  # a sampled log may skip steps


def test_check_trace_refuses_an_empty_log(kvpoll_cmd: list[str]) -> None:
    for text in ("", "\n\n"):
        out = run(kvpoll_cmd, "check-trace", "-", stdin=text)
        assert out.returncode == 1
        assert "nothing to audit" in out.stdout


def test_check_trace_into_a_closed_pipe_ends_quietly(kvpoll_cmd: list[str]) -> None:
    import subprocess

    log = lines([{"room": r, "status": "Success"} for r in range(20000)])
    shell = subprocess.run(
        ["bash", "-c", f"{' '.join(kvpoll_cmd)} check-trace - | head -2"],
        input=log,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert len(shell.stdout.splitlines()) == 2
    assert "Traceback" not in shell.stderr
    assert "BrokenPipe" not in shell.stderr


def test_an_internal_error_has_its_own_exit_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kvpoll.cli as cli

    def broken(args: object) -> int:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "_cmd_diagram", broken)
    assert cli.main(["diagram"]) == cli.EXIT_INTERNAL == 3
    err = capsys.readouterr().err
    assert "ZeroDivisionError: a bug" in err
    assert "internal error" in err


def test_implementation_modules_load_from_the_current_directory(
    kvpoll_cmd: list[str], tmp_path: Path
) -> None:
    (tmp_path / "myimpl.py").write_text(
        "from kvpoll.testing import KvpollImplementation\n"
        "def make():\n    return KvpollImplementation()\n"
    )
    import subprocess

    out = subprocess.run(
        [*kvpoll_cmd, "conformance", "--implementation", "myimpl:make"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    missing = subprocess.run(
        [*kvpoll_cmd, "conformance", "--implementation", "nomodule:make"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert missing.returncode == 2
    assert "PYTHONPATH" in missing.stderr


def test_walkthrough_titles_follow_tokens_and_capacity(kvpoll_cmd: list[str]) -> None:
    out = run(kvpoll_cmd, "walkthrough", "--capacity", "300", "--tokens", "250", "700")
    assert out.returncode == 0
    titles = [line for line in out.stdout.splitlines() if line.startswith("scenario")]
    assert titles[:2] == [
        "scenario 1: 250 tokens, one chunk (buffer 300 tokens)",
        "scenario 2: 700 tokens, 3 chunks, 2 resumes (buffer 300 tokens)",
    ]
    assert "seed" not in out.stdout


def test_warm_up_runs_its_rounds_or_stops_at_its_time_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kvpoll.bench import stats

    calls: list[float] = []
    assert stats.warm_up(lambda: calls.append(0.0), 7) == 7
    assert len(calls) == 7
    # a slow measurement: at least two rounds, then no new one once the budget is spent
    monkeypatch.setattr(stats, "WARM_UP_SECONDS", 0.05)
    slow: list[int] = []

    def measure() -> None:
        slow.append(1)
        time.sleep(0.04)

    assert stats.warm_up(measure, 10) == 2
    assert len(slow) == 2


def test_bench_refuses_a_warm_up_of_no_rounds(kvpoll_cmd: list[str]) -> None:
    out = run(kvpoll_cmd, "bench", "transfer", "--warm-up", "0")
    assert out.returncode == 2
    assert "--warm-up" in out.stderr


def test_the_transfer_plot_draws_only_what_was_measured(tmp_path: Path) -> None:
    from kvpoll.bench.stats import Figure
    from kvpoll.bench.transfer import MiB, TransferBench, plot

    fig = Figure(2.0, 1.5, 2.5, (1.5, 2.0, 2.5))
    # a ucx-only run: no copy or pyzmq baseline was measured (it crashed with KeyError 'copy')
    names = ["ucx", "ucx.write", "raw-ucxx"]
    result = TransferBench(
        repeats=3, sizes=[MiB], paths=["ucx"], figures={n: {"1 MiB": fig} for n in names}
    )
    out = tmp_path / "x.png"
    plot(result, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
