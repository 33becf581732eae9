"""Offers are checked: a page is listed once, and offered to one unfinished room at
a time, on the receiver's side and on the sender's; a refused call changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from kvpoll import InvalidArgument, PagedPool, Receiver, Sender, UnknownRoom
from kvpoll import TransferStatus as S
from kvpoll.memory.pages import PageLedger, first_repeat
from kvpoll.protocol.messages import Bootstrap, PoolBuffer, PoolOffer, Reject
from tests.conftest import FAST
from tests.helpers import ScriptedPeer, wait_until

LAYOUT: dict[str, Any] = {"page_size": 4, "buffers": [((2,), torch.float32)], "transport": "zmq"}


@pytest.fixture
def pools() -> tuple[PagedPool, PagedPool]:
    a = PagedPool.allocate(num_pages=16, **LAYOUT)
    b = PagedPool.allocate(num_pages=16, **LAYOUT)
    a.buffers[0].copy_(torch.arange(16 * 4 * 2, dtype=torch.float32).view(-1, 2))
    return a, b


@pytest.fixture
def endpoints() -> Iterator[tuple[Sender, Receiver]]:
    with Sender("zmq", **FAST) as tx, Receiver("zmq", **FAST) as rx:
        yield tx, rx


def test_the_duplicate_page_of_the_report_is_refused_and_no_room_opens(
    endpoints: tuple[Sender, Receiver], pools: tuple[PagedPool, PagedPool]
) -> None:
    tx, rx = endpoints
    a, b = pools
    with pytest.raises(InvalidArgument, match="page 2 is listed twice"):
        rx.open(2, tx.address, pool=b, pages=[2, 2])
    with pytest.raises(UnknownRoom):
        rx.poll(2)
    # the same room opens once its pages are distinct, and every token lands
    tx.add(2)
    rx.open(2, tx.address, pool=b, pages=[2, 3])
    tx.send(2, pages=[0, 1], pool=a, is_last=True)
    assert rx.wait(2, 20) is S.Success
    assert torch.equal(b.gather(0, [2, 3]), a.gather(0, [0, 1]))


@pytest.mark.parametrize(
    "pages", [[(0, 4), (2, 2)], [(5, 1), (1, 5)], [7, 8, 9, 8]], ids=["runs", "covering", "ids"]
)
def test_overlapping_pages_in_one_offer_are_refused(
    endpoints: tuple[Sender, Receiver], pools: tuple[PagedPool, PagedPool], pages: Any
) -> None:
    tx, rx = endpoints
    with pytest.raises(InvalidArgument, match="listed twice"):
        rx.open(3, tx.address, pool=pools[1], pages=pages)
    assert rx.rooms() == []


def test_pages_of_another_unfinished_room_are_refused_until_it_ends(
    endpoints: tuple[Sender, Receiver], pools: tuple[PagedPool, PagedPool]
) -> None:
    tx, rx = endpoints
    a, b = pools
    rx.open(1, tx.address, pool=b, pages=[0, 1])
    with pytest.raises(InvalidArgument, match="offered to room 1"):
        rx.open(2, tx.address, pool=b, pages=[5, 1])
    assert rx.rooms() == [1]
    assert rx.poll(1) is S.Bootstrapping  # unchanged
    other = PagedPool.allocate(num_pages=16, **LAYOUT)
    rx.open(4, tx.address, pool=other, pages=[0, 1])  # the same indices of another pool
    tx.add(1)
    tx.send(1, pages=[3, 4], pool=a, is_last=True)
    assert rx.wait(1, 20) is S.Success
    rx.open(2, tx.address, pool=b, pages=[5, 1])  # room 1 ended: its pages are free again
    assert rx.poll(2) is S.Bootstrapping


def test_a_resume_may_not_offer_pages_of_another_room_or_a_page_twice(
    endpoints: tuple[Sender, Receiver], pools: tuple[PagedPool, PagedPool]
) -> None:
    """A resume may reuse the room's own pages (resuming says their data was taken
    out), never pages another unfinished room holds."""
    tx, rx = endpoints
    a, b = pools
    tx.add(5)
    rx.open(5, tx.address, pool=b, pages=[0])
    rx.open(6, tx.address, pool=b, pages=[9])
    tx.send(5, pages=[0, 1], pool=a, is_last=True)
    wait_until(lambda: rx.poll(5) is S.Transferring, what="the first chunk")
    first = b.gather(0, [0])
    assert torch.equal(first, a.gather(0, [0]))
    for pages, what in (([9], "offered to room 6"), ([1, 1], "listed twice")):
        with pytest.raises(InvalidArgument, match=what):
            rx.resume(5, pages=pages)
        assert rx.poll(5) is S.Transferring  # unchanged
    rx.resume(5, pages=[0])  # its own page again, once taken out
    assert rx.wait(5, 20) is S.Success
    assert torch.equal(b.gather(0, [0]), a.gather(0, [1]))
    with pytest.raises(InvalidArgument, match="offered to room 6"):
        rx.open(7, tx.address, pool=b, pages=[9])
    rx.open(7, tx.address, pool=b, pages=[0])  # room 5 ended: its page is free


def test_the_sender_refuses_a_page_twice_in_a_room_but_shares_pages_across_rooms(
    endpoints: tuple[Sender, Receiver], pools: tuple[PagedPool, PagedPool]
) -> None:
    tx, rx = endpoints
    a, b = pools
    tx.add(6)
    with pytest.raises(InvalidArgument, match="page 3 is listed twice"):
        tx.send(6, pages=[3, 3], pool=a, is_last=True)
    tx.send(6, pages=[3, 4], pool=a, is_last=False)
    with pytest.raises(InvalidArgument, match="page 4 was sent in an earlier send"):
        tx.send(6, pages=[4], pool=a, is_last=True)
    assert tx.info(6).total_tokens is None  # the refused call changed nothing
    tx.send(6, pages=[5], pool=a, is_last=True)
    # another room reads the same pages (a shared prefix): allowed, reads only
    tx.add(7)
    tx.send(7, pages=[3, 4, 5], pool=a, is_last=True)
    rx.open(6, tx.address, pool=b, pages=[0, 1, 2])
    rx.open(7, tx.address, pool=b, pages=[8, 9, 10])
    assert rx.wait(6, 20) is S.Success
    assert rx.wait(7, 20) is S.Success
    assert torch.equal(b.gather(0, [0, 1, 2]), a.gather(0, [3, 4, 5]))
    assert torch.equal(b.gather(0, [8, 9, 10]), a.gather(0, [3, 4, 5]))


def test_the_sender_refuses_a_peer_offer_that_lists_a_page_twice(
    pools: tuple[PagedPool, PagedPool],
) -> None:
    """A peer speaking the wire by hand offers a page of its pool twice in one
    bootstrap: that bootstrap is refused alone (two ranges would write the same
    memory), the room waits for a good one, and other rooms are untouched."""
    a, b = pools
    with Sender("zmq", **FAST) as tx, Receiver("zmq", **FAST) as rx:
        tx.add(8)
        rx.open(8, tx.address, pool=b, pages=[4, 5])
        wait_until(lambda: tx.poll(8) is S.WaitingForInput, what="room 8's bootstrap")
        peer = ScriptedPeer()
        try:
            tx.add(9)
            region = peer.transport.allocate(16 * 4 * 8)
            buffer = PoolBuffer(
                region=region.descriptor, row_bytes=8, dtype="float32", row_shape=[2]
            )
            peer.send(tx.address, PoolOffer(pool=77, page_size=4, num_pages=16, buffers=[buffer]))
            twice = Bootstrap(
                room=9, session=1, pool=77, pages=[(2, 2), (3, 1)], transports=["zmq/tcp"]
            )
            peer.send(tx.address, twice)
            assert peer.receive(Reject).reason == "page 3 is offered twice"
            assert tx.poll(9) is S.Bootstrapping
            good = Bootstrap(room=9, session=2, pool=77, pages=[(2, 2)], transports=["zmq/tcp"])
            peer.send(tx.address, good)
            wait_until(lambda: tx.poll(9) is S.WaitingForInput, what="room 9's good bootstrap")
        finally:
            peer.close()
        tx.send(8, pages=[0, 1], pool=a, is_last=True)
        assert rx.wait(8, 20) is S.Success


def test_the_ledger_and_first_repeat_directly() -> None:
    assert first_repeat([(0, 4), (4, 4)]) is None
    assert first_repeat([(4, 4), (0, 5)]) == 4
    assert first_repeat([(0, 10), (3, 1), (20, 1)]) == 3
    ledger = PageLedger(64)
    ledger.hold(1, [(10, 5)])
    ledger.hold(2, [(0, 2), (30, 1)])
    assert ledger.conflict([(5, 5)]) is None
    assert ledger.conflict([(5, 6)]) == (10, 1)
    assert ledger.conflict([(14, 1)]) == (14, 1)
    assert ledger.conflict([(2, 8), (29, 2)]) == (30, 2)
    assert ledger.conflict([(10, 5)], but=1) is None  # a room's own pages, for its resume
    scattered = [(p, 1) for p in range(40, 60)]  # many runs: one gathered index
    assert ledger.conflict(scattered) is None
    ledger.hold(3, scattered)
    assert ledger.conflict([(p, 1) for p in range(16, 64, 2)]) == (30, 2)
    assert ledger.conflict([(p, 1) for p in range(41, 64, 2)]) == (41, 3)
    ledger.release(1)
    assert ledger.conflict([(5, 20)]) is None
    assert len(ledger) == 2
    ledger.release(2)
    ledger.release(2)
    ledger.release(3)
    assert len(ledger) == 0
    assert ledger.conflict([(0, 64)]) is None
