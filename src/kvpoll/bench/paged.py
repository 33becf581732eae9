"""``kvpoll bench transfer --paged``: a KV-cache room through every transport,
beside each engine's own batch call, in one run.

The pool is a small model's KV cache as SGLang holds it: 16 layers, K and V
(32 buffers), pages of 16 tokens, one KV head of 128 bf16 per token and buffer
(256 bytes). A room moves 4,096 tokens (256 pages, 32 MiB) from pages scattered
over the sender's pool into pages scattered over the receiver's, as allocators
hand them out: kvpoll merges what is consecutive on both sides and hands each
destination one batch. Each baseline moves the very same ranges:

* ``copy-loop``: one core copying each range in a loop (the shared-memory limit);
* ``raw-ucxx``: one tagged send per range, all in flight, into receives posted first;
* ``raw-nixl``: one NIXL transfer whose descriptor lists hold every range (made
  from NumPy arrays prepared beforehand, NIXL's fastest input);
* ``raw-mooncake``: ``batch_transfer_sync_write`` of every range (1,024 per
  call: Mooncake refuses more).

A paged room is timed from ``open()`` to Success (bootstrap included); a raw
batch from the command to the last byte landing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvpoll.bench.child import ask, sending_child
from kvpoll.bench.raw_engines import start_mooncake
from kvpoll.bench.stats import WARM_UP_ROUNDS, Figure, figure, ratio, warm_up

__all__ = ["LAYOUT", "PAGED_PATHS", "PagedBench", "paged_paths", "run_paged"]

LAYOUT = {"layers": 16, "page_size": 16, "tokens": 4096, "head_dim": 128}
BUFFERS = 2 * LAYOUT["layers"]
ROW = LAYOUT["head_dim"] * 2  # bytes of one token in one buffer (bf16)
PAGES = LAYOUT["tokens"] // LAYOUT["page_size"]
POOL_PAGES = 2 * PAGES
ROOM_BYTES = LAYOUT["tokens"] * ROW * BUFFERS
PAGED_PATHS = ("zmq-shm", "zmq-tcp", "ucx", "nixl", "mooncake")
BASELINE = {
    "zmq-shm": "copy-loop",
    "zmq-tcp": "copy-loop",
    "ucx": "raw-ucxx",
    "nixl": "raw-nixl",
    "mooncake": "raw-mooncake",
}
_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "zmq-shm": ("zmq", {"shm": True}),
    "zmq-tcp": ("zmq", {"shm": False}),
    "ucx": ("ucx", {}),
    "nixl": ("nixl", {}),
    "mooncake": ("mooncake", {}),
}
_DEADLINE = 120.0
MOONCAKE_BATCH = 1024


def paged_paths(transports: list[str]) -> list[str]:
    chosen = set(PAGED_PATHS if "all" in transports else transports)
    out = []
    for path in PAGED_PATHS:
        if path in chosen or (path.startswith("zmq") and "zmq" in chosen):
            out.append(path)
    return out


def _pool(path: str) -> Any:
    from kvpoll.memory import PagedPool

    transport, options = _OPTIONS[path]
    memory = "shm" if options.get("shm") else "host"
    pool = PagedPool.allocate(
        num_pages=POOL_PAGES,
        page_size=LAYOUT["page_size"],
        buffers=[((LAYOUT["head_dim"],), torch.bfloat16)] * BUFFERS,
        memory=memory if transport == "zmq" else "host",
    )
    return pool


def _pages(seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(POOL_PAGES, generator=gen)[:PAGES].tolist()


SRC_PAGES, DST_PAGES = _pages(1), _pages(2)


def ranges(pool_base: list[int], other_base: list[int]) -> list[tuple[int, int, int]]:
    """(source address, destination address, bytes) of every range a room moves,
    merged where consecutive on both sides (what kvpoll hands a transport)."""
    from kvpoll.memory import as_runs, pair_runs

    ps = LAYOUT["page_size"]
    src = [(a * ps, n * ps) for a, n in as_runs(SRC_PAGES)]
    dst = [(a * ps, n * ps) for a, n in as_runs(DST_PAGES)]
    out = []
    for s_base, d_base in zip(pool_base, other_base, strict=True):
        for s_tok, d_tok, n in pair_runs(src, dst):
            out.append((s_base + s_tok * ROW, d_base + d_tok * ROW, n * ROW))
    return out


# -- the sending process ---------------------------------------------------------------
def _child(conn: Any) -> None:
    from kvpoll.protocol import Sender

    sender: Any = None
    pool: Any = None
    raw: Any = None
    try:
        while True:
            command = conn.recv()
            kind = command[0]
            if kind == "exit":
                break
            if kind == "start":
                transport, options = _OPTIONS[command[1]]
                pool = _pool(command[1])
                for buffer in pool.buffers:
                    buffer.copy_(torch.randn(buffer.shape).to(torch.bfloat16))
                sender = Sender(transport, transport_options=options, history=False)
                sender.register(pool)
                conn.send(sender.address)
            elif kind == "room":
                sender.add(command[1])
                sender.send(command[1], pages=SRC_PAGES, pool=pool)
                conn.send("ok")
            elif kind == "forget":
                sender.remove(command[1])
                conn.send("ok")
            elif kind == "stop":
                sender.close()
                sender = pool = None
                conn.send("ok")
            elif kind == "raw-setup":
                raw = _RawSender(command[1], command[2])
                conn.send("ok")
            elif kind == "raw-go":
                raw.send()
                conn.send("done")
            elif kind == "raw-close":
                raw.close()
                raw = None
                conn.send("ok")
    finally:
        if raw is not None:
            raw.close()
        if sender is not None:
            sender.close()


class _RawSender:
    """One engine used directly, moving the room's ranges in one batch call."""

    def __init__(self, name: str, setup: Any) -> None:
        self.name = name
        self.pool = _pool("ucx")
        mine = [int(b.data_ptr()) for b in self.pool.buffers]
        self.base = int(self.pool.buffers[0].data_ptr())
        span = int(self.pool.buffers[-1].data_ptr()) + self.pool.buffers[-1].numel() * 2 - self.base
        self.span = span
        if name == "raw-ucxx":
            import ucxx._lib.libucxx as libucxx

            from kvpoll.transports.ucx_transport import effective_settings

            self.lib = libucxx
            self.context = libucxx.UCXContext(
                effective_settings("127.0.0.1"), feature_flags=(libucxx.Feature.TAG,)
            )
            self.worker = libucxx.UCXWorker(self.context)
            address = libucxx.UCXAddress.create_from_buffer(setup[0])
            self.endpoint = self.worker.create_endpoint_from_worker_address(address, True)
            self.ranges = ranges(mine, setup[1])
        elif name == "raw-nixl":
            from kvpoll.transports.nixl_transport import make_agent

            self.agent = make_agent(f"raw-paged-{os.getpid()}-{time.monotonic_ns()}")
            self.registration = self.agent.register_memory([(self.base, span, 0, "")], "DRAM")
            self.peer = self.agent.add_remote_agent(setup[0])
            self.ranges = ranges(mine, setup[1])
            # NIXL's fastest input: Nx3 arrays (address, length, device), as kvpoll hands it
            table = np.array(self.ranges, dtype=np.uint64).reshape(-1, 3)
            zeros = np.zeros(len(table), dtype=np.uint64)
            self.local = np.stack([table[:, 0], table[:, 2], zeros], axis=1)
            self.remote = np.stack([table[:, 1], table[:, 2], zeros], axis=1)
        else:
            self.engine = start_mooncake()
            self.engine.register_memory(self.base, span)
            self.session = setup[0]
            self.ranges = ranges(mine, setup[1])

    def send(self) -> None:
        deadline = time.monotonic() + _DEADLINE
        if self.name == "raw-ucxx":
            from ucxx._lib.arr import Array

            requests = [
                self.endpoint.tag_send(Array(_host(src, n)), self.lib.UCXXTag(i + 1))
                for i, (src, _, n) in enumerate(self.ranges)
            ]
            while not all(r.completed for r in requests):
                self.worker.progress()
                if time.monotonic() > deadline:
                    raise RuntimeError("raw ucxx: the batch did not complete")
        elif self.name == "raw-nixl":
            local = self.agent.get_xfer_descs(self.local, "DRAM")
            remote = self.agent.get_xfer_descs(self.remote, "DRAM")
            handle = self.agent.initialize_xfer("WRITE", local, remote, self.peer)
            state = self.agent.transfer(handle)
            while state not in ("DONE", "ERR"):
                state = self.agent.check_xfer_state(handle)
                if time.monotonic() > deadline:
                    raise RuntimeError("raw nixl: the batch did not complete")
            self.agent.release_xfer_handle(handle)
            if state == "ERR":
                raise RuntimeError("raw nixl: the batch failed")
        else:  # Mooncake takes at most 1,024 ranges per batch (measured)
            for i in range(0, len(self.ranges), MOONCAKE_BATCH):
                part = self.ranges[i : i + MOONCAKE_BATCH]
                status = self.engine.batch_transfer_sync_write(
                    self.session,
                    [s for s, _, _ in part],
                    [d for _, d, _ in part],
                    [n for _, _, n in part],
                )
                if status != 0:
                    raise RuntimeError(f"raw mooncake: the batch failed ({status})")

    def close(self) -> None:
        if self.name == "raw-ucxx":
            self.endpoint.close()
        elif self.name == "raw-nixl":
            self.agent.remove_remote_agent(self.peer)
            self.agent.deregister_memory(self.registration)
        else:
            self.engine.unregister_memory(self.base)


def _host(address: int, nbytes: int) -> np.ndarray[Any, Any]:
    """A NumPy view of ``nbytes`` of this process's memory at ``address``."""
    import ctypes

    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(address))


class _RawReceiver:
    def __init__(self, name: str) -> None:
        self.name = name
        self.pool = _pool("ucx")
        self.bases = [int(b.data_ptr()) for b in self.pool.buffers]
        self.base = self.bases[0]
        self.span = self.bases[-1] + self.pool.buffers[-1].numel() * 2 - self.base
        if name == "raw-ucxx":
            import ucxx._lib.libucxx as libucxx

            from kvpoll.transports.ucx_transport import effective_settings

            self.lib = libucxx
            self.context = libucxx.UCXContext(
                effective_settings("127.0.0.1"), feature_flags=(libucxx.Feature.TAG,)
            )
            self.worker = libucxx.UCXWorker(self.context)
            self.setup: Any = (self.worker.address.tobytes(), self.bases)
            self.ranges = ranges([0] * BUFFERS, self.bases)
        elif name == "raw-nixl":
            from kvpoll.transports.nixl_transport import make_agent

            self.agent = make_agent(f"raw-paged-rx-{os.getpid()}-{time.monotonic_ns()}")
            self.registration = self.agent.register_memory([(self.base, self.span, 0, "")], "DRAM")
            self.setup = (self.agent.get_agent_metadata(), self.bases)
        else:
            self.engine = start_mooncake()
            self.engine.register_memory(self.base, self.span)
            self.setup = (f"127.0.0.1:{self.engine.get_rpc_port()}", self.bases)

    def arm(self) -> None:
        if self.name == "raw-ucxx":
            from ucxx._lib.arr import Array

            self.requests = [
                self.worker.tag_recv(Array(_host(dst, n)), self.lib.UCXXTag(i + 1))
                for i, (_, dst, n) in enumerate(self.ranges)
            ]

    def wait(self) -> None:
        if self.name == "raw-ucxx":
            deadline = time.monotonic() + _DEADLINE
            while not all(r.completed for r in self.requests):
                self.worker.progress()
                if time.monotonic() > deadline:
                    raise RuntimeError("raw ucxx: the receives did not complete")

    def close(self) -> None:
        if self.name == "raw-nixl":
            self.agent.deregister_memory(self.registration)
        elif self.name == "raw-mooncake":
            self.engine.unregister_memory(self.base)


# -- the measuring process -------------------------------------------------------------
@dataclass
class PagedBench:
    """Results: GiB/s of a paged room per path and of each baseline's batch."""

    repeats: int
    paths: list[str]
    figures: dict[str, Figure] = field(default_factory=dict)
    ratios: dict[str, Figure] = field(default_factory=dict)
    warm_up_rounds: int = WARM_UP_ROUNDS
    """Untimed rounds before each measurement's repeats (at most)."""

    def to_json(self) -> dict[str, object]:
        return {
            "warm_up_rounds": self.warm_up_rounds,
            "layout": {**LAYOUT, "buffers": BUFFERS, "row_bytes": ROW, "room_bytes": ROOM_BYTES},
            "ranges_per_destination": len(ranges([0] * BUFFERS, [0] * BUFFERS)),
            "gib_per_s": {k: f.to_json() for k, f in self.figures.items()},
            "ratios": {k: f.to_json() for k, f in self.ratios.items()},
        }

    def report(self) -> str:
        n = len(ranges([0] * BUFFERS, [0] * BUFFERS))
        lines = [
            f"paged rooms: {LAYOUT['layers']} layers x K,V, pages of {LAYOUT['page_size']}, "
            f"{LAYOUT['tokens']} tokens ({ROOM_BYTES >> 20} MiB, {n} ranges after merging); "
            f"{self.repeats} repeats after up to {self.warm_up_rounds} warm-up rounds; "
            "GiB/s median [min-max]",
        ]
        for name, fig in self.figures.items():
            lines.append(f"  {name:<16}{fig.show('', 2):>24}")
        lines.append("ratios (per repeat, median [min-max]):")
        for name, fig in self.ratios.items():
            lines.append(f"  {name:<28}{fig.show('x', 2)}")
        return "\n".join(lines)


def run_paged(
    *,
    paths: list[str],
    repeats: int = 5,
    warm_up_rounds: int = WARM_UP_ROUNDS,
    progress: Callable[[str], None] | None = None,
) -> PagedBench:
    """Measure a paged room over each path, and each path's baseline, back to back."""
    say = progress or (lambda _msg: None)
    result = PagedBench(repeats, paths, warm_up_rounds=warm_up_rounds)
    rooms = iter(range(1, 1 << 40))
    for path in paths:
        baseline = BASELINE[path]
        samples: dict[str, list[float]] = {}
        # a fresh sending process per path: an engine's threads and settings from an
        # earlier path must not weigh on this one's figures
        with sending_child(_child, "kvpoll-bench-paged") as conn:
            for name in (baseline, path):
                if name in samples or name in result.figures:
                    continue
                say(f"paged {name}")
                with _session(conn, name, rooms) as measure:
                    warm_up(measure, warm_up_rounds)
                    samples[name] = [measure() for _ in range(repeats)]
                result.figures[name] = figure([ROOM_BYTES / s / (1 << 30) for s in samples[name]])
        if baseline in samples and path in samples:
            result.ratios[f"{path}/{baseline}"] = ratio(
                [1 / s for s in samples[path]], [1 / s for s in samples[baseline]]
            )
    return result


@contextmanager
def _session(conn: Any, name: str, rooms: Iterator[int]) -> Iterator[Callable[[], float]]:
    if name == "copy-loop":
        src, dst = _pool("zmq-shm"), _pool("zmq-shm")
        spans = ranges(
            [int(b.data_ptr()) for b in src.buffers], [int(b.data_ptr()) for b in dst.buffers]
        )
        views = [(_host(d, n), _host(s, n)) for s, d, n in spans]

        def copy() -> float:
            start = time.perf_counter()
            for d, s in views:
                np.copyto(d, s)
            return time.perf_counter() - start

        try:
            yield copy
        finally:
            src.close()
            dst.close()
    elif name in _OPTIONS:
        from kvpoll.protocol import Receiver

        transport, options = _OPTIONS[name]
        address = ask(conn, ("start", name), 120)
        pool = _pool(name)
        rx = Receiver(transport, transport_options=options, history=False)
        rx.register(pool)

        def room() -> float:
            number = next(rooms)
            ask(conn, ("room", number))
            start = time.perf_counter()
            rx.open(number, address, pool=pool, pages=DST_PAGES)
            status = rx.wait(number, _DEADLINE)
            took = time.perf_counter() - start
            if status.name != "Success":
                raise RuntimeError(
                    f"{name}: room {number} ended {status.name}: {rx.info(number).reason}"
                )
            rx.remove(number)
            ask(conn, ("forget", number))
            return took

        try:
            yield room
        finally:
            rx.close()
            ask(conn, ("stop",), 60)
            pool.close()
    else:
        half = _RawReceiver(name)
        try:
            ask(conn, ("raw-setup", name, half.setup), 120)

            def batch() -> float:
                half.arm()
                start = time.perf_counter()
                conn.send(("raw-go",))
                half.wait()
                if not conn.poll(_DEADLINE) or conn.recv() != "done":
                    raise RuntimeError(f"{name}: the sender did not finish")
                return time.perf_counter() - start

            yield batch
        finally:
            ask(conn, ("raw-close",), 60)
            half.close()
