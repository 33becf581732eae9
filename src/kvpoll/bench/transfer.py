"""``kvpoll bench transfer``: GiB/s of each path, against baselines in the same run.

Two processes: this one receives (a :class:`~kvpoll.Receiver`), a child sends
(a :class:`~kvpoll.Sender`). Per size, each repeat measures back to back:

* ``copy``: a single-core copy into a pre-touched buffer (the limit);
* ``pyzmq``: raw pyzmq over TCP, ``send(copy=False)`` / ``recv(copy=False)``;
* ``zmq-shm`` and ``zmq-tcp``: one room of one chunk through kvpoll, from
  ``open()`` to Success (bootstrap round trip included);
* with ``transports`` naming engines: ``ucx``, ``nixl``, ``mooncake`` (one room
  through kvpoll over that engine) beside ``raw-ucxx``, ``raw-nixl``,
  ``raw-mooncake`` (one write through the engine used directly, from the
  command to the bytes being in the receiver's buffer; see
  :mod:`kvpoll.bench.raw_engines`).

Then 2,000 concurrent one-chunk rooms through one endpoint pair per path, twice
(the steady state is the second batch), beside raw pyzmq round trips with as
many in flight, and the latency of one
4 KiB room per path beside a raw pyzmq round trip (:mod:`kvpoll.bench.latency`).
"""

from __future__ import annotations

import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from kvpoll.bench import latency
from kvpoll.bench.child import ask, sending_child
from kvpoll.bench.raw_engines import RAW, receiving_half, sending_half
from kvpoll.bench.stats import WARM_UP_ROUNDS, Figure, figure, ratio, warm_up

__all__ = ["ENGINES", "PATHS", "TransferBench", "paths_of", "plot", "run"]

ROW = 4096  # bytes per token row
PATHS = ("zmq-shm", "zmq-tcp")
ENGINES = ("ucx", "nixl", "mooncake")
TRANSPORTS = ("zmq", *ENGINES)
TARGETS = {
    "shm_vs_copy": 0.7,
    "tcp_vs_pyzmq": 1.0,
    "engine_vs_raw": 0.9,
    "room_vs_rtt_p50": 3.0,  # a 4 KiB room, open() to Success, in raw pyzmq round trips
    "room_vs_rtt_p99": 5.0,  # its p99, in median round trips
    "rooms_vs_pipelined": 0.10,  # rooms/s in flight, as a share of pipelined round trips/s
}
MiB = 1 << 20
_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "zmq-shm": ("zmq", {"shm": True}),
    "zmq-tcp": ("zmq", {"shm": False}),
    **{name: (name, {}) for name in ENGINES},
}


def paths_of(transports: list[str]) -> list[str]:
    """kvpoll paths measured for ``transports`` (``all``: every one)."""
    chosen = list(TRANSPORTS) if "all" in transports else transports
    unknown = sorted(set(chosen) - set(TRANSPORTS))
    if unknown:
        raise ValueError(f"unknown transport {unknown[0]!r}; known: {', '.join(TRANSPORTS)}, all")
    paths: list[str] = []
    for name in TRANSPORTS:
        if name in chosen:
            paths.extend(PATHS if name == "zmq" else [name])
    return paths


def _source(nbytes: int) -> torch.Tensor:
    """Random rows, made on one thread: torch's OpenMP pool would go on spinning
    after the call and slow what is measured next on a two-core machine."""
    with _single_thread():
        return torch.randint(0, 256, (nbytes // ROW, ROW), dtype=torch.uint8)


def _child(conn: Any) -> None:
    """The sending process: obeys commands from the pipe until "exit"."""
    from kvpoll.protocol import Sender

    senders: dict[str, Sender] = {}
    halves: dict[str, Any] = {}
    sources: dict[int, torch.Tensor] = {}
    ctx = zmq.Context()
    push: zmq.Socket[bytes] | None = None
    raw_buf: memoryview | None = None
    echo: threading.Thread | None = None
    try:
        while True:
            command = conn.recv()
            kind = command[0]
            if kind == "exit":
                break
            if kind == "start":
                path = command[1]
                transport, options = _OPTIONS[path]
                senders[path] = Sender(transport, transport_options=options, history=False)
                conn.send(senders[path].address)
            elif kind == "stop":
                senders.pop(command[1]).close()
                conn.send("ok")
            elif kind == "raw-setup":
                _, name, setup, nbytes = command
                if name in halves:
                    halves.pop(name).close()
                halves[name] = sending_half(name, setup, nbytes)
                conn.send("ok")
            elif kind == "raw-close":
                if command[1] in halves:
                    halves.pop(command[1]).close()
                conn.send("ok")
            elif kind == "raw-go":
                halves[command[1]].send()
                conn.send("done")
            elif kind == "rooms":
                _, path, nbytes, ids = command
                src = sources.get(nbytes)
                if src is None:  # made once: not setdefault, which would make it every time
                    src = sources[nbytes] = _source(nbytes)
                for room in ids:
                    senders[path].add(room)
                    senders[path].send(room, src)
                conn.send("ok")
            elif kind == "forget":
                _, path, ids = command
                for room in ids:
                    senders[path].remove(room)
                conn.send("ok")
            elif kind == "raw":
                _, address, nbytes = command
                if push is not None:
                    push.close()
                push = ctx.socket(zmq.PUSH)
                push.setsockopt(zmq.LINGER, 0)
                push.connect(address)
                raw_buf = _source(nbytes).numpy().data
                conn.send("ok")
            elif kind == "echo":
                latency.echo_child(command[1], command[2], command[3])
                conn.send("ok")
            elif kind == "echo-beside":  # echo on a thread while rooms go on here
                echo = threading.Thread(  # daemon: an echo left waiting never holds the exit
                    target=latency.echo_child,
                    args=command[1:],
                    name="kvpoll-bench-echo",
                    daemon=True,
                )
                echo.start()
                conn.send("ok")
            elif kind == "echo-end":
                if echo is not None:
                    echo.join(60)
                    if echo.is_alive():
                        raise RuntimeError("the echo thread did not end within 60 s")
                    echo = None
                conn.send("ok")
            elif kind == "go":
                if push is None or raw_buf is None:
                    raise RuntimeError("'go' before 'raw'")
                push.send(raw_buf, copy=False)
    finally:
        if echo is not None:  # ended early: its poll gives up within 60 s; wait a little
            echo.join(1.0)
        for half in halves.values():
            half.close()
        for sender in senders.values():
            sender.close()
        if push is not None:
            push.close()
        ctx.term()


@dataclass
class TransferBench:
    """Results: per path and size, GiB/s and seconds per room."""

    repeats: int
    sizes: list[int]
    paths: list[str] = field(default_factory=lambda: list(PATHS))
    figures: dict[str, dict[str, Figure]] = field(default_factory=dict)
    ratios: dict[str, dict[str, Figure]] = field(default_factory=dict)
    concurrent: dict[str, dict[str, float]] = field(default_factory=dict)
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    """``pyzmq-rtt`` and each path: microseconds (p50, p99, min, max); each path
    also has the round trips timed between its rooms (``rtt_p50_us``, ``rtt_p99_us``)."""
    pipelined_per_s: float | None = None
    """Raw pyzmq 4 KiB round trips per second with the concurrent rooms' count in flight."""
    warm_up_rounds: int = WARM_UP_ROUNDS
    """Untimed rounds before each measurement's repeats (at most; see :func:`warm_up`)."""

    def verdicts(self) -> dict[str, bool]:
        met = {}
        rtt = self.latency.get("pyzmq-rtt")
        for path in self.paths:
            room = self.latency.get(path)
            if rtt is None or room is None:
                continue
            for q in ("p50", "p99"):
                target = TARGETS[f"room_vs_rtt_{q}"]
                met[f"4 KiB room {q} over {path} <= {target:g}x a pyzmq round trip"] = (
                    room[f"{q}_us"] / rtt["p50_us"] <= target
                )
        engines = [p for p in self.paths if p in RAW]
        for size in self.sizes:
            if size < 16 * MiB:
                continue
            key = _label(size)
            if "zmq-shm" in self.paths:
                met[f"zmq-shm >= {TARGETS['shm_vs_copy']}x copy at {key}"] = (
                    self.ratios["zmq-shm/copy"][key].median >= TARGETS["shm_vs_copy"]
                )
                met[f"zmq-tcp >= {TARGETS['tcp_vs_pyzmq']}x pyzmq at {key}"] = (
                    self.ratios["zmq-tcp/pyzmq"][key].median >= TARGETS["tcp_vs_pyzmq"]
                )
            for path in engines:
                for what in (path, f"{path}.write"):
                    met[f"{what} >= {TARGETS['engine_vs_raw']}x {RAW[path]} at {key}"] = (
                        self.ratios[f"{what}/{RAW[path]}"][key].median >= TARGETS["engine_vs_raw"]
                    )
            if engines:
                raw = max(self.figures[RAW[p]][key].median for p in engines)
                for what, suffix in (("room", ""), ("single write", ".write")):
                    best = max(self.figures[f"{p}{suffix}"][key].median for p in self.paths)
                    met[f"kvpoll's best path ({what}) >= the best raw engine at {key}"] = (
                        best >= raw
                    )
        for path, result in self.concurrent.items():
            met[f"{int(result['rooms']):,} concurrent rooms complete over {path}"] = (
                result["succeeded"]
                == result.get("cold_succeeded", result["rooms"])
                == result["rooms"]
            )
            if self.pipelined_per_s:
                share = TARGETS["rooms_vs_pipelined"]
                met[f"rooms/s over {path} >= {share:.0%} of pipelined pyzmq round trips/s"] = (
                    result["rooms_per_s"] / self.pipelined_per_s >= share
                )
        return met

    def to_json(self) -> dict[str, object]:
        return {
            "benchmark": "transfer",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pyzmq": zmq.__version__,
            "repeats": self.repeats,
            "warm_up_rounds": self.warm_up_rounds,
            "row_bytes": ROW,
            "gib_per_s": {
                p: {s: f.to_json() for s, f in by.items()} for p, by in self.figures.items()
            },
            "ratios": {p: {s: f.to_json() for s, f in by.items()} for p, by in self.ratios.items()},
            "concurrent_rooms": self.concurrent,
            "latency_us": self.latency,
            "pyzmq_pipelined_round_trips_per_s": self.pipelined_per_s,
            "targets": TARGETS,
            "met": self.verdicts(),
        }

    def names(self) -> list[str]:
        """Every measured path: baselines, kvpoll's rooms, single writes, raw engines."""
        baselines = ["copy", "pyzmq"] if any(p in PATHS for p in self.paths) else []
        return [
            *baselines,
            *self.paths,
            *(f"{p}.write" for p in self.paths),
            *(RAW[p] for p in self.paths if p in RAW),
        ]

    def report(self) -> str:
        lines = [
            f"kvpoll bench transfer: python {platform.python_version()}, "
            f"{self.repeats} repeats after up to {self.warm_up_rounds} warm-up rounds; "
            "GiB/s median [min-max]",
            "",
        ]
        keys = [_label(s) for s in self.sizes]
        lines.append(f"{'path':<14}" + "".join(f"{k:>22}" for k in keys))
        for name in self.names():
            lines.append(
                f"{name:<14}" + "".join(f"{self.figures[name][k].show('', 2):>22}" for k in keys)
            )
        lines.append("")
        lines.append("milliseconds per room (median):")
        for path in self.paths:
            lines.append(
                f"  {path:<12}"
                + "  ".join(
                    f"{k} {self.figures[f'{path}-seconds'][k].median * 1e3:.2f}" for k in keys
                )
            )
        lines.append("")
        lines.append("ratios (per repeat, median [min-max]):")
        for name, by in self.ratios.items():
            lines.append(
                f"  {name:<30}" + "  ".join(f"{size}: {f.show('x', 2)}" for size, f in by.items())
            )
        for path, result in self.concurrent.items():
            share = (
                f", {result['rooms_per_s'] / self.pipelined_per_s:.1%} of raw pyzmq's "
                f"{self.pipelined_per_s:,.0f} pipelined round trips/s"
                if self.pipelined_per_s
                else ""
            )
            lines.append(
                f"  {int(result['rooms']):,} concurrent one-chunk rooms over {path}: "
                f"{int(result['succeeded']):,} succeeded in {result['seconds']:.2f} s "
                f"({result['rooms_per_s']:,.0f} rooms/s{share}; the first batch, on a new "
                f"endpoint pair: {result.get('cold_rooms_per_s', 0):,.0f} rooms/s)"
            )
        rtt = self.latency.get("pyzmq-rtt")
        if rtt is not None:
            lines.append("")
            lines.append("latency of one 4 KiB room, open() to Success (us):")
            lines.append(
                f"  {'raw pyzmq round trip':<22} p50 {rtt['p50_us']:8.1f}  p99 {rtt['p99_us']:8.1f}"
            )
            for path in self.paths:
                room = self.latency.get(path)
                if room is not None:
                    lines.append(
                        f"  {path:<22} p50 {room['p50_us']:8.1f}  p99 {room['p99_us']:8.1f}"
                        f"   = {room['p50_us'] / rtt['p50_us']:.1f}x / "
                        f"{room['p99_us'] / rtt['p50_us']:.1f}x a round trip"
                    )
                    between = room.get("rtt_p50_us")
                    if between:
                        lines.append(
                            f"  {'':<22} round trips timed between its rooms: p50 {between:.1f}"
                            f" (the room's p50 = {room['p50_us'] / between:.1f}x that)"
                        )
        lines.append("")
        for target, ok in self.verdicts().items():
            lines.append(f"  target {target}: {'met' if ok else 'MISSED'}")
        return "\n".join(lines)


def _label(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // 1024} KiB"


def _gib(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / (1 << 30)


@contextmanager
def _single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _groups(paths: list[str]) -> list[tuple[list[str], list[str]]]:
    """(kvpoll paths, baselines) compared with each other: one group per engine."""
    groups: list[tuple[list[str], list[str]]] = []
    zmq_paths = [p for p in paths if p in PATHS]
    if zmq_paths:
        groups.append((zmq_paths, ["copy", "pyzmq"]))
    groups.extend(([p], [RAW[p]]) for p in paths if p in RAW)
    return groups


def run(
    *,
    sizes: list[int],
    repeats: int = 5,
    warm_up_rounds: int = WARM_UP_ROUNDS,
    concurrent_rooms: int = 2000,
    latency_rooms: int = 200,
    transports: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> TransferBench:
    """Measure every path at every size; ``progress`` is told of each step.

    ``transports``: which of zmq, ucx, nixl, mooncake (or ``all``); default zmq.

    Each measured thing (a room path, a single write, a raw engine, a
    baseline) gets its own endpoints, made before its warm-up (up to
    ``warm_up_rounds`` untimed rounds, :func:`~kvpoll.bench.stats.warm_up`) and
    closed after its repeats, so no engine's threads or workers linger beside another's
    figures (measured: an idle second UCX worker in the process slowed ucx
    rooms by up to 2x on two cores). All of a size's measurements run back to
    back in one run, and ratios pair repeat i with repeat i.
    """
    paths = paths_of(transports or ["zmq"])
    say = progress or (lambda _msg: None)
    result = TransferBench(repeats, sizes, paths, warm_up_rounds=warm_up_rounds)
    rooms = iter(range(1, 1 << 40))
    with sending_child(_child, "kvpoll-bench-sender") as conn:
        for group, baselines in _groups(paths):
            names = [*baselines, *group, *(f"{p}.write" for p in group)]
            for size in sizes:
                key = _label(size)
                samples: dict[str, list[float]] = {}
                for name in names:
                    say(f"{name} {key}")
                    with _session(conn, name, size, rooms) as measure:
                        warm_up(measure, warm_up_rounds)
                        samples[name] = [measure() for _ in range(repeats)]
                _record(result, key, size, group, samples)
            if concurrent_rooms:
                for path in group:
                    say(f"{concurrent_rooms} concurrent rooms over {path}")
                    with _endpoints(conn, path) as (rx, address):
                        result.concurrent[path] = _concurrent(
                            conn, rx, address, path, concurrent_rooms, rooms
                        )
            if latency_rooms:
                for path in group:
                    say(f"{latency_rooms} 4 KiB rooms, one at a time, over {path}")
                    with _endpoints(conn, path) as (rx, address):
                        times, trips = latency.room_latency(
                            conn, rx, address, path, latency_rooms, rooms
                        )
                    result.latency[path] = {
                        **latency.summary(times),
                        "rtt_p50_us": statistics.median(trips) * 1e6,
                        "rtt_p99_us": latency.percentile(trips, 0.99) * 1e6,
                    }
        if latency_rooms:
            say("raw pyzmq round trips")
            result.latency["pyzmq-rtt"] = latency.summary(latency.round_trips(conn, latency_rooms))
        if concurrent_rooms:
            say(f"raw pyzmq round trips, {concurrent_rooms} in flight")
            result.pipelined_per_s = latency.pipelined(
                conn, max(10 * concurrent_rooms, 10_000), concurrent_rooms
            )
    return result


@contextmanager
def _endpoints(conn: Any, path: str) -> Iterator[tuple[Any, str]]:
    """A Receiver here and a Sender in the child for ``path``, closed after."""
    from kvpoll.protocol import Receiver

    address = ask(conn, ("start", path), 120)
    transport, options = _OPTIONS[path]
    rx = Receiver(transport, transport_options=options, history=False)
    try:
        yield rx, address
    finally:
        rx.close()
        ask(conn, ("stop", path), 60)


@contextmanager
def _session(
    conn: Any, name: str, size: int, rooms: Iterator[int]
) -> Iterator[Callable[[], float]]:
    """What measuring ``name`` once at ``size`` needs; yields the measurement."""
    if name == "copy":
        src = _source(size)
        dst = torch.zeros_like(src)

        def copy() -> float:
            with _single_thread():
                start = time.perf_counter()
                dst.copy_(src)
                return time.perf_counter() - start

        yield copy
    elif name == "pyzmq":
        zctx = zmq.Context()
        pull = zctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        ask(conn, ("raw", f"tcp://127.0.0.1:{port}", size))

        def pyzmq() -> float:
            start = time.perf_counter()
            conn.send(("go",))
            if not pull.poll(120_000):
                raise RuntimeError("raw pyzmq: nothing arrived within 120 s")
            frame = pull.recv(copy=False)
            took = time.perf_counter() - start
            if len(frame) != size:
                raise RuntimeError("raw pyzmq lost bytes")
            return took

        try:
            yield pyzmq
        finally:
            pull.close()
            zctx.term()
    elif name in _OPTIONS:
        with _endpoints(conn, name) as (rx, address):

            def room() -> float:
                room = next(rooms)
                ask(conn, ("rooms", name, size, [room]))
                start = time.perf_counter()
                rx.open(
                    room, address, row_shape=(ROW,), dtype=torch.uint8, allocated_tokens=size // ROW
                )
                status = rx.wait(room, 120)
                took = time.perf_counter() - start
                if status.name != "Success":
                    raise RuntimeError(
                        f"{name}: room {room} ended {status.name}: {rx.info(room).reason}"
                    )
                rx.remove(room)
                ask(conn, ("forget", name, [room]))
                return took

            yield room
    else:  # a raw engine or a single write: two halves
        half = receiving_half(name, size)
        try:
            ask(conn, ("raw-setup", name, half.setup(), size), 120)

            def engine() -> float:
                half.arm()
                start = time.perf_counter()
                conn.send(("raw-go", name))
                half.wait(lambda: bool(conn.poll(0)))
                if not conn.poll(120) or conn.recv() != "done":
                    raise RuntimeError(f"{name}: the sender did not finish")
                return time.perf_counter() - start

            yield engine
        finally:
            ask(conn, ("raw-close", name), 60)
            half.close()


def _record(
    result: TransferBench, key: str, size: int, paths: list[str], samples: dict[str, list[float]]
) -> None:
    for name, secs in samples.items():
        result.figures.setdefault(name, {})[key] = figure([_gib(size, s) for s in secs])
        if name in paths:
            result.figures.setdefault(f"{name}-seconds", {})[key] = figure(secs)
    gib = {n: [_gib(size, s) for s in secs] for n, secs in samples.items()}
    pairs = [(f"{p}/{RAW[p]}", p, RAW[p]) for p in paths if p in RAW]
    pairs += [(f"{p}.write/{RAW[p]}", f"{p}.write", RAW[p]) for p in paths if p in RAW]
    if "zmq-shm" in paths:
        pairs += [
            ("zmq-shm/copy", "zmq-shm", "copy"),
            ("zmq-tcp/pyzmq", "zmq-tcp", "pyzmq"),
            ("zmq-shm/pyzmq", "zmq-shm", "pyzmq"),
        ]
    for name, num, den in pairs:
        if num in gib and den in gib:
            result.ratios.setdefault(name, {})[key] = ratio(gib[num], gib[den])


# one colour per engine: a kvpoll path, its single write and its raw engine match
_COLOURS = {
    "copy": "black",
    "pyzmq": "grey",
    "zmq-shm": "C0",
    "zmq-tcp": "C1",
    "ucx": "C2",
    "raw-ucxx": "C2",
    "nixl": "C3",
    "raw-nixl": "C3",
    "mooncake": "C4",
    "raw-mooncake": "C4",
}


def plot(result: TransferBench, path: str) -> None:
    """Save a PNG of GiB/s (median, min-max bars) by size for every measured path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    sizes = [s / MiB for s in result.sizes]
    keys = [_label(s) for s in result.sizes]
    engines = [RAW[p] for p in result.paths if p in RAW]
    panels = (
        ("one room (open() to Success)", ["copy", "pyzmq", *result.paths, *engines]),
        ("one Transport.write", [f"{p}.write" for p in result.paths] + engines),
    )
    for ax, (title, names) in zip(axes, panels, strict=True):
        for name in (n for n in names if n in result.figures):  # what this run measured
            figs = [result.figures[name][k] for k in keys]
            medians = [f.median for f in figs]
            low = [f.median - f.low for f in figs]
            high = [f.high - f.median for f in figs]
            baseline = name.startswith("raw-") or name in ("copy", "pyzmq")
            ax.errorbar(
                sizes,
                medians,
                yerr=[low, high],
                label=name,
                color=_COLOURS[name.removesuffix(".write")],
                linestyle="--" if baseline else "-",
                marker="s" if baseline else "o",
                capsize=3,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, keys)
        ax.set_xlabel("tensor size")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("GiB/s (median; bars: min-max)")
    fig.suptitle(f"kvpoll bench transfer: {result.repeats} repeats, two processes, one host")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _concurrent(
    conn: Any, rx: Any, address: str, path: str, count: int, ids: Iterator[int]
) -> dict[str, float]:
    """``count`` one-chunk rooms opened at once, twice on one endpoint pair: the
    first batch also pays for the receive arena's creation and the sender's first
    mapping of it (``cold_rooms_per_s``); the second is the steady state."""
    runs = [_rooms_in_flight(conn, rx, address, path, count, ids) for _ in range(2)]
    (cold_ok, cold), (ok, took) = runs
    return {
        "rooms": count,
        "succeeded": ok,
        "cold_succeeded": cold_ok,
        "seconds": took,
        "rooms_per_s": count / took,
        "cold_rooms_per_s": count / cold,
    }


def _rooms_in_flight(
    conn: Any, rx: Any, address: str, path: str, count: int, ids: Iterator[int]
) -> tuple[int, float]:
    """(rooms that succeeded, seconds) for ``count`` rooms opened at once."""
    rooms = [next(ids) for _ in range(count)]
    nbytes = 4 * ROW
    ask(conn, ("rooms", path, nbytes, rooms))
    start = time.perf_counter()
    for room in rooms:
        rx.open(room, address, row_shape=(ROW,), dtype=torch.uint8, allocated_tokens=4)
    finals = [rx.wait(room, 120).name for room in rooms]
    took = time.perf_counter() - start
    for room in rooms:
        rx.remove(room)
    ask(conn, ("forget", path, rooms))
    return finals.count("Success"), took
