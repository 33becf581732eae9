"""An error at any step of any side fails at most the room it concerns; the I/O
thread goes on and later rooms succeed (FaultyTransport injects the errors
into a real zmq transport)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from kvpoll import IllegalTransition, Receiver, Sender, TransferStatus, UnknownRoom
from kvpoll.testing.faults import FAULT_POINTS, FaultyTransport, InjectedFault
from kvpoll.transports import create
from tests.conftest import FAST

S = TransferStatus
SHORT = {"Bootstrapping": 5, "WaitingForInput": 5, "Transferring": 5}


def data(room: int) -> torch.Tensor:
    return torch.arange(room, room + 16.0).reshape(4, 4)


def one_room(tx: Sender, rx: Receiver, room: int) -> TransferStatus | None:
    """Run a room of two chunks; its final status (None: a call refused to open it)."""
    try:
        tx.add(room)
        rx.open(room, tx.address, row_shape=(4,), dtype=torch.float32, allocated_tokens=2)
        tx.send(room, data(room))
    except (InjectedFault, IllegalTransition):  # the call failed, or the room had already
        for side in (tx, rx):
            with contextlib.suppress(UnknownRoom):
                side.abort(room, "the test's call failed")
    try:
        status = rx.wait(room, 20)
    except UnknownRoom:
        return None
    assert status.is_final, f"room {room} is stuck in {status.name}"
    assert tx.wait(room, 20).is_final
    if status is S.Success:
        assert torch.equal(rx.result(room).tensor(), data(room))
    return status


@pytest.mark.parametrize("call", [1, 3])
@pytest.mark.parametrize("point", FAULT_POINTS)
@pytest.mark.parametrize("side", ["sender", "receiver"])
def test_a_fault_at_any_step_fails_at_most_its_room(side: str, point: str, call: int) -> None:
    faulty = FaultyTransport(create("zmq", shm=point != "release"), fail={point: {call}})
    plain = create("zmq", shm=point != "release")
    tx = Sender(faulty if side == "sender" else plain, timeouts=SHORT, **FAST)
    rx = Receiver(faulty if side == "receiver" else plain, timeouts=SHORT, **FAST)
    try:
        statuses = [one_room(tx, rx, room) for room in range(1, 5)]
        if faulty.calls[point] >= call:
            assert faulty.injected == 1
        assert tx._thread.is_alive()
        assert rx._thread.is_alive()
        # the fault concerned one room at most; every other succeeded
        assert sum(s is not S.Success for s in statuses) <= 1, statuses
        assert one_room(tx, rx, 99) is S.Success
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize("write", [1, 2])
def test_a_failed_write_fails_its_room_at_once(write: int) -> None:
    faulty = FaultyTransport(create("zmq"), fail_writes={write})
    with (
        Sender(faulty, timeouts=SHORT, **FAST) as tx,
        Receiver("zmq", timeouts=SHORT, **FAST) as rx,
    ):
        assert one_room(tx, rx, 1) is S.Failed
        assert "injected fault" in str(tx.info(1).reason)
        assert "injected fault" in str(rx.info(1).reason)  # told at once, not by time-out
        assert rx.info(1).history[-1].at - rx.info(1).history[0].at < 2
        assert one_room(tx, rx, 2) is S.Success
