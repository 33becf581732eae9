"""Trust under load: a busy peer (or a busy self) is never a dead peer, and both
sides of every room end the same way. Real processes, real sockets."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from kvpoll import PagedPool, Receiver, StatusChange
from kvpoll import TransferStatus as S
from kvpoll.protocol import Sender
from tests.helpers import need_transport
from tests.load_peers import (
    BUFFERS,
    PAGE_SIZE,
    ROOM_PAGES,
    SCATTER_RANGES,
    SCATTER_ROOMS,
    SCATTER_ROW,
    flood_sender,
    layout,
    page_pattern,
    scatter_dest_pages,
    scatter_layout,
    scatter_sender,
    scatter_source_pages,
    scheduler_loop,
    source_pages,
)

FLOOD_SECONDS = 30.0
WINDOW = 256  # rooms the receiver keeps open at once: 256 x 8 MiB in flight


def _check_pages(pool: PagedPool, room: int, pages: list[int]) -> None:
    """The first and last page of the room, every buffer, against the sender's pattern."""
    sources = source_pages(room)
    for at in (0, ROOM_PAGES - 1):
        dst = pages[at]
        for b in range(BUFFERS):
            got = pool.buffers[b][dst * PAGE_SIZE : (dst + 1) * PAGE_SIZE]
            assert torch.equal(got, page_pattern(sources[at], b)), (room, at, b)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_receiver_flooded_over_tcp_for_30_s_is_never_declared_dead(spawn: Any) -> None:
    """Paged rooms of 8 MiB over ZMQ TCP, 64 in flight, for 30 s, with heartbeats of
    0.5 s: no room fails on either side and neither side loses its peer."""
    ctx, start = spawn
    info, control = ctx.Queue(), ctx.Queue()
    options = {"shm": False}
    start(flood_sender, "zmq", options, 0.5, info, control)
    address = info.get(timeout=120)
    pool = PagedPool.allocate(num_pages=WINDOW * ROOM_PAGES, **layout("zmq"))
    blocks = [list(range(i * ROOM_PAGES, (i + 1) * ROOM_PAGES)) for i in range(WINDOW)]
    open_rooms: dict[int, list[int]] = {}
    finals: dict[int, str] = {}
    stop = threading.Event()
    busy = threading.Thread(target=scheduler_loop, args=(stop,), daemon=True)
    busy.start()  # a serving engine's scheduler: pure Python, holding the GIL
    with Receiver("zmq", transport_options=options, heartbeat_interval=0.5) as rx:
        room = 0
        began = time.monotonic()
        while time.monotonic() - began < FLOOD_SECONDS or open_rooms:
            while blocks and time.monotonic() - began < FLOOD_SECONDS:
                pages = blocks.pop()
                rx.open(room, address, pool=pool, pages=pages)
                open_rooms[room] = pages
                room += 1
            for done, status in rx.wait_any(open_rooms, timeout=30).items():
                finals[done] = status.name
                if status is S.Success:
                    _check_pages(pool, done, open_rooms[done])
                blocks.append(open_rooms.pop(done))
                rx.remove(done)
            assert time.monotonic() - began < FLOOD_SECONDS + 120, "rooms stopped finishing"
        control.put(room)
        report = info.get(timeout=120)
        rx_lost = rx.stats["peers_lost"]
    stop.set()
    busy.join(10)
    failed = {r: s for r, s in finals.items() if s != "Success"}
    assert not failed, f"{len(failed)} of {room} rooms did not succeed here: {failed}"
    assert report["unfinished"] == []
    assert {r: s for r, s in report["finals"].items() if s != "Success"} == {}
    assert set(report["finals"]) == set(range(room)), "the sender's rooms differ"
    assert rx_lost == 0
    assert report["stats"]["peers_lost"] == 0
    assert room > WINDOW  # rooms kept flowing for the whole time


def test_a_busy_endpoint_does_not_judge_its_peer_dead() -> None:
    """The receiver's I/O thread is held for 5 heartbeat windows (an on_status
    callback that blocks): on waking it reads the sender's answers before it
    judges anyone, so the room succeeds and no peer is lost."""
    held: list[float] = []

    def stall(change: StatusChange) -> None:
        if change.dest is S.WaitingForInput and not held:
            held.append(time.monotonic())
            time.sleep(2.0)  # 5 windows of 0.1 s x 4

    options: dict[str, Any] = {"heartbeat_interval": 0.1, "heartbeat_misses": 4}
    with (
        Sender("zmq", **options) as tx,
        Receiver("zmq", on_status=stall, **options) as rx,
    ):
        data = torch.arange(64 * 8, dtype=torch.float32).view(64, 8)
        tx.add(1)
        rx.open(1, tx.address, row_shape=(8,), dtype=torch.float32, allocated_tokens=64)
        deadline = time.monotonic() + 10
        while not held and time.monotonic() < deadline:
            time.sleep(0.01)
        tx.send(1, data)
        assert rx.wait(1, timeout=20) is S.Success, rx.info(1).reason
        assert torch.equal(rx.result(1).tensor(), data)
        assert rx.stats["peers_lost"] == 0
        assert tx.stats["peers_lost"] == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("transport", ["ucx", "nixl", "mooncake"])
def test_2000_rooms_of_1000_scattered_ranges_in_flight_all_succeed(
    spawn: Any, transport: str
) -> None:
    """Every room opened and sent at once: 2,000,000 ranges handed to an engine
    transport together. Each keeps its engine's queues below their limits and the
    rest waits for its turn: no room fails, and every range lands. (zmq over TCP
    bounds its bytes the same way: the flood test above loads it harder.)"""
    need_transport(transport)
    ctx, start = spawn
    info, control = ctx.Queue(), ctx.Queue()
    options = {"shm": False} if transport == "zmq" else {}
    start(scatter_sender, transport, options, info, control)
    address = info.get(timeout=120)
    pool = PagedPool.allocate(num_pages=SCATTER_ROOMS * SCATTER_RANGES, **scatter_layout(transport))
    with Receiver(transport, transport_options=options) as rx:
        for room in range(SCATTER_ROOMS):
            rx.open(room, address, pool=pool, pages=scatter_dest_pages(room))
        control.put("go")
        left = set(range(SCATTER_ROOMS))
        finals: dict[int, str] = {}
        deadline = time.monotonic() + 300
        while left and time.monotonic() < deadline:
            for room, status in rx.wait_any(left, timeout=1).items():
                finals[room] = status.name
                left.discard(room)
        report = info.get(timeout=300)
        reasons = {r: rx.info(r).reason for r, s in finals.items() if s != "Success"}
    assert not left, f"{len(left)} rooms unfinished here"
    assert not reasons, f"{len(reasons)} rooms failed here, e.g. {next(iter(reasons.items()))}"
    assert not report["unfinished"]
    assert not report["reasons"], next(iter(report["reasons"].items()))
    source = (torch.arange(2 * SCATTER_RANGES * SCATTER_ROW) % 253).to(torch.uint8)
    source = source.view(-1, SCATTER_ROW)
    src_pages = scatter_source_pages()
    for room in range(0, SCATTER_ROOMS, 97):
        dst = scatter_dest_pages(room)
        for i in range(0, SCATTER_RANGES, 37):
            assert torch.equal(pool.buffers[0][dst[i]], source[src_pages[i]]), (room, i)
