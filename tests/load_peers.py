"""Peer processes for the load tests (run with multiprocessing's spawn).

A flood: the sender process streams paged rooms (scattered pages of a pool,
several buffers per page) as fast as the receiver offers memory; the receiver
(the test's process) keeps a window of rooms open. Each sender page holds a
pattern derived from its index, so the receiver checks what landed without
hearing from the sender.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

PAGE_SIZE = 16
ROW = 1024  # bf16 values per token and buffer: 2 KiB
BUFFERS = 4  # 4 x 16 x 2 KiB = 128 KiB a page
SOURCE_PAGES = 256
ROOM_PAGES = 64


def layout(transport: str) -> dict[str, Any]:
    return {
        "page_size": PAGE_SIZE,
        "buffers": [((ROW,), torch.bfloat16)] * BUFFERS,
        "transport": transport,
    }


def source_pages(room: int) -> list[int]:
    """The sender's pages room ``room`` reads, in room order (distinct, scattered)."""
    return random.Random(room).sample(range(SOURCE_PAGES), ROOM_PAGES)


def page_pattern(page: int, buffer: int) -> torch.Tensor:
    """What buffer ``buffer`` of source page ``page`` holds: [PAGE_SIZE, ROW] bf16."""
    base = torch.arange(PAGE_SIZE * ROW, dtype=torch.float32).view(PAGE_SIZE, ROW)
    return ((base + page * 7 + buffer * 131) % 251).to(torch.bfloat16)


def fill(pool: Any) -> None:
    for page in range(SOURCE_PAGES):
        for b in range(BUFFERS):
            pool.buffers[b][page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = page_pattern(page, b)


def scheduler_loop(stop: Any) -> None:
    """Busy pure-Python work until ``stop`` is set, as a serving engine's scheduler
    does between its polls (it competes with the I/O thread for the GIL)."""
    x = 0
    while not stop.is_set():
        for i in range(10_000):
            x = (x + i * i) % 1_000_003


def flood_sender(
    transport: str, options: dict[str, Any], heartbeat: float, info: Any, control: Any
) -> None:
    """Add and send rooms 0, 1, 2, ... (at most 256 unfinished at once) until
    ``control`` says how many the receiver opened; then report those rooms' final
    statuses and the sender's counters, and serve until killed."""
    import contextlib
    import queue

    from kvpoll import PagedPool, Sender

    tx = Sender(transport, transport_options=options, heartbeat_interval=heartbeat)
    pool = PagedPool.allocate(num_pages=SOURCE_PAGES, **layout(transport))
    fill(pool)
    tx.register(pool)
    import threading

    stop = threading.Event()
    threading.Thread(target=scheduler_loop, args=(stop,), daemon=True).start()
    info.put(tx.address)
    unfinished: set[int] = set()
    finals: dict[int, str] = {}
    room = 0
    opened: int | None = None
    while opened is None:
        with contextlib.suppress(queue.Empty):
            opened = control.get_nowait()
        while len(unfinished) < 256:
            tx.add(room)
            tx.send(room, pages=source_pages(room), pool=pool, is_last=True)
            unfinished.add(room)
            room += 1
        for done, status in tx.wait_any(unfinished, timeout=0.2).items():
            finals[done] = status.name
            unfinished.discard(done)
            tx.remove(done)
    deadline = time.monotonic() + 60
    waiting = {r for r in unfinished if r < opened}
    while waiting and time.monotonic() < deadline:
        for done, status in tx.wait_any(waiting, timeout=1).items():
            finals[done] = status.name
            waiting.discard(done)
    info.put(
        {
            "finals": {r: s for r, s in finals.items() if r < opened},
            "unfinished": sorted(waiting),
            "stats": tx.stats,
        }
    )
    time.sleep(600)


SCATTER_ROOMS = 2000
SCATTER_RANGES = 1000
SCATTER_ROW = 64  # bytes of one page (one token): a range each


def scatter_layout(transport: str) -> dict[str, Any]:
    return {
        "page_size": 1,
        "buffers": [((SCATTER_ROW,), torch.uint8)],
        "transport": transport,
    }


def scatter_source_pages() -> list[int]:
    """The sender's pages every room reads: every other page, so none is consecutive."""
    return list(range(0, 2 * SCATTER_RANGES, 2))


def scatter_dest_pages(room: int) -> list[int]:
    """Room ``room``'s pages at the receiver: one in every ``SCATTER_ROOMS``."""
    return [room + SCATTER_ROOMS * i for i in range(SCATTER_RANGES)]


def scatter_sender(transport: str, options: dict[str, Any], info: Any, control: Any) -> None:
    """Add every room, then send each (its 1,000 scattered pages) once told to,
    all at once; report the final statuses and counters."""
    from kvpoll import PagedPool, Sender

    tx = Sender(transport, transport_options=options)
    pool = PagedPool.allocate(num_pages=2 * SCATTER_RANGES, **scatter_layout(transport))
    pool.buffers[0].copy_(
        (torch.arange(2 * SCATTER_RANGES * SCATTER_ROW) % 253).to(torch.uint8).view(-1, SCATTER_ROW)
    )
    tx.register(pool)
    rooms = list(range(SCATTER_ROOMS))
    for room in rooms:
        tx.add(room)
    info.put(tx.address)
    control.get(timeout=300)  # every room is open at the receiver
    pages = scatter_source_pages()
    for room in rooms:
        tx.send(room, pages=pages, pool=pool, is_last=True)
    finals: dict[int, str] = {}
    deadline = time.monotonic() + 240
    left = set(rooms)
    while left and time.monotonic() < deadline:
        for room, status in tx.wait_any(left, timeout=1).items():
            finals[room] = status.name
            left.discard(room)
    reasons = {r: tx.info(r).reason for r, s in finals.items() if s != "Success"}
    info.put({"finals": finals, "unfinished": sorted(left), "reasons": reasons, "stats": tx.stats})
    time.sleep(600)
