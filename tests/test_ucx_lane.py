"""The ucx transport's lane: write requests and acknowledgements as UCX messages.

Real UCX workers and ZMQ sockets on loopback, two transports in this process
driven by hand (``pump``) so the order of what each side handles is known.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import zmq

from kvpoll.testing import pump, wait_for_write
from kvpoll.transports import TransportUnavailable, resolve, ucx_lane
from kvpoll.transports.base import (
    MessageReceived,
    PeerClosed,
    Span,
    TransportEvent,
    WriteDone,
)

try:
    resolve("ucx")
except TransportUnavailable as exc:  # pragma: no cover - depends on the environment
    if os.environ.get("CI_REQUIRE_ENGINES") == "1":
        raise  # CI installs every engine: a missing one fails, never skips
    pytest.skip(str(exc), allow_module_level=True)

from kvpoll.transports.ucx_transport import UcxTransport


@pytest.fixture
def pair() -> Iterator[tuple[UcxTransport, UcxTransport]]:
    a, b = UcxTransport(write_timeout=5), UcxTransport(write_timeout=5)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _messages(events: list[TransportEvent]) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, MessageReceived)]


def _both(
    x: UcxTransport, y: UcxTransport, until: Any, timeout: float = 15.0
) -> tuple[list[TransportEvent], list[TransportEvent]]:
    """Drive ``x`` and ``y`` until ``until(x's events)``; both sides' events."""
    ours: list[TransportEvent] = []
    theirs: list[TransportEvent] = []
    deadline = time.monotonic() + timeout
    while not until(ours):
        assert time.monotonic() < deadline, f"timed out; events so far: {ours[-5:]}"
        ours.extend(x.progress(0.002))
        theirs.extend(y.progress(0))
    return ours, theirs


def _open_lanes(a: UcxTransport, b: UcxTransport, src: Any, dst: Any) -> None:
    """A first write (over ZMQ, asking for lanes), then control messages each way
    until both sides may use their lane."""
    first = a.write(src, 0, dst.descriptor, 0, 64)
    assert wait_for_write(a, b, first).error is None
    for x, y in ((a, b), (b, a), (a, b)):
        x.send(y.address, b"hello")
        pump([y, x], lambda ev: b"hello" in _messages(ev))
    assert a._lanes.usable(b.address) is not None
    assert b._lanes.usable(a.address) is not None


def _forge(x: UcxTransport, y: UcxTransport, messages: list[bytes]) -> list[tuple[Any, bytes]]:
    """Send raw ``messages`` on y's lane from x (as a hostile x could); each send
    with its message, which must stay alive until the send completes."""
    from ucxx._lib.arr import Array
    from ucxx._lib.libucxx import UCXXTag

    out = x._lanes.outs[y.address]
    endpoint = x._endpoint(out.worker)
    return [(endpoint.tag_send(Array(m), UCXXTag(out.tag)), m) for m in messages]


def test_requests_and_acknowledgements_travel_the_lane(
    pair: tuple[UcxTransport, UcxTransport],
) -> None:
    a, b = pair
    data = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=torch.Generator())
    src = a.register(data)
    dst = b.allocate(1 << 20)
    _open_lanes(a, b, src, dst)
    before = dict(a.stats), dict(b.stats)
    for i, size in enumerate((1, 4096, 65536, 1 << 20)):
        write_id = a.write(src, 0, dst.descriptor, 0, size)
        assert wait_for_write(a, b, write_id).error is None, i
        assert torch.equal(dst.data[:size], data[:size])
    # every request went to b on the lane, every acknowledgement came back on it
    assert a.stats["lane_sent"] - before[0]["lane_sent"] == 4
    assert b.stats["lane_received"] - before[1]["lane_received"] == 4
    assert b.stats["lane_sent"] - before[1]["lane_sent"] == 4
    assert a.stats["lane_received"] - before[0]["lane_received"] == 4
    assert a.stats["malformed"] == b.stats["malformed"] == 0


def test_a_lane_notice_waits_for_the_control_messages_sent_before_it(
    pair: tuple[UcxTransport, UcxTransport],
) -> None:
    """The notice's request overtakes 3,000 ZMQ messages on the wire; it is held
    until the last of them has been handled, then comes after them."""
    a, b = pair
    src = a.register(torch.arange(4096, dtype=torch.int32).view(torch.uint8))
    dst = b.allocate(4096 * 4)
    _open_lanes(a, b, src, dst)
    sent_before = a.stats["lane_sent"]
    payloads = [f"control {i}".encode() for i in range(3000)]
    for payload in payloads:
        a.send(b.address, payload)
    write_id = a.write_batch([Span(src, 0, dst.descriptor, 0, 4096 * 4)], b"landed")
    assert a.stats["lane_sent"] == sent_before + 1  # the request (and notice) took the lane
    time.sleep(0.05)  # the lane message is at b's worker before b handles anything
    seen, mine = _both(b, a, lambda ev: b"landed" in _messages(ev))
    assert _messages(seen) == [*payloads, b"landed"]
    assert b.stats["lane_held"] >= 1  # it had arrived first and waited
    assert torch.equal(dst.data, src.data)
    done = [e for e in mine if isinstance(e, WriteDone) and e.write_id == write_id]
    if not done:
        done = [wait_for_write(a, b, write_id)]
    assert done[0].error is None


def test_a_lane_request_is_checked_like_one_over_zmq(
    pair: tuple[UcxTransport, UcxTransport],
) -> None:
    """Forged lane messages (garbage, an unknown kind, one too long for the lane's
    buffers, a request for memory b never registered, one that would post a data
    receive on a lane's tag) are counted and dropped or refused; the lane and b go
    on working."""
    a, b = pair
    src = a.register(torch.ones(4096, dtype=torch.uint8))
    dst = b.allocate(4096)
    _open_lanes(a, b, src, dst)
    out = a._lanes.outs[b.address]
    request = struct.pack("<QQ", 999, 1) + struct.pack(
        "<QQQQ", dst.descriptor.region_id ^ 1, 0, 8, 5
    )
    lane_tagged = struct.pack("<QQ", 998, 1) + struct.pack(
        "<QQQQ", dst.descriptor.region_id, 0, 8, ucx_lane.new_tag()
    )
    forged = [
        b"\x00" * 3,
        ucx_lane.pack_lane(b"Z", out.sent, b"12345678"),
        ucx_lane.pack_lane(ucx_lane.REQUEST, out.sent, bytes(ucx_lane.LANE_BYTES)),
        ucx_lane.pack_lane(ucx_lane.REQUEST, out.sent, request),
        ucx_lane.pack_lane(ucx_lane.REQUEST, out.sent, lane_tagged),  # a data receive on a lane
    ]
    keep = _forge(a, b, forged)
    malformed, rejected = b.stats["malformed"], b.stats["rejected_writes"]
    deadline = time.monotonic() + 10
    while b.stats["malformed"] < malformed + 4 or b.stats["rejected_writes"] == rejected:
        assert time.monotonic() < deadline, b.stats
        b.progress(0.002)
        a.progress(0)
    assert b.stats["malformed"] == malformed + 4
    assert b.stats["rejected_writes"] == rejected + 1
    assert all(r.completed for r, _ in keep)
    dst.data.zero_()
    write_id = a.write(src, 0, dst.descriptor, 0, 4096)
    assert wait_for_write(a, b, write_id).error is None
    assert torch.equal(dst.data, src.data)


def test_early_acknowledgements_wait_only_for_writes_in_flight(
    pair: tuple[UcxTransport, UcxTransport],
) -> None:
    """b's lane floods a with acknowledgements stamped after a ZMQ message b never
    sent: those for writes a never made are dropped at once; for a write in
    flight the first waits and a repeat is dropped, and b's real answer still
    finishes the write."""
    a, b = pair
    src = a.register(torch.ones(64, dtype=torch.uint8))
    dst = b.allocate(64)
    _open_lanes(a, b, src, dst)
    ahead = b._lanes.outs[a.address].sent + 1_000_000  # nothing will release these

    def ack(write_id: int) -> bytes:
        return ucx_lane.pack_lane(ucx_lane.ACK, ahead, struct.pack("<QB", write_id, 0), b"no")

    received = a.stats["lane_received"]
    keep = _forge(b, a, [ack(w) for w in range(10**6, 10**6 + 500)])
    write_id = a.write(src, 0, dst.descriptor, 0, 64)  # b's endpoint is not driven yet
    keep += _forge(b, a, [ack(write_id), ack(write_id)])
    deadline = time.monotonic() + 10
    while a.stats["lane_received"] < received + 502:
        assert time.monotonic() < deadline, a.stats
        assert not [e for e in a.progress(0.002) if isinstance(e, WriteDone)]
        b._worker.progress_once()  # b's worker sends the forged messages; b handles nothing
    assert a.stats["lane_held"] == 1  # the first for the write in flight
    assert a._lanes.held_count == 1
    assert wait_for_write(a, b, write_id).error is None  # b's own answer, not the forged "no"
    assert all(r.completed for r, _ in keep)


def test_a_peer_back_at_the_same_address_gets_a_new_lane(
    pair: tuple[UcxTransport, UcxTransport],
) -> None:
    """b closes (a drops its lanes on b's goodbye) and another transport binds b's
    address: a's writes to it open new lanes and carry notices on them."""
    a, b = pair
    src = a.register(torch.full((4096,), 7, dtype=torch.uint8))
    _open_lanes(a, b, src, b.allocate(4096))
    old = a._lanes.ins[b.address].tag
    address = b.address
    b.close()
    pump([a], lambda ev: any(isinstance(e, PeerClosed) for e in ev))
    assert address not in a._lanes.ins
    assert a._lanes.usable(address) is None
    port = int(address.rsplit(":", 1)[1])
    back = UcxTransport(port=port, write_timeout=5)
    try:
        assert back.address == address
        dst = back.allocate(4096)
        back.send(a.address, b"back")  # a writes to a closed peer only once it is heard again
        pump([a, back], lambda ev: b"back" in _messages(ev))
        _open_lanes(a, back, src, dst)
        assert a._lanes.ins[address].tag != old
        sent = a.stats["lane_sent"]
        write_id = a.write_batch([Span(src, 0, dst.descriptor, 0, 4096)], b"again")
        seen, mine = _both(back, a, lambda ev: b"again" in _messages(ev))
        assert _messages(seen)[-1] == b"again"
        assert a.stats["lane_sent"] == sent + 1
        if not any(isinstance(e, WriteDone) and e.write_id == write_id for e in mine):
            assert wait_for_write(a, back, write_id).error is None
        assert torch.equal(dst.data, src.data)
    finally:
        back.close()


def test_bad_announcements_and_stamps_from_the_wire_change_nothing(
    pair: tuple[UcxTransport, UcxTransport],
) -> None:
    a, b = pair
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"tcp://127.0.0.1:9")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(b.address)
    try:
        bad = [
            [b"L"],  # no body
            [b"L", b"short"],
            [b"L", struct.pack("<QB", 5, 1) + b"w"],  # a tag without the lane bit
            [b"L", struct.pack("<QB", ucx_lane.new_tag(), 7) + b"w"],  # a bad flag
            [b"C" + b"\x00" * 7, b"an odd stamp"],
            [b"C" + struct.pack("<IQ", 1, 2), b"a stamp of no lane"],
        ]
        for frames in bad:
            sock.send_multipart(frames)
        seen = pump([b], lambda ev: b"a stamp of no lane" in _messages(ev))
        assert _messages(seen) == [b"a stamp of no lane"]  # stamped: taken, stamp ignored
        assert b.stats["malformed"] == 5
        assert not b._lanes.outs
    finally:
        sock.close(0)
        ctx.term()
    src = a.register(torch.ones(64, dtype=torch.uint8))
    dst = b.allocate(64)
    _open_lanes(a, b, src, dst)  # b still opens lanes with a real peer


def test_lanes_are_bounded_and_hold_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    lanes = ucx_lane.Lanes(max_lanes=1)
    posted: list[int] = []
    assert lanes.open_in("p", lambda tag, buffer: posted.append(tag)) is not None
    assert len(posted) == ucx_lane.LANE_RECEIVES
    assert lanes.open_in("q", lambda tag, buffer: posted.append(tag)) is None
    assert lanes.open_out("p", ucx_lane.new_tag(), "00")
    assert not lanes.open_out("q", ucx_lane.new_tag(), "00")
    assert lanes.usable("p") is None  # no stamped ZMQ message went before
    tag = lanes.ins["p"].tag
    first, second = (
        ucx_lane.Held(2, notice=b"x", deadline=1e18),
        ucx_lane.Held(3, notice=b"y", deadline=1e18),
    )
    lanes.hold("p", first)
    lanes.hold("p", second)
    assert not lanes.hear("p", ucx_lane.epoch_of(tag) ^ 1, 5)  # another epoch: ignored
    assert lanes.ready("p", 0.0) == []
    assert lanes.hear("p", ucx_lane.epoch_of(tag), 2)
    assert lanes.ready("p", 0.0) == [first]
    assert lanes.ready("p", 2e18) == [second]  # past its deadline
    assert "p" not in lanes.held
    assert lanes.held_count == 0
    monkeypatch.setattr(ucx_lane, "MAX_HELD", 2)
    assert lanes.hold("p", first)
    assert lanes.hold("p", second)
    assert not lanes.hold("p", ucx_lane.Held(4))  # past the limit: not kept
    assert lanes.take_held("p") == [first, second]
    assert lanes.held_count == 0


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"U" + bytes(10),
        ucx_lane.pack_lane(b"Q", 1, b"x"),
        ucx_lane.pack_lane(b"U", 1, b"x")[:-1],
        struct.pack("<cxxxIIQ", b"U", 2, 5, 1) + b"xy",  # a request longer than the body
    ],
)
def test_unpack_lane_refuses_malformed_messages(message: bytes) -> None:
    with pytest.raises(ValueError, match="lane message"):
        ucx_lane.unpack_lane(np.frombuffer(message, dtype=np.uint8))
