"""Property-based fuzzing of every wire message and transport frame, against live
endpoints over real sockets.

Each case is a valid message of one of the ten types (naming the live rooms
and sessions half of the time) with a field replaced, removed or added, or
random JSON, or random bytes; or a transport frame (``C``, ``W``, ``A``, ``B``,
``U``, ...) with random contents. Properties: :func:`decode` returns a message
or raises MessageError, nothing else; the endpoints handle every case without an
internal error, their I/O threads live, and rooms between the real peers
succeed with their data intact.

CI runs ``KVPOLL_FUZZ_CASES`` cases (default 1,000); a dedicated run takes
100,000 or more: ``KVPOLL_FUZZ_CASES=100000 make fuzz``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpoll import Receiver, Sender, TransferStatus
from kvpoll.protocol.messages import (
    Abort,
    AbortAck,
    Bootstrap,
    BootstrapAck,
    Chunk,
    Heartbeat,
    HeartbeatAck,
    MessageError,
    PoolBuffer,
    PoolOffer,
    Reject,
    Resume,
    decode,
)
from kvpoll.transports.base import RegionDescriptor
from tests.helpers import wait_until

CASES = int(os.environ.get("KVPOLL_FUZZ_CASES", "1000"))
pytestmark = pytest.mark.timeout(max(300, CASES // 50))

ROOM, TOKEN = 77, "the room's token"
BOUNDARY_INTS = [-(2**63) - 1, -(2**63), -1, 0, 1, 2**31, 2**40, 2**62, 2**63 - 1, 2**63, 2**64]


def examples(rogue: str, session: int) -> list[dict[str, Any]]:
    """One valid message of every type, as JSON-shaped dicts."""
    region = RegionDescriptor(transport="zmq", endpoint=rogue, region_id=5, nbytes=1 << 16)
    buffer = PoolBuffer(region=region, row_bytes=16, dtype="float32", row_shape=[4])
    room: dict[str, Any] = {"room": ROOM, "session": session, "rank": 0}
    messages = [
        PoolOffer(pool=3, page_size=4, num_pages=64, buffers=[buffer], aux=[buffer], aux_rows=2),
        Bootstrap(**room, pool=3, pages=[(0, 2), (9, 1)], aux_index=1, transports=["zmq/tcp"]),
        Bootstrap(
            **room,
            region=region,
            allocated_tokens=3,
            row_bytes=16,
            dtype="float32",
            row_shape=[4],
            transports=["zmq/shm", "zmq/tcp"],
            token="guess",
        ),
        BootstrapAck(**room, transport="zmq/tcp"),
        Reject(**room, reason="no", unknown_pool=True),
        Chunk(**room, sent_tokens=2, chunk_tokens=2, is_last=False, total_tokens=None, aux=b"xy"),
        Resume(**room, sent_tokens=2, pages=[(4, 1)], pool=3),
        Resume(**room, sent_tokens=2, region=region, allocated_tokens=3),
        Abort(**room, reason="fuzz"),
        AbortAck(**room),
        Heartbeat(seq=1),
        HeartbeatAck(seq=1),
    ]
    return [m.model_dump(mode="json") for m in messages]


leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(BOUNDARY_INTS),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
json_value = st.recursive(
    leaf,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=12,
)


@st.composite
def mutated(draw: st.DrawFn, bases: list[dict[str, Any]]) -> bytes:
    message = dict(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["replace", "remove", "add", "keep"]))
        keys = sorted(message)
        if action == "replace" and keys:
            message[draw(st.sampled_from(keys))] = draw(json_value)
        elif action == "remove" and keys:
            message.pop(draw(st.sampled_from(keys)))
        elif action == "add":
            message[draw(st.text(max_size=10))] = draw(json_value)
    return json.dumps(message, allow_nan=True).encode()


def payloads(bases: list[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        mutated(bases),
        json_value.map(lambda v: json.dumps(v, allow_nan=True).encode()),
        st.binary(max_size=200),
    )


frames = st.tuples(
    st.sampled_from([b"C", b"M", b"W", b"A", b"U", b"G", b"g", b"", b"\xff", b"CC"]),
    st.lists(st.binary(max_size=120), max_size=4),
)


def test_every_wire_message_fuzzed_against_live_endpoints() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    identity = "tcp://127.0.0.1:7"  # a made-up peer: nothing it claims to own exists
    # One process holds both endpoints and the generator, so they share one GIL:
    # a long heartbeat window (30 s), and no time-outs (a dedicated run lasts minutes).
    calm: dict[str, Any] = {
        "timeouts": {"Bootstrapping": 0, "WaitingForInput": 0, "Transferring": 0},
        "heartbeat_misses": 30,
    }
    with Sender("zmq", **calm) as tx, Receiver("zmq", **calm) as rx:
        socks = {}
        for endpoint in (tx, rx):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.IDENTITY, identity.encode())
            sock.connect(endpoint.address)
            socks[endpoint.address] = sock
        # a live room the fuzz aims at: rx waits in Transferring for its second chunk
        tx.add(ROOM, token=TOKEN)
        rx.open(
            ROOM,
            tx.address,
            row_shape=(4,),
            dtype=torch.float32,
            allocated_tokens=2,
            auto_resume=False,
            token=TOKEN,
        )
        data = torch.arange(16.0).reshape(4, 4)
        tx.send(ROOM, data)
        wait_until(lambda: rx.poll(ROOM) is TransferStatus.Transferring, 20)
        bases = examples(identity, rx._rooms[ROOM].session) + examples(identity, 12345)
        sent = {"messages": 0, "frames": 0}

        @settings(
            max_examples=CASES,
            deadline=None,
            derandomize=CASES <= 2000,  # CI: the same cases each run
            suppress_health_check=list(HealthCheck),
        )
        @given(payload=payloads(bases), frame=frames)
        def case(payload: bytes, frame: tuple[bytes, list[bytes]]) -> None:
            with contextlib.suppress(MessageError):  # the one error decode may raise
                decode(payload)
            for sock in socks.values():
                sock.send_multipart([b"C", payload])
                sock.send_multipart([frame[0], *frame[1]])
            sent["messages"] += 1
            sent["frames"] += 1
            if sent["messages"] % 1000 == 0:  # let the endpoints catch up: a bounded backlog
                caught_up(sent["messages"] - 1000)

        def caught_up(count: int) -> None:
            for endpoint in (tx, rx):
                deadline = time.monotonic() + 120
                while endpoint.stats["messages_in"] < count:
                    assert time.monotonic() < deadline, endpoint.stats
                    time.sleep(0.01)

        case()
        caught_up(sent["messages"])  # every case handled
        for endpoint in (tx, rx):
            assert endpoint._thread.is_alive()
            assert endpoint.stats["internal_errors"] == 0, endpoint.stats
        # the fuzzed room is untouched by a peer that does not own it; it ends normally
        assert rx.poll(ROOM) is TransferStatus.Transferring, (
            rx.info(ROOM).reason,
            tx.info(ROOM).reason,
            tx.address,
            rx.address,
        )
        rx.resume(ROOM)
        assert rx.wait(ROOM, 20) is TransferStatus.Success, (
            tx.info(ROOM),
            rx.info(ROOM),
            tx.stats,
            rx.stats,
        )
        assert torch.equal(rx.result(ROOM).tensor(), data)
        tx.add(ROOM + 1)
        rx.open(ROOM + 1, tx.address, row_shape=(4,), dtype=torch.float32, allocated_tokens=4)
        tx.send(ROOM + 1, data)
        assert rx.wait(ROOM + 1, 20) is TransferStatus.Success
        for sock in socks.values():
            sock.close(0)
    ctx.term()
