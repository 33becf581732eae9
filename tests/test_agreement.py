"""Both sides of a room end the same way (docs/state-machine.md, "How a room ends
on both sides"): one test for each way a room can end, each checking the two
final statuses and that the side that did not decide learnt why."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from kvpoll import IllegalTransition, PagedPool, Receiver, Sender, StatusChange
from kvpoll import TransferStatus as S
from tests.conftest import FAST
from tests.helpers import wait_until

ROWS = torch.arange(12.0).view(3, 4)
WINDOW = 2.0  # seconds within which the other side must learn (FAST: 0.2 s x 8)


@pytest.fixture
def pair() -> Iterator[tuple[Sender, Receiver]]:
    with Sender("zmq", **FAST) as tx, Receiver("zmq", **FAST) as rx:
        yield tx, rx


def _ready(tx: Sender, rx: Receiver, room: int) -> None:
    tx.add(room)
    rx.open(room, tx.address, row_shape=(4,), dtype=torch.float32, allocated_tokens=3)
    wait_until(lambda: rx.poll(room) is S.WaitingForInput, 10, "the bootstrap")


def _both(tx: Sender, rx: Receiver, room: int) -> tuple[S, S]:
    return tx.wait(room, WINDOW + 8), rx.wait(room, WINDOW + 8)


def test_success_on_both_sides(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    _ready(tx, rx, 1)
    tx.send(1, ROWS)
    assert _both(tx, rx, 1) == (S.Success, S.Success)


@pytest.mark.parametrize("side", ["sender", "receiver"])
@pytest.mark.parametrize("how", ["abort", "remove", "close"])
def test_the_application_ends_a_room_and_the_other_side_fails_it_too(
    pair: tuple[Sender, Receiver], side: str, how: str
) -> None:
    tx, rx = pair
    _ready(tx, rx, 2)
    here, there = (tx, rx) if side == "sender" else (rx, tx)
    began = time.monotonic()
    if how == "abort":
        here.abort(2, "the request was cancelled")
    elif how == "remove":
        here.remove(2)
    else:
        here.close()
    assert there.wait(2, WINDOW) is S.Failed
    assert time.monotonic() - began < WINDOW
    assert "aborted by" in (there.info(2).reason or "")
    if how == "abort":
        assert here.poll(2) is S.Failed
        assert "the request was cancelled" in (there.info(2).reason or "")


def test_a_time_out_on_one_side_fails_the_other(pair: tuple[Sender, Receiver]) -> None:
    with Sender("zmq", timeouts={"WaitingForInput": 0.5}, **FAST) as tx:
        rx = pair[1]
        _ready(tx, rx, 3)  # the data never comes: the sender times out
        assert _both(tx, rx, 3) == (S.Failed, S.Failed)
        assert "timed out in WaitingForInput" in (rx.info(3).reason or "")


def test_a_bad_layout_found_at_write_time_fails_both(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    _ready(tx, rx, 4)
    tx.send(4, ROWS.to(torch.float64))  # rows of 64 bytes where 16 were offered
    assert _both(tx, rx, 4) == (S.Failed, S.Failed)
    assert "expects rows of" in (rx.info(4).reason or "")


def test_memory_withdrawn_at_the_receiver_fails_both() -> None:
    """The receiver's pool is unregistered while the room waits for data: the
    room fails there, and the sender learns it before it writes a byte."""
    layout: dict[str, Any] = {"page_size": 4, "buffers": [((4,), torch.float32)]}
    src = PagedPool.allocate(num_pages=4, transport="zmq", **layout)
    dst = PagedPool.allocate(num_pages=4, transport="zmq", **layout)
    options = {"shm": False}
    with (
        Sender("zmq", transport_options=options, **FAST) as tx,
        Receiver("zmq", transport_options=options, **FAST) as rx,
    ):
        tx.add(5)
        rx.open(5, tx.address, pool=dst, pages=[0, 1])
        wait_until(lambda: tx.poll(5) is S.WaitingForInput, 10, "the bootstrap")
        rx.unregister(dst)  # fails room 5 here first: the sender must follow
        assert _both(tx, rx, 5) == (S.Failed, S.Failed)
        assert "its pool was unregistered" in (tx.info(5).reason or "")
        with pytest.raises(IllegalTransition):  # nothing is written for a failed room
            tx.send(5, pages=[0, 1], pool=src, is_last=True)


def test_a_peer_judged_silent_while_alive_learns_it_and_fails_the_room_too() -> None:
    """The receiver's I/O thread is held past the sender's window: the sender
    judges it silent, fails the room and tells it. When the receiver wakes it
    reads that abort and fails the room with the sender's reason; neither side
    waits for its time-out."""
    holding: list[float] = []

    def stall(change: StatusChange) -> None:
        if change.dest is S.WaitingForInput and not holding:
            holding.append(time.monotonic())
            time.sleep(1.5)

    with (
        Sender("zmq", heartbeat_interval=0.1, heartbeat_misses=3) as tx,
        Receiver("zmq", heartbeat_interval=1.0, heartbeat_misses=30, on_status=stall) as rx,
    ):
        tx.add(6)
        rx.open(6, tx.address, row_shape=(4,), dtype=torch.float32, allocated_tokens=3)
        assert tx.wait(6, 10) is S.Failed
        assert "silent" in (tx.info(6).reason or "")
        assert rx.wait(6, 5) is S.Failed
        reason = rx.info(6).reason or ""
        assert "aborted by" in reason
        assert "silent" in reason
        assert tx.stats["peers_lost"] == 1
