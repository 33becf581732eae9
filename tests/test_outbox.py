"""open() without a round trip to the I/O thread: the room is made on the caller's
thread and its bootstrap waits in the outbox for the I/O thread's next turn."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

from kvpoll import DuplicateRoom, PagedPool, Receiver, Sender, TransferStatus
from kvpoll.protocol.endpoint import EndpointClosed
from kvpoll.transports.base import TransportError, TransportEvent
from kvpoll.transports.zmq_transport import ZmqTransport

ROW = 64


class Stalling(ZmqTransport):
    """A real zmq transport whose progress() can be held (the I/O thread stalls there,
    outside the endpoint's lock, as it would behind a slow peer or a long batch)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.go = threading.Event()
        self.go.set()
        self.stalled = threading.Event()

    def progress(self, timeout: float) -> list[TransportEvent]:
        if not self.go.is_set():
            self.stalled.set()
            self.go.wait(30)
        return super().progress(timeout)

    def stall(self) -> None:
        self.stalled.clear()
        self.go.clear()
        assert self.stalled.wait(10), "the I/O thread did not come round"


@pytest.fixture
def stalled_pair() -> Iterator[tuple[Sender, Receiver, Stalling]]:
    transport = Stalling()
    tx = Sender("zmq")
    rx = Receiver(transport, command_timeout=3)
    try:
        yield tx, rx, transport
    finally:
        transport.go.set()
        rx.close()
        tx.close()


def rows(room: int, count: int = 2) -> torch.Tensor:
    return torch.full((count, ROW), room % 251, dtype=torch.uint8)


def open_room(rx: Receiver, tx: Sender, room: int) -> None:
    rx.open(room, tx.address, row_shape=(ROW,), dtype=torch.uint8, allocated_tokens=2)


def first_room(tx: Sender, rx: Receiver) -> None:
    """Room 0, through the I/O thread: it makes the arena and offers it to the sender."""
    tx.add(0)
    tx.send(0, rows(0))
    open_room(rx, tx, 0)
    assert rx.wait(0, 10) is TransferStatus.Success


def test_open_does_not_wait_for_a_busy_io_thread(
    stalled_pair: tuple[Sender, Receiver, Stalling],
) -> None:
    tx, rx, transport = stalled_pair
    first_room(tx, rx)
    sent = rx.stats["messages_out"]

    transport.stall()
    rooms = range(1, 201)
    for room in rooms:  # each would wait 3 s (then raise) if it needed the stalled thread
        open_room(rx, tx, room)
    assert all(rx.poll(room) is TransferStatus.Bootstrapping for room in rooms)
    assert rx.stats["messages_out"] == sent  # nothing went out: the bootstraps wait
    with pytest.raises(DuplicateRoom):  # still checked at once
        open_room(rx, tx, 5)

    for room in rooms:
        tx.add(room)
        tx.send(room, rows(room))
    transport.go.set()
    for room in rooms:
        assert rx.wait(room, 20) is TransferStatus.Success, rx.info(room).reason
        assert torch.equal(rx.result(room).tensor(), rows(room))
    assert rx.stats["messages_out"] == sent + len(rooms)
    # they left together: 128 control messages in one ZMQ message, then the other 72
    assert rx.stats["control_batches"] == 2


def test_paged_open_does_not_wait_for_a_busy_io_thread(
    stalled_pair: tuple[Sender, Receiver, Stalling],
) -> None:
    tx, rx, transport = stalled_pair
    pool = PagedPool.allocate(num_pages=64, page_size=4, buffers=[((ROW,), torch.uint8)])
    rx.register(pool)
    data = torch.arange(8 * ROW, dtype=torch.int64).remainder(251).to(torch.uint8)
    data = data.reshape(8, ROW)
    tx.add(1)
    tx.send(1, data)
    rx.open(1, tx.address, pages=[0, 1])  # offers the pool: through the I/O thread
    assert rx.wait(1, 10) is TransferStatus.Success

    transport.stall()
    rx.open(2, tx.address, pages=[7, 3])  # the pool is known to the sender: no wait
    assert rx.poll(2) is TransferStatus.Bootstrapping
    tx.add(2)
    tx.send(2, data)
    transport.go.set()
    assert rx.wait(2, 10) is TransferStatus.Success
    assert torch.equal(pool.gather(0, [7, 3]), data)


def test_queued_bootstraps_go_out_before_later_commands(
    stalled_pair: tuple[Sender, Receiver, Stalling],
) -> None:
    tx, rx, transport = stalled_pair
    first_room(tx, rx)
    tx.add(1)

    transport.stall()
    open_room(rx, tx, 1)
    done = threading.Event()

    def abort() -> None:  # a command: it runs once the thread is back
        rx.abort(1, "changed its mind")
        done.set()

    aborter = threading.Thread(target=abort)
    aborter.start()
    transport.go.set()
    aborter.join(10)
    assert done.is_set()
    # the sender saw the bootstrap, then the abort (in that order, or the abort of a
    # room it had no receiver for would leave it waiting)
    assert tx.wait(1, 10) is TransferStatus.Failed
    assert "changed its mind" in (tx.info(1).reason or "")
    assert rx.poll(1) is TransferStatus.Failed


def test_a_room_that_ends_before_its_bootstrap_leaves_sends_none(
    stalled_pair: tuple[Sender, Receiver, Stalling],
) -> None:
    tx, rx, transport = stalled_pair
    first_room(tx, rx)
    sent = rx.stats["messages_out"]

    transport.stall()
    open_room(rx, tx, 1)
    with rx._lock:  # as the I/O thread's time-out check would, before its next turn
        rx._fail(1, rx._rooms[1], "timed out", tell=False)
    transport.go.set()
    open_room(rx, tx, 2)
    tx.add(2)
    tx.send(2, rows(2))
    assert rx.wait(2, 10) is TransferStatus.Success
    assert rx.stats["messages_out"] == sent + 1  # room 2's bootstrap only


def test_open_on_a_closed_receiver_is_refused() -> None:
    tx, rx = Sender("zmq"), Receiver("zmq")
    try:
        tx.add(0)
        tx.send(0, rows(0))
        open_room(rx, tx, 0)
        assert rx.wait(0, 10) is TransferStatus.Success
    finally:
        rx.close()
        tx.close()
    with pytest.raises(EndpointClosed):
        open_room(rx, tx, 1)


class Refusing(Stalling):
    """A real zmq transport that can be told to refuse messages sent together (as a
    peer whose queue is full would make ``send_many`` raise)."""

    refuse = False

    def send_many(self, peer: str, payloads: Sequence[bytes]) -> None:
        if self.refuse:
            raise TransportError(f"{peer} is not reading")
        super().send_many(peer, payloads)


def test_bootstraps_that_cannot_leave_together_fail_their_rooms_only() -> None:
    transport = Refusing()
    tx = Sender("zmq")
    rx = Receiver(transport, command_timeout=3)
    try:
        first_room(tx, rx)
        transport.stall()
        for room in (1, 2, 3):
            open_room(rx, tx, room)
        transport.refuse = True
        transport.go.set()
        for room in (1, 2, 3):
            assert rx.wait(room, 10) is TransferStatus.Failed
            assert "could not send bootstrap" in (rx.info(room).reason or "")
        assert rx.poll(0) is TransferStatus.Success
        transport.refuse = False
        tx.add(4)
        tx.send(4, rows(4))
        open_room(rx, tx, 4)
        assert rx.wait(4, 10) is TransferStatus.Success
        assert torch.equal(rx.result(4).tensor(), rows(4))
    finally:
        transport.go.set()
        rx.close()
        tx.close()
