"""The demo's processes: one sender ("encoder") and N receivers ("language model").

Each runs in its own process, reports every status step of its rooms to the
orchestrator through a queue, and obeys commands from another queue. Data is
random but reproducible: both sides derive it from the room and a seed, so the
receiver can check what arrived bit for bit.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Settings:
    transport: str
    options: dict[str, Any]
    hidden: int
    dtype: str
    capacity: int
    destinations: int
    heartbeat: float
    misses: int
    seed: int
    paged: bool = False
    page_size: int = 16
    max_tokens: int = 5000


@dataclass(frozen=True)
class RoomSpec:
    room: int
    tokens: int
    auto_resume: bool = True


def make_data(spec: RoomSpec, settings: Settings) -> torch.Tensor:
    """The room's data, the same in every process."""
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + spec.room)
    return torch.randn(spec.tokens, settings.hidden, generator=gen).to(DTYPES[settings.dtype])


POSITIONS = 3  # the second buffer of a paged pool: positions per token (like mrope's)
AUX = 4  # an aux row: room, tokens, seed, a check value


def make_positions(spec: RoomSpec) -> torch.Tensor:
    """The second buffer's data for a paged room."""
    base = torch.arange(spec.tokens, dtype=torch.int32).unsqueeze(1)
    return base * POSITIONS + torch.arange(POSITIONS, dtype=torch.int32) + spec.room


def make_aux(spec: RoomSpec, settings: Settings) -> torch.Tensor:
    return torch.tensor(
        [spec.room, spec.tokens, settings.seed, spec.room * 7919], dtype=torch.int64
    )


def make_pool(settings: Settings, pages: int) -> Any:
    """A pool like an engine's: embeddings and positions per token, one aux row per request."""
    from kvpoll.memory import PagedPool

    return PagedPool.allocate(
        num_pages=pages,
        page_size=settings.page_size,
        buffers=[((settings.hidden,), DTYPES[settings.dtype]), ((POSITIONS,), torch.int32)],
        aux=[(4, (AUX,), torch.int64)],
        transport=settings.transport,
    )


def scattered_pages(count: int, pages: int, seed: int) -> list[int]:
    """``count`` distinct pages of ``pages``, mostly not consecutive (as an allocator hands out)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(pages, generator=gen)[:count].tolist()


Events = "multiprocessing.queues.Queue[dict[str, Any]]"


def _on_status(events: Any, who: str) -> Any:
    def report(change: Any) -> None:
        record = asdict(change)
        record.update(kind="status", who=who, source=change.source.name, dest=change.dest.name)
        events.put(record)

    return report


def sender_main(settings: Settings, commands: Any, events: Any) -> None:
    """Run the sender until told to exit (or killed)."""
    from kvpoll.protocol import Sender

    logging.basicConfig(level=logging.ERROR)
    keep: dict[int, torch.Tensor] = {}
    tx = Sender(
        settings.transport,
        transport_options=settings.options,
        heartbeat_interval=settings.heartbeat,
        heartbeat_misses=settings.misses,
        on_status=_on_status(events, "encoder"),
    )
    try:
        events.put({"kind": "ready", "who": "encoder", "address": tx.address})
        ps = settings.page_size
        pool = make_pool(settings, 2 * -(-settings.max_tokens // ps)) if settings.paged else None
        while True:
            command = commands.get(timeout=600)
            if command[0] == "exit":
                break
            spec: RoomSpec = command[1]
            keep[spec.room] = make_data(spec, settings)
            tx.add(spec.room, required_destinations=settings.destinations)
            events.put({"kind": "sending", "who": "encoder", "room": spec.room, "at": time.time()})
            if pool is None:
                tx.send(spec.room, keep[spec.room], aux=f"room {spec.room}".encode())
            else:
                _stream(tx, pool, spec, settings, keep[spec.room])
    finally:
        tx.close()


def _stream(tx: Any, pool: Any, spec: RoomSpec, settings: Settings, data: torch.Tensor) -> None:
    """Chunked prefill: the room's pages are computed in pieces and sent as each is ready."""
    ps = settings.page_size
    pages = scattered_pages(-(-spec.tokens // ps), pool.num_pages, spec.room)
    positions = make_positions(spec)
    pool.aux[0][spec.room % 4] = make_aux(spec, settings)
    pieces = 3
    per_piece = -(-len(pages) // pieces)
    for i in range(0, len(pages), per_piece):
        chunk = pages[i : i + per_piece]
        first = i * ps
        for j, page in enumerate(chunk):  # "compute" the pages
            lo, hi = first + j * ps, min(first + (j + 1) * ps, spec.tokens)
            pool.buffers[0][page * ps : page * ps + hi - lo] = data[lo:hi]
            pool.buffers[1][page * ps : page * ps + hi - lo] = positions[lo:hi]
        last = i + per_piece >= len(pages)
        tx.send(
            spec.room,
            pages=chunk,
            pool=pool,
            is_last=last,
            tokens=min(len(chunk) * ps, spec.tokens - first),
            aux_index=spec.room % 4 if last else None,
            aux=f"room {spec.room}".encode() if i == 0 else b"",
        )
        time.sleep(0.02)  # the next prefill chunk takes a while


def receiver_main(settings: Settings, rank: int, commands: Any, events: Any) -> None:
    """Run receiver ``rank`` until told to exit; its first command names the sender."""
    from kvpoll.protocol import Receiver

    logging.basicConfig(level=logging.ERROR)
    who = f"lm rank {rank}"
    first = commands.get(timeout=600)
    if first[0] != "sender":
        return
    sender: str = first[1]
    rx = Receiver(
        settings.transport,
        transport_options=settings.options,
        heartbeat_interval=settings.heartbeat,
        heartbeat_misses=settings.misses,
        on_status=_on_status(events, who),
    )
    dtype = DTYPES[settings.dtype]
    try:
        events.put({"kind": "ready", "who": who, "address": rx.address})
        while True:
            try:
                command = commands.get(timeout=600)
            except queue.Empty:
                break
            if command[0] == "exit":
                break
            spec: RoomSpec = command[1]
            limit: float = command[2]
            start = time.time()
            if settings.paged:
                _receive_paged(rx, spec, settings, rank, sender, limit, start, events, who)
                continue
            rx.open(
                spec.room,
                sender,
                row_shape=(settings.hidden,),
                dtype=dtype,
                allocated_tokens=settings.capacity,
                rank=rank,
                auto_resume=spec.auto_resume,
            )
            status = rx.wait(spec.room, limit)
            done = time.time()
            info = rx.info(spec.room)
            matched = None
            nbytes = 0
            if status.name == "Success":
                got = rx.result(spec.room).tensor()
                expected = make_data(spec, settings)
                matched = got.shape == expected.shape and torch.equal(
                    got.contiguous().view(torch.uint8), expected.view(torch.uint8)
                )
                nbytes = got.numel() * got.element_size()
            _done(
                events,
                who,
                spec,
                status.name,
                info.reason,
                matched,
                nbytes,
                start,
                done,
                len(rx.chunks(spec.room)),
            )
            rx.remove(spec.room)
    finally:
        rx.close()


def _done(
    events: Any,
    who: str,
    spec: RoomSpec,
    status: str,
    reason: str | None,
    matched: bool | None,
    nbytes: int,
    start: float,
    done: float,
    chunks: int,
) -> None:
    """Tell the orchestrator how a room ended on this side."""
    events.put(
        {
            "kind": "done",
            "who": who,
            "room": spec.room,
            "status": status,
            "reason": reason,
            "matched": matched,
            "bytes": nbytes,
            "seconds": done - start,
            "at": done,
            "chunks": chunks,
        }
    )


def _receive_paged(
    rx: Any,
    spec: RoomSpec,
    settings: Settings,
    rank: int,
    sender: str,
    limit: float,
    start: float,
    events: Any,
    who: str,
) -> None:
    """Offer ``capacity`` tokens of pages; each time they are full, take the data out
    and offer the same pages again (a decode worker short of memory)."""
    pool = _RECEIVE_POOLS.get(rank)
    ps = settings.page_size
    count = max(1, settings.capacity // ps)
    if pool is None:
        pool = _RECEIVE_POOLS[rank] = make_pool(settings, count + 8)
    pages = scattered_pages(count, pool.num_pages, 1000 + spec.room)
    aux_row = spec.room % 4
    pool.aux[0][aux_row] = 0
    taken: list[tuple[torch.Tensor, torch.Tensor]] = []
    offered, delivered = count * ps, 0
    rx.open(spec.room, sender, pool=pool, pages=pages, aux_index=aux_row, rank=rank)
    deadline = time.monotonic() + limit
    status = rx.poll(spec.room)
    while not status.is_final and time.monotonic() < deadline:
        info = rx.info(spec.room)
        if info.status.name == "Transferring" and info.sent_tokens == offered and spec.auto_resume:
            n = info.sent_tokens - delivered
            taken.append((pool.gather(0, pages, n), pool.gather(1, pages, n)))
            delivered = info.sent_tokens
            rx.resume(spec.room, pages=pages)
            offered += count * ps
        time.sleep(0.002)
        status = rx.poll(spec.room)
    done = time.time()
    info = rx.info(spec.room)
    matched = None
    nbytes = 0
    if status.name == "Success":
        n = info.sent_tokens - delivered
        taken.append((pool.gather(0, pages, n), pool.gather(1, pages, n)))
        got = torch.cat([t[0] for t in taken])
        positions = torch.cat([t[1] for t in taken])
        expected = make_data(spec, settings)
        matched = (
            got.shape == expected.shape
            and torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
            and torch.equal(positions, make_positions(spec))
            and torch.equal(pool.aux[0][aux_row], make_aux(spec, settings))
        )
        nbytes = info.metrics.bytes_moved
    chunks = sum(1 for t in info.history if t.event.value in ("chunk_sent", "last_chunk_sent"))
    _done(events, who, spec, status.name, info.reason, matched, nbytes, start, done, chunks)
    rx.remove(spec.room)


_RECEIVE_POOLS: dict[int, Any] = {}
