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
