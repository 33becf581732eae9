"""Agreeing on a transport path at bootstrap, and a clear error when there is none."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from kvpoll import InvalidArgument
from kvpoll.protocol import Receiver, Sender
from kvpoll.protocol.negotiation import choose_path, mismatch
from tests.helpers import need_transport

FAST: dict[str, Any] = {"heartbeat_interval": 0.2, "heartbeat_misses": 5}


@pytest.mark.parametrize(
    ("offered", "spoken", "same_host", "chosen"),
    [
        (["zmq/shm", "zmq/tcp"], ["zmq/shm", "zmq/tcp"], True, "zmq/shm"),
        (["zmq/shm", "zmq/tcp"], ["zmq/shm", "zmq/tcp"], False, "zmq/tcp"),
        (["zmq/tcp"], ["zmq/shm", "zmq/tcp"], True, "zmq/tcp"),
        (["zmq/shm"], ["zmq/shm", "zmq/tcp"], False, None),  # shm cannot cross hosts
        (["ucx", "zmq/tcp"], ["zmq/tcp", "ucx"], False, "zmq/tcp"),  # the sender's order
        (["zmq/tcp", "zmq/shm"], ["zmq/tcp", "zmq/shm"], True, "zmq/shm"),  # shm first on a host
        (["ucx"], ["zmq/shm", "zmq/tcp"], True, None),
        ([], ["ucx"], True, "ucx"),  # a receiver that announces nothing: the sender's first
        (["zmq/shm", "zmq/tcp"], ["zmq/shm", "zmq/tcp"], None, "zmq/shm"),  # host unknown
        (["ucx"], ["zmq/shm"], None, None),
    ],
)
def test_choose_path(
    offered: list[str], spoken: list[str], same_host: bool | None, chosen: str | None
) -> None:
    assert choose_path(offered, spoken, same_host=same_host) == chosen


def test_answers_are_kept_only_for_short_offers() -> None:
    from kvpoll.protocol.negotiation import _choose

    spoken = ["zmq/shm", "zmq/tcp"]
    assert choose_path(["zmq/tcp", "zmq/shm"], spoken, same_host=True) == "zmq/shm"
    kept = _choose.cache_info().currsize
    assert choose_path(["zmq/tcp", "zmq/shm"], spoken, same_host=False) == "zmq/tcp"
    assert choose_path(["zmq/tcp", "zmq/shm"], spoken, same_host=True) == "zmq/shm"
    assert _choose.cache_info().currsize <= kept + 1  # the same question is asked once
    long_names = ["x" * 10_000, "zmq/tcp"]  # a peer's: answered, never kept
    before = _choose.cache_info().currsize
    assert choose_path(long_names, spoken, same_host=True) == "zmq/tcp"
    assert _choose.cache_info().currsize == before


def test_mismatch_names_both_sides() -> None:
    text = mismatch(["ucx"], ["zmq/shm", "zmq/tcp"], same_host=True)
    assert "offers ucx" in text
    assert "speaks zmq/shm, zmq/tcp" in text


@pytest.mark.parametrize("shm", [True, False], ids=["shm", "tcp"])
def test_both_sides_record_the_agreed_path(shm: bool) -> None:
    with (
        Sender("zmq", transport_options={"shm": shm}, **FAST) as tx,
        Receiver("zmq", **FAST) as rx,
    ):
        tx.add(1)
        tx.send(1, torch.ones(4, 8))
        rx.open(1, tx.address, row_shape=(8,), dtype=torch.float32, allocated_tokens=4)
        assert rx.wait(1, 10).name == "Success"
        expected = ("zmq/shm",) if shm else ("zmq/tcp",)
        assert rx.info(1).paths == expected
        assert tx.info(1).paths == expected


@pytest.mark.parametrize("add_first", [True, False], ids=["room-added", "room-not-yet-added"])
def test_a_mismatch_fails_at_bootstrap_not_after_a_time_out(add_first: bool) -> None:
    need_transport("ucx")
    with Sender("zmq", **FAST) as tx, Receiver("ucx", **FAST) as rx:
        if add_first:
            tx.add(1)
        started = time.monotonic()
        rx.open(1, tx.address, row_shape=(8,), dtype=torch.float32, allocated_tokens=4)
        assert rx.wait(1, 10).name == "Failed"
        assert time.monotonic() - started < 5  # the time-outs are 300 s
        reason = rx.info(1).reason or ""
        assert "no common transport" in reason, reason
        assert "offers ucx" in reason, reason
        if add_first:
            assert tx.wait(1, 10).name == "Failed"
            assert "no common transport" in (tx.info(1).reason or "")


@pytest.mark.parametrize("address", ["ucx://nowhere", "not an address", "tcp://"])
def test_an_address_the_transport_cannot_use_is_refused_by_open(address: str) -> None:
    with Receiver("zmq", **FAST) as rx:
        with pytest.raises(InvalidArgument, match="cannot reach the sender"):
            rx.open(1, address, row_shape=(8,), dtype=torch.float32, allocated_tokens=4)
        assert rx.rooms() == []  # nothing was left behind
        assert rx.stats["messages_out"] == 0
