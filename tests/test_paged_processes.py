"""Paged rooms between real processes: streaming with resumes, 10,000 rooms at
constant descriptors and mappings, views that survive everything, hostile memory."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch

from kvpoll import Receiver, Sender
from kvpoll import TransferStatus as S
from tests.helpers import need_transport
from tests.paged_peers import (
    HIDDEN,
    PS,
    hostile_receiver,
    many_rooms_sender,
    out_of_descriptors,
    pool_of,
    room_data,
    streaming_sender,
    views_after_everything,
)


@pytest.mark.parametrize("transport", ["zmq", "ucx"])
def test_streamed_pages_interleave_with_resumes_between_processes(
    spawn: Any, transport: str
) -> None:
    need_transport(transport)
    ctx, start = spawn
    info = ctx.Queue()
    rooms = {1: 300, 2: 170, 3: 16}  # 19, 11 and 1 pages, streamed 3 pages at a time
    start(streaming_sender, transport, rooms, info, 0.05)
    address = info.get(timeout=120)
    pool = pool_of(12, transport)
    offers = {1: [0, 1, 2, 3], 2: [4, 5, 6, 7, 8], 3: [9]}  # 64, 80 and 16 tokens at a time
    with Receiver(transport, heartbeat_interval=0.2) as rx:
        for room, pages in offers.items():
            rx.open(room, address, pool=pool, pages=pages)
        taken: dict[int, list[torch.Tensor]] = {room: [] for room in rooms}
        resumes = dict.fromkeys(rooms, 0)
        deadline = time.monotonic() + 60
        while not all(rx.poll(r) is S.Success for r in rooms):
            assert time.monotonic() < deadline, {r: rx.poll(r).name for r in rooms}
            for room, pages in offers.items():
                info_ = rx.info(room)
                assert info_.status is not S.Failed, info_.reason
                capacity = len(pages) * PS
                if info_.status is S.Transferring and info_.sent_tokens == capacity * (
                    resumes[room] + 1
                ):
                    taken[room].append(pool.gather(0, pages))
                    resumes[room] += 1
                    rx.resume(room, pages=pages)
            time.sleep(0.001)
        for room, tokens in rooms.items():
            rest = tokens - sum(t.shape[0] for t in taken[room])
            got = torch.cat([*taken[room], pool.gather(0, offers[room], rest)])
            assert torch.equal(got, room_data(room, tokens)[0]), f"room {room}"
            history = [t.dest.name for t in rx.info(room).history]
            assert history.count("Success") == 1
        assert resumes == {1: 4, 2: 2, 3: 0}


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ten_thousand_paged_rooms_at_constant_descriptors_and_mappings(spawn: Any) -> None:
    ctx, start = spawn
    count = 10_000
    info = ctx.Queue()
    start(many_rooms_sender, "zmq", count, info)
    address = info.get(timeout=120)
    pool = pool_of(count)
    expected = torch.arange(count * PS * HIDDEN, dtype=torch.float32).view(-1, HIDDEN)
    with Receiver("zmq", heartbeat_interval=1.0) as rx:
        warm = 200
        info.put((0, warm))
        for room in range(warm):
            rx.open(room, address, pool=pool, pages=[room])
        for room in range(warm):
            assert rx.wait(room, 60) is S.Success
            rx.remove(room)
        fds, mappings = _fds(), _mappings()
        info.put((warm, count - warm))
        for room in range(warm, count):
            rx.open(room, address, pool=pool, pages=[room])
        assert len(rx.rooms()) == count - warm
        peak = (_fds(), _mappings())
        for room in range(warm, count):
            status = rx.wait(room, 120)
            assert status is S.Success, (room, status, rx.info(room).reason)
        after = (_fds(), _mappings())
        assert torch.equal(pool.buffers[0], expected)
    # The rooms held nothing of their own: no descriptor or mapping per room.
    assert peak[0] - fds <= 2, (fds, peak, after)
    assert after[0] - fds <= 2, (fds, peak, after)
    assert peak[1] - mappings <= 8, (mappings, peak, after)
    assert after[1] - mappings <= 8, (mappings, peak, after)


@pytest.mark.parametrize("transport", ["zmq"])
def test_views_stay_readable_after_abort_kill_remove_and_close(spawn: Any, transport: str) -> None:
    ctx, _ = spawn
    out = ctx.Queue()
    proc = ctx.Process(target=views_after_everything, args=(transport, out))  # it has a child
    proc.start()
    try:
        proc.join(120)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
    assert proc.exitcode == 0, f"the child died with exit code {proc.exitcode}"
    status, total, views = out.get(timeout=10)
    assert status == "ok"
    assert views >= 4
    assert total == total  # every view was read, and held numbers (not NaN)


def test_hostile_memory_fails_only_its_room_and_the_sender_lives(spawn: Any) -> None:
    ctx, start = spawn
    tricks = {"symlink": 11, "truncated": 12, "forged-size": 13, "not-its-memory": 14}
    tricks["out-of-bounds"] = 15
    with Sender("zmq", heartbeat_interval=0.2) as tx, Receiver("zmq", heartbeat_interval=0.2) as rx:
        data = room_data(0, 64)[0]
        for room in (*tricks.values(), 99):
            tx.add(room)
            tx.send(room, data)
        info = ctx.Queue()
        hostile = start(hostile_receiver, tx.address, tricks, info)
        _, secret = info.get(timeout=60)
        assert hostile.is_alive()
        for trick in ("symlink", "truncated", "forged-size"):
            room = tricks[trick]
            assert tx.wait(room, 30) is S.Failed, trick
            assert "cannot reach the destination" in (tx.info(room).reason or "") or (
                "outside its segment" in (tx.info(room).reason or "")
            ), (trick, tx.info(room).reason)
        time.sleep(0.5)
        for trick in ("not-its-memory", "out-of-bounds"):  # refused at bootstrap
            assert tx.poll(tricks[trick]) is S.Bootstrapping, trick
        assert tx.stats["rejected"] >= 2
        with open(secret, "rb") as f:
            assert set(f.read()) == {0}  # nothing was written through the symlink
        # the sender lives: another room still succeeds, its data bit for bit
        rx.open(99, tx.address, row_shape=(HIDDEN,), dtype=torch.float32, allocated_tokens=64)
        assert rx.wait(99, 30) is S.Success
        assert torch.equal(rx.result(99).tensor(), data)
        assert tx.stats["internal_errors"] == 0


def test_running_out_of_descriptors_is_a_typed_error_and_harms_nothing(spawn: Any) -> None:
    ctx, start = spawn
    out = ctx.Queue()
    proc = start(out_of_descriptors, out)
    status, error, opened = out.get(timeout=120)
    proc.join(30)
    assert proc.exitcode == 0
    assert status == "ok"
    assert "exhausted" in error
    assert opened >= 1
