"""A room's last chunk message rides with its data (``write_batch(..., notice=)``):
the receiver has Success once the bytes are there, without waiting for the
writer to learn that its write completed and only then send the chunk."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from kvpoll import Receiver, Sender, TransferStatus
from kvpoll.transports import resolve
from kvpoll.transports.base import TransportEvent, WriteDone
from tests.helpers import need_transport, raw_dealer, wait_until

ROW = 256
PATHS = {  # name -> (transport, its options)
    "zmq-shm": ("zmq", {}),
    "zmq-tcp": ("zmq", {"shm": False}),
    "ucx": ("ucx", {}),
    "loopback": ("loopback", {}),
}


def holding(name: str, *, notices: bool = True) -> type[Any]:
    """A real transport whose WriteDone events are kept from its endpoint until
    ``confirm`` is set (as when the confirmation is slow to come back)."""
    base: Any = resolve(name)

    class Holding(base):  # type: ignore[misc]
        capabilities = dataclasses.replace(base.capabilities, notices=notices)

        def __init__(self, **options: Any) -> None:
            super().__init__(**options)
            self.confirm = threading.Event()
            self.held: list[WriteDone] = []

        def progress(self, timeout: float) -> list[TransportEvent]:
            events = super().progress(timeout)
            kept = [e for e in events if not isinstance(e, WriteDone)]
            self.held += [e for e in events if isinstance(e, WriteDone)]
            if self.confirm.is_set():
                kept += self.held
                self.held = []
            return kept

    return Holding


@pytest.fixture(params=list(PATHS))
def path(request: pytest.FixtureRequest) -> str:
    name = PATHS[request.param][0]
    need_transport(name)
    return str(request.param)


@contextlib.contextmanager
def pair(path: str, notices: bool) -> Iterator[tuple[Sender, Receiver, Any]]:
    name, options = PATHS[path]
    writer = holding(name, notices=notices)(**options)
    tx = Sender(writer)
    rx = Receiver(resolve(name)(**options))
    try:
        yield tx, rx, writer
    finally:
        writer.confirm.set()
        rx.close()
        tx.close()


def data(room: int, rows: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(room)
    return torch.randint(0, 256, (rows, ROW), dtype=torch.uint8, generator=gen)


def test_the_receiver_succeeds_before_the_writer_hears_back(path: str) -> None:
    with pair(path, notices=True) as (tx, rx, writer):
        tx.add(7)
        tx.send(7, data(7))
        rx.open(7, tx.address, row_shape=(ROW,), dtype=torch.uint8, allocated_tokens=3)
        assert rx.wait(7, 10) is TransferStatus.Success
        assert torch.equal(rx.result(7).tensor(), data(7))  # the bytes were there with it
        wait_until(lambda: writer.held, what="the write's confirmation at the sender")
        assert tx.poll(7) is TransferStatus.WaitingForInput  # it is held from the sender
        writer.confirm.set()
        assert tx.wait(7, 10) is TransferStatus.Success
        assert tx.info(7).sent_tokens == 3


def test_without_notices_the_chunk_waits_for_the_confirmation(path: str) -> None:
    with pair(path, notices=False) as (tx, rx, writer):
        tx.add(8)
        tx.send(8, data(8))
        rx.open(8, tx.address, row_shape=(ROW,), dtype=torch.uint8, allocated_tokens=3)
        assert rx.wait(8, 1.0) is not TransferStatus.Success
        writer.confirm.set()
        assert rx.wait(8, 10) is TransferStatus.Success
        assert torch.equal(rx.result(8).tensor(), data(8))
        assert tx.wait(8, 10) is TransferStatus.Success


def test_only_the_last_chunk_rides_with_its_data(path: str) -> None:
    """Memory for 2 of 5 rows: two chunks go the usual way (each confirmed, then
    announced, then resumed), the last one with its data."""
    with pair(path, notices=True) as (tx, rx, writer):
        writer.confirm.set()
        tx.add(9)
        tx.send(9, data(9, 5))
        rx.open(9, tx.address, row_shape=(ROW,), dtype=torch.uint8, allocated_tokens=2)
        assert rx.wait(9, 10) is TransferStatus.Success
        got = torch.cat(rx.chunks(9))
        assert torch.equal(got, data(9, 5))
        assert tx.wait(9, 10) is TransferStatus.Success
        steps = [str(t.event) for t in rx.info(9).history]
        assert steps == [
            "bootstrapped",
            "chunk_sent",
            "resumed",
            "chunk_sent",
            "resumed",
            "last_chunk_sent",
        ]


def test_a_notice_that_cannot_be_sent_fails_its_write_alone() -> None:
    """Shared memory: the bytes are copied, then the notice cannot go (here: the
    destination names no reachable address); that write fails, progress() goes on."""
    from kvpoll.transports.base import Span
    from kvpoll.transports.zmq_transport import ZmqTransport

    a, b = ZmqTransport(), ZmqTransport()
    try:
        src = a.register(data(1, 1).reshape(-1))
        dst = b.allocate(ROW)
        astray = dst.descriptor.model_copy(update={"endpoint": "ipc://nowhere"})
        b._segments[dst.descriptor.region_id].claim("ipc://nowhere")  # its memory, astray
        failed = a.write_batch([Span(src, 0, astray, 0, ROW)], b"notice")
        fine = a.write_batch([Span(src, 0, dst.descriptor, 0, ROW)], b"notice")
        done: dict[int, WriteDone] = {}
        for _ in range(200):
            done.update((e.write_id, e) for e in a.progress(0.01) if isinstance(e, WriteDone))
            if len(done) == 2:
                break
        assert not done[failed].ok
        assert "notice" in (done[failed].error or "")
        assert done[fine].ok
    finally:
        a.close()
        b.close()


def test_ucx_holds_a_bounded_amount_of_notices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests whose data never comes hold their notices until they expire: each
    notice and their sum are bounded; a request past either is refused, and the
    budget comes back when held requests expire."""
    need_transport("ucx")
    import struct
    import time

    import zmq

    from kvpoll.transports import ucx_transport

    monkeypatch.setattr(ucx_transport, "MAX_NOTICE_BYTES", 500)
    monkeypatch.setattr(ucx_transport, "MAX_HELD_NOTICE_BYTES", 1000)
    t = ucx_transport.UcxTransport(write_timeout=1.0)
    ctx = zmq.Context()
    sock = raw_dealer(ctx, t.address, "tcp://127.0.0.1:9")
    try:
        dst = t.allocate(8 * 4096)
        rid = dst.descriptor.region_id

        def request(i: int, notice: bytes) -> None:
            head = struct.pack("<QQ", i, 1)
            sock.send_multipart(
                [b"U", head + struct.pack("<QQQQ", rid, 0, 4096, 7 << 32 | i), notice]
            )

        def settle(rejected: int) -> None:
            deadline = time.monotonic() + 10
            while t.stats["rejected_writes"] < rejected or t.stats["receives_posted"] < 1:
                assert time.monotonic() < deadline, t.stats
                t.progress(0.01)

        for i, size in enumerate((400, 400, 400, 600, 100)):  # the 3rd: over the sum; 4th: too big
            request(i, b"n" * size)
        settle(2)
        time.sleep(0.2)
        t.progress(0.01)
        assert t.stats["rejected_writes"] == 2
        deadline = time.monotonic() + 15  # the held ones expire after the write time-out
        while t.stats["receives_expired"] < 3:
            assert time.monotonic() < deadline, t.stats
            t.progress(0.05)
        while t.stats["receives_posted"]:
            assert time.monotonic() < deadline, t.stats
            t.progress(0.05)
        request(9, b"n" * 400)  # the budget is back
        while not t.stats["receives_posted"]:  # the request was handled (either way)
            assert time.monotonic() < deadline, t.stats
            t.progress(0.01)
        assert t.stats["rejected_writes"] == 2
    finally:
        sock.close()
        ctx.term()
        t.close()
