"""``kvpoll bench sglang``: kvpoll under SGLang's own classes, beside SGLang's backends.

Each run starts a prefill and a decode rank (:mod:`kvpoll.bench.sglang_peer`,
two real processes) for one backend and drives SGLang 0.5.23's classes in the
scheduler's order. The backends: kvpoll over each of its transports, and
SGLang's own ``mooncake`` (its TCP protocol) and ``nixl`` (DRAM memory kinds,
UCX on loopback), on the same work, alternated repeat by repeat (the order
rotates, so no backend always runs first or last on a warming machine).

Per run: one-page latency (p50/p99 from the prefill's ``send`` to the decode's
Success), requests/s with every request in flight at once (pages scattered
on both sides), GB/s of one large request sent in chunks, and seconds from
killing the prefill mid-transfer to Failed on the decode. Every page landed
is compared with the prefill's bytes, every aux row checked, every status
walk checked against the table's order, and both sides' final statuses
compared request by request.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvpoll.bench.sglang_peer import Plan
from kvpoll.bench.stats import Figure, figure, ratio

__all__ = ["BACKENDS", "BASELINES", "Outcome", "SglangResult", "available", "run"]

BACKENDS: dict[str, tuple[str, dict[str, str]]] = {
    "kvpoll-zmq-shm": ("kvpoll", {"KVPOLL_TRANSPORT": "zmq", "KVPOLL_ZMQ_SHM": "true"}),
    "kvpoll-zmq-tcp": ("kvpoll", {"KVPOLL_TRANSPORT": "zmq", "KVPOLL_ZMQ_SHM": "false"}),
    "kvpoll-ucx": ("kvpoll", {"KVPOLL_TRANSPORT": "ucx"}),
    "kvpoll-nixl": ("kvpoll", {"KVPOLL_TRANSPORT": "nixl"}),
    "kvpoll-mooncake": ("kvpoll", {"KVPOLL_TRANSPORT": "mooncake"}),
    "sglang-mooncake": ("mooncake", {"MOONCAKE_PROTOCOL": "tcp", "MC_FORCE_TCP": "1"}),
    "sglang-nixl": ("nixl", {"UCX_NET_DEVICES": "lo", "UCX_MODULES": "^efa"}),
}
"""Each backend: (SGLang's backend name, the environment of both ranks)."""

BASELINES = ("sglang-mooncake", "sglang-nixl")
"""The backends every figure is also given as a ratio against (same repeat)."""

_NEEDS = {
    "kvpoll-ucx": "ucxx",
    "kvpoll-nixl": "nixl_cu12",
    "kvpoll-mooncake": "mooncake.engine",
    "sglang-mooncake": "mooncake.engine",
    "sglang-nixl": "nixl",
}
_FAILED, _SUCCESS = 0, 4


def available(names: Sequence[str] | None = None) -> list[str]:
    """The backends that can run here (SGLang and each one's engine importable)."""
    import importlib.util

    if importlib.util.find_spec("sglang") is None:
        return []
    wanted = list(names) if names else list(BACKENDS)
    out = []
    for name in wanted:
        module = _NEEDS.get(name)
        try:
            found = module is None or importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing
            found = False
        if found:
            out.append(name)
    return out


@dataclass
class Outcome:
    """One run of one backend: what both ranks reported, reduced."""

    backend: str
    latency_ms: list[float] = field(default_factory=list)
    load_seconds: float | None = None
    requests: int = 0
    completed: int = 0  # Success on both sides
    disagreements: int = 0  # the two sides' final statuses differ
    wrong_pages: int = 0  # pages (or aux rows) that differ from the prefill's
    bad_walks: int = 0  # status walks that step backwards or leave a final status
    unfinished: int = 0  # requests not final on some side when the phase ended
    bulk_gbps: float | None = None
    kill_seconds: float | None = None
    failures: list[str] = field(default_factory=list)  # a few reasons, for the report
    error: str | None = None  # the run itself broke (a rank crashed or hung)

    @property
    def requests_per_s(self) -> float | None:
        return self.requests / self.load_seconds if self.load_seconds else None

    @property
    def latency_p50(self) -> float | None:
        return _percentile(self.latency_ms, 50)

    @property
    def latency_p99(self) -> float | None:
        return _percentile(self.latency_ms, 99)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            requests_per_s=self.requests_per_s,
            latency_p50_ms=self.latency_p50,
            latency_p99_ms=self.latency_p99,
        )
        return data


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    at = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[at]


def walk_ok(walk: Sequence[int]) -> bool:
    """Whether polled statuses (SGLang's codes, Failed 0 .. Success 4) only moved
    forward: each change goes up, or to Failed, and nothing follows a final one."""
    for before, after in itertools.pairwise(walk):
        if before in (_FAILED, _SUCCESS) or not (after > before or after == _FAILED):
            return False
    return True


@dataclass
class SglangResult:
    """Every run, and the figures of each backend over its repeats."""

    plan: Plan
    backends: list[str]
    runs: list[Outcome]

    def of(self, backend: str) -> list[Outcome]:
        return [o for o in self.runs if o.backend == backend]

    def figures(self, backend: str) -> dict[str, Figure | None]:
        runs = [o for o in self.of(backend) if o.error is None]

        def fig(values: list[float | None]) -> Figure | None:
            got = [v for v in values if v is not None]
            return figure(got) if got else None

        return {
            "latency_p50_ms": fig([o.latency_p50 for o in runs]),
            "latency_p99_ms": fig([o.latency_p99 for o in runs]),
            "requests_per_s": fig([o.requests_per_s for o in runs]),
            "bulk_gbps": fig([o.bulk_gbps for o in runs]),
            "kill_seconds": fig([o.kill_seconds for o in runs]),
        }

    def ratios(self, backend: str, baseline: str, key: str) -> Figure | None:
        """Per-repeat ratios of ``key`` (a figure above) against ``baseline``."""
        pairs = []
        for mine, theirs in zip(self.of(backend), self.of(baseline), strict=False):
            a, b = _value(mine, key), _value(theirs, key)
            if a is not None and b:
                pairs.append((a, b))
        if not pairs:
            return None
        return ratio([a for a, _ in pairs], [b for _, b in pairs])

    def problems(self) -> list[str]:
        """What must be zero: crashed runs, unfinished, disagreeing or wrong requests,
        backward walks, a kill not seen as Failed."""
        found = []
        for o in self.runs:
            if o.error:
                found.append(f"{o.backend}: {o.error}")
            for what in ("unfinished", "disagreements", "wrong_pages", "bad_walks"):
                if getattr(o, what):
                    found.append(f"{o.backend}: {getattr(o, what)} {what.replace('_', ' ')}")
            if o.completed < o.requests:
                found.append(f"{o.backend}: {o.completed} of {o.requests} requests completed")
            if self.plan.kill and o.error is None and o.kill_seconds is None:
                found.append(f"{o.backend}: the killed prefill's request never failed")
        return found

    def to_json(self) -> dict[str, Any]:
        return {
            "plan": asdict(self.plan),
            "page_bytes": self.plan.page_bytes,
            "backends": self.backends,
            "runs": [o.to_json() for o in self.runs],
            "figures": {
                b: {k: (f.to_json() if f else None) for k, f in self.figures(b).items()}
                for b in self.backends
            },
            "ratios": {
                b: {
                    base: {
                        k: (r.to_json() if (r := self.ratios(b, base, k)) else None)
                        for k in ("latency_p50_ms", "requests_per_s", "bulk_gbps")
                    }
                    for base in BASELINES
                    if base in self.backends and base != b
                }
                for b in self.backends
            },
            "problems": self.problems(),
        }

    def report(self) -> str:
        plan = self.plan
        lines = [
            f"SGLang 0.5.23's classes, prefill and decode in two processes; "
            f"{len(self.runs) // max(1, len(self.backends))} repeat(s), backends alternated; "
            f"pages of {plan.page_bytes // 1024} KiB ({plan.layers} layers, K and V)",
            f"load: {plan.requests} requests x {plan.pages} scattered pages in flight; "
            f"latency: {plan.latency} one-page requests; bulk: {plan.bulk_pages} pages in "
            f"{plan.bulk_chunks} chunks; medians [min-max] over repeats",
            "",
            f"{'backend':<17} {'done':>9} {'req/s':>22} {'lat p50 ms':>20} "
            f"{'lat p99 ms':>20} {'bulk GB/s':>18} {'kill->Failed s':>18} "
            f"{'disagree':>8} {'wrong':>5} {'walks':>5}",
        ]
        for b in self.backends:
            f = self.figures(b)
            runs = self.of(b)
            done = f"{sum(o.completed for o in runs)}/{sum(o.requests for o in runs)}"
            lines.append(
                f"{b:<17} {done:>9} {_show(f['requests_per_s'], 1):>22} "
                f"{_show(f['latency_p50_ms'], 2):>20} {_show(f['latency_p99_ms'], 2):>20} "
                f"{_show(f['bulk_gbps'], 2):>18} {_show(f['kill_seconds'], 2):>18} "
                f"{sum(o.disagreements for o in runs):>8} "
                f"{sum(o.wrong_pages for o in runs):>5} {sum(o.bad_walks for o in runs):>5}"
            )
        for base in BASELINES:
            if base not in self.backends:
                continue
            lines += [
                "",
                f"ratios against {base} (same repeat; higher is better for req/s "
                "and GB/s, lower for latency):",
            ]
            for b in self.backends:
                if b == base:
                    continue
                cells = [
                    f"{key} {_show(self.ratios(b, base, key), 2)}x"
                    for key in ("requests_per_s", "latency_p50_ms", "bulk_gbps")
                ]
                lines.append(f"  {b:<17} " + ", ".join(cells))
        problems = self.problems()
        lines += ["", "problems: none" if not problems else "problems:"]
        lines += [f"  {p}" for p in problems[:40]]
        for o in self.runs:
            if o.failures:
                lines.append(f"  {o.backend}: e.g. {o.failures[0]}")
        return "\n".join(lines)


def _show(fig: Figure | None, digits: int) -> str:
    return fig.show(digits=digits) if fig is not None else "-"


def _value(o: Outcome, key: str) -> float | None:
    if o.error is not None:
        return None
    return {
        "latency_p50_ms": o.latency_p50,
        "requests_per_s": o.requests_per_s,
        "bulk_gbps": o.bulk_gbps,
        "kill_seconds": o.kill_seconds,
    }[key]


def run(
    plan: Plan,
    backends: Sequence[str],
    repeats: int,
    progress: Callable[[str], None] = lambda _: None,
) -> SglangResult:
    """Every backend ``repeats`` times, the order rotated each repeat."""
    runs: list[Outcome] = []
    order = list(backends)
    for r in range(repeats):
        turn = order[r % len(order) :] + order[: r % len(order)]
        for backend in turn:
            progress(f"repeat {r + 1}/{repeats}: {backend}")
            runs.append(run_pair(plan, backend))
    return SglangResult(plan, list(backends), runs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Rank:
    """One rank's process and its JSON lines, read on a thread of their own."""

    def __init__(self, role: str, plan_file: str, env: dict[str, str], log: str) -> None:
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvpoll.bench.sglang_peer", role, plan_file],
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.got: dict[str, dict[str, Any]] = {}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                try:
                    self.lines.put(json.loads(line))
                except ValueError:
                    continue
        self.lines.put(None)

    def next(self, until: float) -> dict[str, Any] | None:
        """The next event (None: the process ended, or time ran out)."""
        try:
            event = self.lines.get(timeout=max(0.0, until - time.monotonic()))
        except queue.Empty:
            return None
        if event is not None:
            self.got[str(event.get("event"))] = event
        return event

    def wait_for(self, name: str, until: float) -> dict[str, Any] | None:
        while name not in self.got:
            if self.next(until) is None:
                return None
        return self.got[name]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.reader.join(10)
        self.log.close()

    def tail(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-3:])[-400:]


def run_pair(plan: Plan, backend: str) -> Outcome:
    """One prefill and one decode rank on ``backend``: every phase, then the outcome."""
    name, extra = BACKENDS[backend]
    plan = Plan(**{**asdict(plan), "backend": name, "port": _free_port()})
    env = {**os.environ, **extra, "PYTHONUNBUFFERED": "1", "SGLANG_HOST_IP": "127.0.0.1"}
    env.setdefault("MC_LOG_LEVEL", "ERROR")
    outcome = Outcome(backend)
    with tempfile.TemporaryDirectory(prefix="kvpoll-bench-sglang-") as tmp:
        plan_file = os.path.join(tmp, "plan.json")
        with open(plan_file, "w") as f:
            json.dump(asdict(plan), f)
        until = time.monotonic() + 120 + 4 * plan.deadline
        prefill = _Rank("prefill", plan_file, env, os.path.join(tmp, "prefill.log"))
        decode: _Rank | None = None
        try:
            if prefill.wait_for("ready", time.monotonic() + 180) is None:
                outcome.error = f"the prefill rank did not start: {prefill.tail()}"
                return outcome
            decode = _Rank("decode", plan_file, env, os.path.join(tmp, "decode.log"))
            killed_at = None
            while "end" not in decode.got:
                if plan.kill and killed_at is None:
                    kill_me = prefill.got.get("kill_me")
                    if kill_me is None:
                        prefill.next(min(until, time.monotonic() + 0.05))
                    else:
                        os.killpg(prefill.proc.pid, signal.SIGKILL)
                        killed_at = time.monotonic()
                if decode.next(min(until, time.monotonic() + 0.05)) is None and (
                    decode.proc.poll() is not None or time.monotonic() > until
                ):
                    outcome.error = f"the decode rank stopped early: {decode.tail()}"
                    return outcome
            if not plan.kill:
                prefill.wait_for("end", until)
            _reduce(outcome, plan, prefill.got, decode.got, killed_at)
        finally:
            prefill.stop()
            if decode is not None:
                decode.stop()
    return outcome


def _reduce(
    outcome: Outcome,
    plan: Plan,
    prefill: dict[str, dict[str, Any]],
    decode: dict[str, dict[str, Any]],
    killed_at: float | None,
) -> None:
    for phase in ("latency", "load", "bulk"):
        p, d = prefill.get(phase), decode.get(phase)
        if p is None or d is None:
            outcome.error = f"no {phase} results from the {'prefill' if p is None else 'decode'}"
            return
        pairs = list(zip(p["requests"], d["requests"], strict=True))
        for a, b in pairs:
            fa, fb = a["walk"][-1], b["walk"][-1]
            outcome.unfinished += fa not in (_FAILED, _SUCCESS) or fb not in (_FAILED, _SUCCESS)
            outcome.disagreements += fa != fb
            outcome.bad_walks += (not walk_ok(a["walk"])) + (not walk_ok(b["walk"]))
            outcome.wrong_pages += (b.get("wrong_pages") or 0) + (b.get("aux_ok") is False)
            outcome.requests += 1
            ok = fa == fb == _SUCCESS and not b.get("wrong_pages") and b.get("aux_ok") is True
            outcome.completed += ok
            for side in (a, b):
                if side.get("reason") and len(outcome.failures) < 3:
                    outcome.failures.append(f"{phase} room {side['room']}: {side['reason']}")
        if phase == "latency":
            outcome.latency_ms = [
                1000 * (b["at"]["final"] - a["at"]["send"])
                for a, b in pairs
                if b["walk"][-1] == _SUCCESS and "send" in a["at"] and "final" in b["at"]
            ]
        elif phase == "load":
            ends = [r["at"]["final"] for r in p["requests"] + d["requests"] if "final" in r["at"]]
            if ends:
                outcome.load_seconds = max(ends) - min(p["began"], d["began"])
        else:
            a, b = pairs[0]
            if b["walk"][-1] == _SUCCESS and "send" in a["at"]:
                seconds = b["at"]["final"] - a["at"]["send"]
                outcome.bulk_gbps = plan.bulk_pages * plan.page_bytes / seconds / 1e9
    kill = decode.get("kill")
    if plan.kill and kill is not None and killed_at is not None:
        request = kill["requests"][0]
        if request["walk"][-1] == _FAILED and "final" in request["at"]:
            outcome.kill_seconds = max(0.0, request["at"]["final"] - killed_at)
        outcome.bad_walks += not walk_ok(request["walk"])
