"""What a new user trips over: every bad argument is a typed error naming it,
nothing leaks, and a forgotten rank= says how to fix it at once."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch

from kvpoll import InvalidArgument, Receiver, RoomRegistry, Sender, TransferStatus
from tests.conftest import FAST
from tests.helpers import own_memfds

S = TransferStatus


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"row_shape": ("a",)}, r"row_shape must be 1 to 8 positive ints.*\('a',\)"),
        ({"row_shape": (1.7,)}, r"row_shape must be 1 to 8 positive ints.*\(1.7,\)"),
        ({"row_shape": 4096}, r"row_shape must be a sequence of sizes.*not 4096"),
        ({"row_shape": ()}, r"row_shape must be 1 to 8 positive ints"),
        ({"row_shape": (4,), "allocated_tokens": 2**40}, r"allocated_tokens must be an int in 1"),
        ({"row_shape": (4,), "allocated_tokens": 2**36}, r"allocated_tokens=.* GiB, more than"),
        ({"row_shape": (4,), "allocated_tokens": 0}, r"allocated_tokens must be an int"),
        ({"row_shape": (4,), "dtype": "float32"}, r"dtype must be a torch.dtype"),
        ({"row_shape": (4,), "rank": -1}, r"rank must be an int >= 0"),
    ],
)
def test_bad_open_arguments_are_invalid_arguments_naming_them(
    pair: tuple[Sender, Receiver], kwargs: dict[str, Any], message: str
) -> None:
    tx, rx = pair
    args = {"dtype": torch.float32, **kwargs}
    with pytest.raises(InvalidArgument, match=message):
        rx.open(1, tx.address, **args)
    assert rx.rooms() == []  # nothing was opened


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (torch.randn(4, 2, dtype=torch.complex64).conj(), r"conjugate .*resolve_conj\(\)"),
        (torch.arange(5), r"shape \[tokens, \*row_shape\], not \[5\].*tensor\[:, None\]"),
        (np.zeros((3, 4)), r"not ndarray \(torch.from_numpy"),
        (torch.zeros(0, 4), r"at least one token"),
        (torch.zeros(4, 6)[:, ::2], r"contiguous"),
    ],
)
def test_bad_data_is_refused_at_send(
    pair: tuple[Sender, Receiver], data: Any, message: str
) -> None:
    tx, _ = pair
    tx.add(1)
    with pytest.raises(InvalidArgument, match=message):
        tx.send(1, data)
    assert tx.poll(1) is S.Bootstrapping  # the room is as it was
    tx.send(1, torch.ones(2, 4))  # and still takes good data


@pytest.mark.parametrize("room", [2**63, -(2**63) - 1, True, 1.0])
def test_room_ids_are_the_same_on_every_side(pair: tuple[Sender, Receiver], room: Any) -> None:
    tx, rx = pair
    with pytest.raises(InvalidArgument, match="room"):
        tx.add(room)
    with pytest.raises(InvalidArgument, match="room"):
        rx.open(room, tx.address, row_shape=(4,), dtype=torch.float32)
    with pytest.raises(InvalidArgument, match="room"):
        RoomRegistry().add(room)
    for edge in (2**63 - 1, -(2**63)):  # the ends of the range work everywhere
        tx.add(edge)
        rx.open(edge, tx.address, row_shape=(4,), dtype=torch.float32, allocated_tokens=2)
        tx.send(edge, torch.ones(2, 4))
        assert rx.wait(edge, 20) is S.Success
        tx.remove(edge)
        rx.remove(edge)


def test_rejected_opens_leak_nothing(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    rx.open(1, tx.address, row_shape=(64,), dtype=torch.float32, allocated_tokens=16)
    memfds = len(own_memfds())
    for i in range(100):
        with pytest.raises(InvalidArgument):
            rx.open(100 + i, "tcp://nowhere", row_shape=(64,), dtype=torch.float32)
        with pytest.raises(Exception, match="room 1"):
            rx.open(1, tx.address, row_shape=(64,), dtype=torch.float32)  # a duplicate
    assert rx.rooms() == [1]
    assert len(own_memfds()) == memfds
    assert not rx._arenas._held  # nothing parked either


def test_a_second_receiver_without_rank_is_told_at_once() -> None:
    with (
        Sender("zmq", **FAST) as tx,
        Receiver("zmq", **FAST) as rx0,
        Receiver("zmq", **FAST) as rx1,
    ):
        tx.add(1, required_destinations=2)
        rx0.open(1, tx.address, row_shape=(4,), dtype=torch.float32, allocated_tokens=4)
        assert rx0.wait(1, 0.5) is S.WaitingForInput or rx0.poll(1) is S.WaitingForInput
        began = time.monotonic()
        rx1.open(1, tx.address, row_shape=(4,), dtype=torch.float32, allocated_tokens=4)
        assert rx1.wait(1, 20) is S.Failed
        assert time.monotonic() - began < 10  # not the 300 s time-out
        reason = rx1.info(1).reason or ""
        assert "rank 0 has already bootstrapped" in reason
        assert "its own rank=" in reason


def test_a_sender_without_required_destinations_says_so() -> None:
    with Sender("zmq", **FAST) as tx, Receiver("zmq", **FAST) as rx:
        tx.add(1)
        rx.open(1, tx.address, row_shape=(4,), dtype=torch.float32, allocated_tokens=4, rank=1)
        assert rx.wait(1, 20) is S.Failed
        assert "add(room, required_destinations=N)" in (rx.info(1).reason or "")


def test_malformed_frames_count_in_the_endpoints_stats(pair: tuple[Sender, Receiver]) -> None:
    import zmq

    _, rx = pair
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.setsockopt(zmq.IDENTITY, b"tcp://127.0.0.1:1")
    rogue.connect(rx.address)
    try:
        for frames in ([b"Z", b"junk"], [b"W", b"short"], [b"C"], [b"C", b"a", b"b"]):
            rogue.send_multipart(frames)  # frames the transport cannot read
        rogue.send_multipart([b"C", b"{not json"])  # a message the protocol cannot read
        deadline = time.monotonic() + 20
        while rx.stats["malformed"] < 4:
            assert time.monotonic() < deadline, rx.stats
            time.sleep(0.01)
    finally:
        rogue.close()
    stats = rx.stats
    assert {"messages_in", "rejected", "timeouts"} <= stats.keys()  # the endpoint's
    assert {"rejected_writes"} <= stats.keys()  # and the transport's, in one place
