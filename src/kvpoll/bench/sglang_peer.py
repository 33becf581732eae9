"""One SGLang scheduler rank of ``kvpoll bench sglang``: prefill or decode.

    python -m kvpoll.bench.sglang_peer prefill|decode PLAN.json

The rank builds SGLang's own ``ServerArgs`` (published as SGLang's process
entry does), loads SGLang's plugins (kvpoll's entry point among them), makes
its ``KVArgs`` over CPU tensors shaped like a model's KV pool (K and V of
every layer, pages of 16 tokens) and SGLang's ``MetadataBuffers``, gets every
class through ``get_kv_class`` for the plan's backend (``kvpoll`` over the
transport in ``KVPOLL_TRANSPORT``, or SGLang's own ``mooncake`` / ``nixl``),
and drives requests in the scheduler's order:

* prefill: ``KVSender(mgr, addr, room)``, poll until WaitingForInput,
  ``init(pages, aux_index)``, ``send(chunk)`` per chunk, poll until final;
* decode: ``KVReceiver(mgr, addr, room)``, ``try_ensure_parallel_info``,
  ``init(0)``, poll until WaitingForInput, ``send_metadata(pages, aux_index)``,
  poll until final; the aux row's ``bootstrap_room`` must hold the room (the
  scheduler's gate before it counts a request done).

Phases, in order, each on rooms of its own: ``latency`` (one-page requests
one after another), ``load`` (every request in flight at once, pages
scattered on both sides), ``bulk`` (one large request in chunks), ``kill``
(a request whose prefill is killed after its first chunk). Every poll
result is kept per request (its walk is checked by the orchestrator).
It prints one JSON object per line: ``ready``, then one per phase.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["Plan", "main"]

PAGE_SIZE = 16
HEADS = 2
AUX_EXTRA = 8  # aux rows beside one per load request
_FAILED, _BOOTSTRAPPING, _WAITING, _TRANSFERRING, _SUCCESS = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class Plan:
    """What both ranks of one run do (both read the same plan)."""

    backend: str  # "kvpoll", "mooncake" or "nixl" (SGLang's TransferBackend names)
    port: int  # the bootstrap server's port
    layers: int
    head_dim: int
    requests: int  # load: requests in flight at once
    pages: int  # load: scattered pages per request
    latency: int  # one-page requests, one after another
    bulk_pages: int  # the bulk request's pages
    bulk_chunks: int
    kill: bool
    seed: int = 1
    deadline: float = 300.0  # seconds a phase may take

    @property
    def src_pages(self) -> int:
        return max(4 * self.pages, self.bulk_pages, 64)

    @property
    def dst_pages(self) -> int:
        return self.latency + self.requests * self.pages + 2 * self.bulk_pages + 1

    @property
    def page_bytes(self) -> int:
        """Bytes of one page over every buffer (K and V of every layer)."""
        return 2 * self.layers * PAGE_SIZE * HEADS * self.head_dim * 2

    @property
    def aux_rows(self) -> int:
        return self.requests + AUX_EXTRA

    def rooms(self, phase: str) -> list[int]:
        base = {"latency": 1 << 20, "load": 2 << 20, "bulk": 3 << 20, "kill": 4 << 20}[phase]
        count = {"latency": self.latency, "load": self.requests, "bulk": 1, "kill": 1}[phase]
        return [base + self.seed * (5 << 20) + i for i in range(count)]

    def layout(self, phase: str, i: int) -> tuple[list[int], list[int], int]:
        """(prefill pages, decode pages, aux row) of request ``i`` of ``phase``."""
        rng = random.Random(f"{self.seed}-{phase}-{i}")
        if phase == "latency":
            return [rng.randrange(self.src_pages)], [i], self.requests + 2
        if phase == "load":  # interleaved: no two pages of a request are consecutive
            first = self.latency
            dst = [first + i + self.requests * k for k in range(self.pages)]
            return rng.sample(range(self.src_pages), self.pages), dst, i
        first = self.latency + self.requests * self.pages
        first += self.bulk_pages if phase == "kill" else 0
        dst = list(range(first, first + self.bulk_pages))
        rng.shuffle(dst)
        return (
            rng.sample(range(self.src_pages), self.bulk_pages),
            dst,
            self.requests + (phase == "kill"),
        )


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def kv_pool(plan: Plan, pages: int, fill: bool) -> list[torch.Tensor]:
    """K and V of every layer, [pages, page_size, heads, head_dim] bf16; the prefill's
    filled with bytes every rank can make again from the seed."""
    shape = (pages, PAGE_SIZE, HEADS, plan.head_dim)
    buffers = []
    for b in range(2 * plan.layers):
        t = torch.zeros(shape, dtype=torch.bfloat16)
        if fill:
            gen = torch.Generator().manual_seed(plan.seed * 1000 + b)
            raw = torch.randint(0, 256, (t.numel() * 2,), generator=gen, dtype=torch.uint8)
            t.view(torch.uint8).view(-1).copy_(raw)
        buffers.append(t)
    return buffers


def setup(plan: Plan, mode: str) -> tuple[Any, Any, list[torch.Tensor], Any, Any]:
    """(backend, manager, KV buffers, metadata buffers, bootstrap server or None)."""
    from sglang.srt.disaggregation.utils import MetadataBuffers

    prefill = mode == "prefill"
    buffers = kv_pool(plan, plan.src_pages if prefill else plan.dst_pages, fill=prefill)
    metadata = MetadataBuffers(plan.aux_rows, 16, torch.float32, 16)
    backend, manager, server = sglang_rank(
        mode, plan.backend, plan.port, buffers, metadata, layers=plan.layers, heads=HEADS
    )
    return backend, manager, buffers, metadata, server


def sglang_rank(
    mode: str,
    backend_name: str,
    port: int,
    buffers: list[torch.Tensor],
    metadata: Any,
    *,
    layers: int,
    heads: int,
    states: list[list[torch.Tensor]] | None = None,
) -> tuple[Any, Any, Any]:
    """One SGLang scheduler rank over CPU tensors, built as SGLang's process entry
    and scheduler build it: ``ServerArgs`` published, the shared Mooncake engine
    started where the backend needs it, ``KVArgs`` of ``buffers`` (K and V of each
    layer, one page per item) and ``metadata``'s aux rows (and ``states``: mamba-like
    state components, a slot per item), every class from ``get_kv_class``.

    Returns:
        (the backend enum, the manager, the bootstrap server or None).
    """
    from sglang.srt import runtime_context
    from sglang.srt.disaggregation.base.conn import StateType
    from sglang.srt.disaggregation.utils import (
        DisaggregationMode,
        KVClassType,
        TransferBackend,
        get_kv_class,
    )
    from sglang.srt.server_args import ServerArgs

    server_args = ServerArgs(
        model_path="dummy",
        device="cpu",
        host="127.0.0.1",
        disaggregation_mode=mode,
        disaggregation_transfer_backend=backend_name,
        disaggregation_bootstrap_port=port,
    )
    runtime_context.publish(
        server_args,
        role="scheduler",
        ranks=runtime_context.SpawnRanks(world_rank=0, dp_rank=None, gpu_id=0),
    )
    # a scheduler builds its process groups; one rank without torch.distributed has none
    runtime_context.get_parallel().override_permanently(pp_group=None)
    backend = TransferBackend(server_args.disaggregation_transfer_backend)
    if backend_name == "mooncake":  # what the scheduler does before making the manager
        from sglang.srt.distributed.device_communicators.mooncake_transfer_engine import (
            maybe_init_shared_mooncake_transfer_engine,
        )

        maybe_init_shared_mooncake_transfer_engine(gpu_id=0)
    states = states or []
    kv_args = get_kv_class(backend, KVClassType.KVARGS)()
    for key, value in {
        "engine_rank": 0,
        "pp_rank": 0,
        "system_dp_rank": 0,
        "rust_http_port": None,
        "kv_cache_dtype_str": "bfloat16",
        "kv_layout": None,
        "kv_data_ptrs": [b.data_ptr() for b in buffers],
        "kv_data_lens": [b.nbytes for b in buffers],
        "kv_item_lens": [b[0].nbytes for b in buffers],
        "kv_layer_ids": [i // 2 for i in range(len(buffers))],
        "kv_data_mem_kinds": ["DRAM"] * len(buffers),  # NIXL: host memory
        "kv_head_num": heads,
        "total_kv_head_num": heads,
        "page_size": int(buffers[0].shape[1]),
        "num_draft_entries": 0,
        "prefill_start_layer": 0,
        "prefill_end_layer": layers,
        "state_types": [StateType.MAMBA] * len(states),
        "state_data_ptrs": [[t.data_ptr() for t in c] for c in states],
        "state_data_lens": [[t.nbytes for t in c] for c in states],
        "state_item_lens": [[t[0].nbytes for t in c] for c in states],
        "state_layer_ids": [[0] * len(c) for c in states],
        "ib_device": None,
        "gpu_id": 0,
    }.items():
        setattr(kv_args, key, value)
    kv_args.aux_data_ptrs, kv_args.aux_data_lens, kv_args.aux_item_lens = metadata.get_buf_infos()
    disagg = DisaggregationMode(mode)
    server = None
    if disagg == DisaggregationMode.PREFILL:
        server = get_kv_class(backend, KVClassType.BOOTSTRAP_SERVER)(host="127.0.0.1", port=port)
    manager = get_kv_class(backend, KVClassType.MANAGER)(kv_args, disagg, server_args, False)
    return backend, manager, server


class _Request:
    """One request on one rank: its poller and every status it polled."""

    def __init__(self, room: int, poller: Any) -> None:
        self.room = room
        self.poller = poller
        self.walk: list[int] = [int(poller.poll())]
        self.started = False
        self.at: dict[str, float] = {}
        self.aux_room: int | None = None  # the decode's aux row when it saw Success

    def poll(self) -> int:
        status = int(self.poller.poll())
        if status != self.walk[-1]:
            self.walk.append(status)
        return status

    @property
    def final(self) -> bool:
        return self.walk[-1] in (_FAILED, _SUCCESS)

    def report(self) -> dict[str, Any]:
        reason = None
        if self.walk[-1] == _FAILED:
            try:
                self.poller.failure_exception()
            except Exception as exc:  # SGLang's KVTransferError
                reason = f"{type(exc).__name__}: {exc}"[:300]
        return {"room": self.room, "walk": self.walk, "at": self.at, "reason": reason}


def _drive(requests: list[_Request], step: Callable[[_Request, int], None], until: float) -> None:
    """The scheduler's loop: poll every unfinished request, act on its status."""
    while time.monotonic() < until:
        busy = False
        for request in requests:
            if request.final:
                continue
            busy = True
            step(request, request.poll())
        if not busy:
            return
        time.sleep(0.0005)


def prefill(plan: Plan) -> None:
    from sglang.srt.disaggregation.utils import KVClassType, get_kv_class

    backend, manager, _, metadata, server = setup(plan, "prefill")
    address = f"127.0.0.1:{plan.port}"
    emit(event="ready", manager=type(manager).__name__)

    def make(phase: str, i: int, room: int) -> _Request:
        _, _, aux = plan.layout(phase, i)
        metadata.bootstrap_room[aux, 0] = room
        sender = get_kv_class(backend, KVClassType.SENDER)(
            mgr=manager, bootstrap_addr=address, bootstrap_room=room
        )
        return _Request(room, sender)

    def run(phase: str, chunks: int, one_by_one: bool) -> list[_Request]:
        rooms = plan.rooms(phase)
        done: list[_Request] = []
        until = time.monotonic() + plan.deadline

        def step(request: _Request, status: int) -> None:
            if status == _WAITING and not request.started:
                src, _, aux = plan.layout(phase, rooms.index(request.room))
                request.started = True
                request.poller.init(len(src), aux)
                size = -(-len(src) // chunks)
                request.at["send"] = time.monotonic()
                for k in range(0, len(src), size):
                    request.poller.send(np.array(src[k : k + size], dtype=np.int32))
                    if phase == "kill":  # after the first chunk: the orchestrator kills us
                        emit(event="kill_me", room=request.room, at=time.monotonic())
                        time.sleep(600)
            if request.final:
                request.at["final"] = time.monotonic()

        if one_by_one:
            for i, room in enumerate(rooms):
                request = make(phase, i, room)
                _drive([request], step, until)
                done.append(request)
        else:
            done = [make(phase, i, room) for i, room in enumerate(rooms)]
            _drive(done, step, until)
        for request in done:
            if hasattr(request.poller, "clear"):
                request.poller.clear()
        return done

    for phase, chunks, one_by_one in (
        ("latency", 1, True),
        ("load", 1, False),
        ("bulk", plan.bulk_chunks, False),
    ):
        began = time.monotonic()
        done = run(phase, chunks, one_by_one)
        emit(event=phase, began=began, requests=[r.report() for r in done])
    if plan.kill:
        run("kill", plan.bulk_chunks, False)
    emit(event="end")
    time.sleep(2.0)  # the last answers reach the decode side
    if server is not None:
        server.close()
    os._exit(0)


def decode(plan: Plan) -> None:
    from sglang.srt.disaggregation.utils import KVClassType, get_kv_class

    backend, manager, buffers, metadata, _ = setup(plan, "decode")
    address = f"127.0.0.1:{plan.port}"
    emit(event="ready", manager=type(manager).__name__)
    until = time.monotonic() + plan.deadline
    while not manager.try_ensure_parallel_info(address):  # the pending queue
        if time.monotonic() > until:
            emit(event="error", error="the prefill never registered")
            os._exit(1)
        time.sleep(0.05)

    def make(room: int) -> _Request:
        receiver = get_kv_class(backend, KVClassType.RECEIVER)(
            mgr=manager, bootstrap_addr=address, bootstrap_room=room
        )
        receiver.init(0)
        return _Request(room, receiver)

    def run(phase: str, one_by_one: bool) -> tuple[float, list[_Request]]:
        rooms = plan.rooms(phase)
        done: list[_Request] = []
        until = time.monotonic() + plan.deadline

        def step(request: _Request, status: int) -> None:
            if status == _WAITING and not request.started:
                _, dst, aux = plan.layout(phase, rooms.index(request.room))
                request.started = True
                metadata.bootstrap_room[aux, 0] = 0
                request.poller.send_metadata(np.array(dst, dtype=np.int32), aux)
            if request.final:
                request.at["final"] = time.monotonic()
                if status == _SUCCESS:  # the scheduler's gate reads the row now
                    aux = plan.layout(phase, rooms.index(request.room))[2]
                    request.aux_room = int(metadata.bootstrap_room[aux, 0])

        began = time.monotonic()
        if one_by_one:
            for room in rooms:
                request = make(room)
                _drive([request], step, until)
                done.append(request)
        else:
            done = [make(room) for room in rooms]
            _drive(done, step, until)
        return began, done

    source = kv_pool(plan, plan.src_pages, fill=True)  # the prefill's bytes, made again
    for phase, one_by_one in (("latency", True), ("load", False), ("bulk", False)):
        began, done = run(phase, one_by_one)
        checks = [_check(plan, phase, i, r, buffers, source) for i, r in enumerate(done)]
        for request in done:
            if hasattr(request.poller, "clear"):
                request.poller.clear()
        emit(
            event=phase,
            began=began,
            requests=[{**r.report(), **c} for r, c in zip(done, checks, strict=True)],
        )
    if plan.kill:
        _, done = run("kill", False)
        emit(event="kill", requests=[r.report() for r in done])
    emit(event="end")
    os._exit(0)


def _check(
    plan: Plan,
    phase: str,
    i: int,
    request: _Request,
    buffers: list[torch.Tensor],
    source: list[torch.Tensor],
) -> dict[str, Any]:
    """Every page of a finished request against the prefill's bytes, and its aux row."""
    if request.walk[-1] != _SUCCESS:
        return {"wrong_pages": None, "aux_ok": None}
    src, dst, _ = plan.layout(phase, i)
    s, d = torch.tensor(src), torch.tensor(dst)
    wrong = torch.zeros(len(src), dtype=torch.bool)
    for theirs, ours in zip(source, buffers, strict=True):
        a = theirs.view(theirs.shape[0], -1).view(torch.int16)[s]
        b = ours.view(ours.shape[0], -1).view(torch.int16)[d]
        wrong |= ~(a == b).all(dim=1)
    return {
        "wrong_pages": int(wrong.sum()),
        "aux_ok": request.aux_room == request.room,
    }


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    role, path = args[0], args[1]
    with open(path) as f:
        plan = Plan(**json.load(f))
    os.environ.setdefault("SGLANG_HOST_IP", "127.0.0.1")
    from kvpoll.integrations.sglang import cpu

    cpu.install()
    from sglang.srt.plugins import load_plugins

    load_plugins()  # as every SGLang process does first: kvpoll's entry point among them
    {"prefill": prefill, "decode": decode}[role](plan)


if __name__ == "__main__":
    main()
