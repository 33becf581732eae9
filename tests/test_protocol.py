"""Sender and Receiver over real ZMQ sockets: the protocol and the bugs it must not have.

The numbered comments refer to the bugs in the field notes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from kvpoll import (
    DuplicateRoom,
    EndpointClosed,
    IllegalTransition,
    InvalidArgument,
    Receiver,
    Sender,
    TransferIncomplete,
    UnknownRoom,
)
from kvpoll import TransferStatus as S
from kvpoll.protocol.messages import (
    Abort,
    AbortAck,
    Bootstrap,
    BootstrapAck,
    Chunk,
    Reject,
    Resume,
)
from kvpoll.protocol.sender import dtype_name
from tests.conftest import FAST
from tests.helpers import ScriptedPeer, own_segments, wait_until

HIDDEN = 64


def kvpoll_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("kvpoll-")]


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every endpoint's I/O thread is joined and every segment unlinked."""
    segments = own_segments()
    yield
    wait_until(lambda: not kvpoll_threads(), 10, f"threads to stop: {kvpoll_threads()}")
    assert own_segments() <= segments, "shared memory segments were left behind"


def data(tokens: int, seed: int = 0, hidden: int = HIDDEN) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)


def open_room(rx: Receiver, tx: Sender, room: int, **kw: object) -> None:
    kw.setdefault("allocated_tokens", 1024)
    rx.open(room, tx.address, row_shape=(HIDDEN,), dtype=torch.bfloat16, **kw)  # type: ignore[arg-type]


def statuses(endpoint: Sender | Receiver, room: int) -> list[S]:
    history = endpoint.info(room).history
    return [history[0].source, *(t.dest for t in history)] if history else [S.Bootstrapping]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


# -- the transfer scenarios --------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "chunks"), [(500, 1), (1024, 1), (2000, 2), (5000, 5), (2048, 2)]
)
def test_transfer_in_chunks(pair: tuple[Sender, Receiver], tokens: int, chunks: int) -> None:
    tx, rx = pair
    payload = data(tokens)
    tx.add(1)
    tx.send(1, payload, aux=b"aux-data")
    open_room(rx, tx, 1)
    assert rx.wait(1, 20) is S.Success
    assert tx.wait(1, 20) is S.Success
    result = rx.result(1)
    assert len(result.chunks) == chunks  # 13: no empty last chunk when tokens divide evenly
    assert result.total_tokens == tokens
    assert result.aux == b"aux-data"
    assert same(result.tensor(), payload)
    for side in (tx, rx):
        seq = statuses(side, 1)
        assert seq[-1] is S.Success
        # 1: never back to WaitingForInput once Transferring; 2: no early Success
        assert S.WaitingForInput not in seq[seq.index(S.Transferring) :] if chunks > 1 else True
        assert seq.count(S.Success) == 1
        if chunks > 1:
            assert seq[:3] == [S.Bootstrapping, S.WaitingForInput, S.Transferring]
    events = [t.event.value for t in rx.info(1).history]
    assert events.count("resumed") == chunks - 1
    rx.remove(1)
    tx.remove(1)
    with pytest.raises(UnknownRoom):
        rx.poll(1)


def test_single_chunk_is_a_view_of_the_receive_buffer(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    tx.add(1)
    tx.send(1, data(10))
    buffer = torch.zeros(16, HIDDEN, dtype=torch.bfloat16)
    open_room(rx, tx, 1, allocated_tokens=16, buffer=buffer)
    assert rx.wait(1, 10) is S.Success
    chunk = rx.result(1).chunks[0]
    assert chunk.data_ptr() == buffer.data_ptr()  # no copy out
    assert same(buffer[:10], data(10))


def test_bootstrap_may_come_before_add(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    open_room(rx, tx, 9)
    wait_until(lambda: tx.stats["messages_in"] >= 1, what="the bootstrap to arrive")
    assert rx.poll(9) is S.Bootstrapping
    tx.add(9)
    tx.send(9, data(3))
    assert rx.wait(9, 10) is S.Success


def test_a_thousand_concurrent_rooms_through_one_pair(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    rooms = range(1000)
    payloads = {r: data(4, seed=r, hidden=16) for r in rooms}
    for room in rooms:
        tx.add(room)
        tx.send(room, payloads[room])
    for room in rooms:
        rx.open(room, tx.address, row_shape=(16,), dtype=torch.bfloat16, allocated_tokens=8)
    for room in rooms:
        assert rx.wait(room, 60) is S.Success, rx.info(room).reason
    assert all(tx.wait(room, 30) is S.Success for room in rooms)
    assert all(same(rx.result(room).tensor(), payloads[room]) for room in rooms)
    for room in rooms:
        rx.remove(room)
        tx.remove(room)
    assert rx.rooms() == []  # 9: nothing left behind
    assert tx.rooms() == []
    assert len(kvpoll_threads()) == 2  # one I/O thread per endpoint, not per room


# -- fan-in / fan-out ------------------------------------------------------------------


def test_every_destination_gets_all_the_data_and_success_waits_for_all() -> None:
    tx = Sender("zmq", **FAST)
    ranks = [Receiver("zmq", **FAST) for _ in range(3)]
    try:
        payload = data(2500)
        tx.add(1, required_destinations=3)
        tx.send(1, payload)
        open_room(ranks[0], tx, 1, rank=0)
        open_room(ranks[1], tx, 1, rank=1, allocated_tokens=700)
        time.sleep(0.3)
        assert tx.poll(1) is S.Bootstrapping  # 11: not before every destination
        open_room(ranks[2], tx, 1, rank=2)
        for rx in ranks:
            assert rx.wait(1, 20) is S.Success
            assert same(rx.result(1).tensor(), payload)  # 4: every rank learns the total
        assert tx.wait(1, 10) is S.Success
        assert len(ranks[0].result(1).chunks) == 4  # chunks fit the smallest buffer
    finally:
        tx.close()
        for rx in ranks:
            rx.close()


def test_one_failing_destination_fails_the_room_everywhere() -> None:
    tx = Sender("zmq", **FAST)
    ranks = [Receiver("zmq", **FAST) for _ in range(2)]
    try:
        tx.add(1, required_destinations=2)
        tx.send(1, data(3000))
        open_room(ranks[0], tx, 1, rank=0, auto_resume=False)
        open_room(ranks[1], tx, 1, rank=1, auto_resume=False)
        assert ranks[0].wait(1, 0) is not None
        wait_until(lambda: ranks[1].poll(1) is S.Transferring, what="Transferring")
        ranks[1].abort(1, "out of memory")
        for endpoint in (tx, ranks[0], ranks[1]):
            assert endpoint.wait(1, 10) is S.Failed
        assert "out of memory" in (ranks[0].info(1).reason or "")
        wait_until(lambda: ranks[1].stats["abort_acks"] >= 1, what="the abort to be acknowledged")
    finally:
        tx.close()
        for rx in ranks:
            rx.close()


def test_duplicate_rank_is_refused_without_harming_the_room() -> None:
    tx = Sender("zmq", **FAST)
    first, second = Receiver("zmq", **FAST), Receiver("zmq", **FAST)
    try:
        tx.add(5)
        open_room(first, tx, 5)
        assert first.wait(5, 0.0) is not None
        wait_until(lambda: first.poll(5) is S.WaitingForInput, what="the bootstrap")
        open_room(second, tx, 5)  # 8: a duplicate room id from another client
        assert second.wait(5, 10) is S.Failed
        assert "already bootstrapped" in (second.info(5).reason or "")
        tx.send(5, data(10))
        assert first.wait(5, 10) is S.Success
    finally:
        for endpoint in (tx, first, second):
            endpoint.close()


# -- failures reach both sides ---------------------------------------------------------


def test_sender_abort_reaches_the_receiver(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    tx.add(1)
    tx.send(1, data(3000))
    open_room(rx, tx, 1, auto_resume=False)
    wait_until(lambda: rx.poll(1) is S.Transferring, what="Transferring")
    start = time.monotonic()
    tx.abort(1, "encoder crashed")
    assert rx.wait(1, 5) is S.Failed  # 10: well before any heartbeat or time-out
    assert time.monotonic() - start < 1.0
    assert "encoder crashed" in (rx.info(1).reason or "")
    wait_until(lambda: tx.stats["abort_acks"] >= 1, what="the abort acknowledgement")  # 14


def test_transferring_times_out_on_both_sides() -> None:
    timeouts = {S.Transferring: 0.5}
    with (
        Sender("zmq", timeouts=timeouts, **FAST) as tx,
        Receiver("zmq", timeouts={S.Transferring: 30}, **FAST) as rx,
    ):
        tx.add(1)
        tx.send(1, data(2000))
        open_room(rx, tx, 1, auto_resume=False)  # the receiver never resumes: stuck
        assert tx.wait(1, 10) is S.Failed  # 6: a time-out in Transferring too
        assert tx.info(1).reason == "timed out in Transferring after 0.5 s"
        assert rx.wait(1, 10) is S.Failed
        assert "timed out in Transferring" in (rx.info(1).reason or "")


def test_a_lost_chunk_notice_ends_in_a_time_out_not_a_hang() -> None:
    peer = ScriptedPeer()
    rx = Receiver("zmq", timeouts={S.WaitingForInput: 0.5}, **FAST)
    try:
        rx.open(1, peer.address, row_shape=(HIDDEN,), dtype=torch.bfloat16)
        boot = peer.receive(Bootstrap)
        peer.send(rx.address, BootstrapAck(room=1, session=boot.session))
        wait_until(lambda: rx.poll(1) is S.WaitingForInput, what="WaitingForInput")
        # 12: the chunk notice never comes; heartbeats keep the peer alive
        deadline = time.monotonic() + 10
        while rx.poll(1) is not S.Failed and time.monotonic() < deadline:
            for event in peer.transport.progress(0.05):
                del event  # the scripted peer answers nothing but stays connected
        assert rx.poll(1) is S.Failed
        assert rx.info(1).reason == "timed out in WaitingForInput after 0.5 s"
    finally:
        rx.close()
        peer.close()


def test_bootstrap_for_a_room_never_added_is_rejected_after_the_time_out() -> None:
    with (
        Sender("zmq", timeouts={S.Bootstrapping: 0.3}, **FAST) as tx,
        Receiver("zmq", **FAST) as rx,
    ):
        open_room(rx, tx, 77)
        assert rx.wait(77, 10) is S.Failed
        assert "no room 77 was added" in (rx.info(77).reason or "")


def test_row_shape_mismatch_fails_with_a_clear_reason(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    tx.add(1)
    tx.send(1, data(10, hidden=HIDDEN * 2))
    open_room(rx, tx, 1)
    assert tx.wait(1, 10) is S.Failed
    assert "expects rows of [64] bfloat16" in (tx.info(1).reason or "")
    assert rx.wait(1, 10) is S.Failed


def test_closing_an_endpoint_fails_its_rooms_at_the_peer() -> None:
    tx = Sender("zmq", **FAST)
    rx = Receiver("zmq", **FAST)
    try:
        tx.add(1)
        open_room(rx, tx, 1)
        wait_until(lambda: rx.poll(1) is S.WaitingForInput, what="WaitingForInput")
        tx.close()
        assert rx.wait(1, 5) is S.Failed
        with pytest.raises(EndpointClosed):
            tx.add(2)
    finally:
        rx.close()


# -- bad input never crashes or touches another room ----------------------------------


def test_malformed_and_foreign_messages_are_counted_and_harmless(
    pair: tuple[Sender, Receiver],
) -> None:
    tx, rx = pair
    rogue = ScriptedPeer()
    try:
        tx.add(1)
        open_room(rx, tx, 1)
        wait_until(lambda: rx.poll(1) is S.WaitingForInput, what="WaitingForInput")
        for payload in (
            b"{",
            b"[]",
            b'{"v": 2, "type": "chunk"}',
            b'{"v": 1, "type": "x"}',
            b'{"v": 1, "type": "chunk", "room": 1}',
            b"\xff\xfe",
        ):
            rogue.send_raw(rx.address, payload)
            rogue.send_raw(tx.address, payload)
        # well-formed, but from a stranger: must not touch room 1
        rogue.send(rx.address, Abort(room=1, session=0, reason="hijack"))
        rogue.send(
            rx.address,
            Chunk(room=1, session=0, sent_tokens=5, chunk_tokens=5, is_last=True, total_tokens=5),
        )
        rogue.send(tx.address, Abort(room=1, session=0, reason="hijack"))
        rogue.receive(AbortAck)
        wait_until(
            lambda: rx.stats["malformed"] >= 6 and tx.stats["malformed"] >= 6,
            what="malformed messages to be counted",
        )
        assert rx.stats["internal_errors"] == tx.stats["internal_errors"] == 0
        assert rx.poll(1) is S.WaitingForInput
        tx.send(1, data(20))
        assert rx.wait(1, 10) is S.Success
        assert same(rx.result(1).tensor(), data(20))
    finally:
        rogue.close()


def test_out_of_bounds_chunk_fails_only_its_room() -> None:
    peer = ScriptedPeer()
    rx = Receiver("zmq", **FAST)
    try:
        for room in (1, 2):
            rx.open(
                room, peer.address, row_shape=(HIDDEN,), dtype=torch.bfloat16, allocated_tokens=8
            )
        boots = {b.room: b for b in (peer.receive(Bootstrap), peer.receive(Bootstrap))}
        for room, boot in boots.items():
            peer.send(rx.address, BootstrapAck(room=room, session=boot.session))
        wait_until(
            lambda: rx.poll(1) is S.WaitingForInput and rx.poll(2) is S.WaitingForInput,
            what="both rooms waiting",
        )
        peer.send(
            rx.address,
            Chunk(
                room=1,
                session=boots[1].session,
                sent_tokens=9,
                chunk_tokens=9,
                is_last=True,
                total_tokens=9,
            ),
        )
        assert rx.wait(1, 5) is S.Failed
        assert "a chunk of 9 tokens for a buffer of 8" in (rx.info(1).reason or "")
        assert isinstance(peer.receive(Abort), Abort)
        assert rx.poll(2) is S.WaitingForInput
        peer.send(
            rx.address,
            Chunk(
                room=2,
                session=boots[2].session,
                sent_tokens=3,
                chunk_tokens=3,
                is_last=False,
                total_tokens=3,
            ),
        )
        assert rx.wait(2, 5) is S.Failed  # is_last=False with all tokens delivered: a lie
        assert rx.stats["internal_errors"] == 0
    finally:
        rx.close()
        peer.close()


def test_resume_rewind_fails_but_a_duplicate_resume_is_harmless() -> None:
    peer = ScriptedPeer()
    tx = Sender("zmq", **FAST)
    try:
        for room in (1, 2):
            tx.add(room)
            tx.send(room, data(30))
            buffer = peer.transport.allocate(10 * HIDDEN * 2)
            peer.send(
                tx.address,
                Bootstrap(
                    room=room,
                    session=room * 10,
                    region=buffer.descriptor,
                    allocated_tokens=10,
                    row_bytes=HIDDEN * 2,
                    dtype=dtype_name(torch.bfloat16),
                    row_shape=[HIDDEN],
                ),
            )
            assert peer.receive(BootstrapAck).room == room
            chunk = peer.receive(Chunk)
            assert (chunk.sent_tokens, chunk.is_last, chunk.total_tokens) == (10, False, 30)
            again = peer.transport.allocate(10 * HIDDEN * 2)
            resume = Resume(
                room=room,
                session=room * 10,
                sent_tokens=10,
                region=again.descriptor,
                allocated_tokens=10,
            )
            if room == 1:  # 5: the duplicate is recognised by sent_tokens
                peer.send(tx.address, resume)
                peer.send(tx.address, resume)
                assert peer.receive(Chunk).sent_tokens == 20
            else:  # a rewind to 0 after 10 tokens were delivered
                peer.send(tx.address, resume.model_copy(update={"sent_tokens": 0}))
                assert tx.wait(2, 5) is S.Failed
                assert "resumed with sent_tokens=0" in (tx.info(2).reason or "")
                assert peer.receive(Abort).room == 2
        assert tx.poll(1) is S.Transferring
        assert tx.stats["late"] >= 1
    finally:
        tx.close()
        peer.close()


# -- late messages and removed rooms ------------------------------------------------------


def test_late_failure_after_removal_never_recreates_or_fails_a_reused_id() -> None:
    peer = ScriptedPeer()
    rx = Receiver("zmq", **FAST)
    try:
        rx.open(3, peer.address, row_shape=(HIDDEN,), dtype=torch.bfloat16)
        old = peer.receive(Bootstrap)
        peer.send(rx.address, BootstrapAck(room=3, session=old.session))
        wait_until(lambda: rx.poll(3) is S.WaitingForInput, what="WaitingForInput")
        rx.remove(3)
        peer.receive(Abort)  # removing an unfinished room aborts it at the peer
        peer.send(rx.address, Abort(room=3, session=old.session, reason="late"))  # 7
        peer.receive(AbortAck)
        assert rx.rooms() == []
        assert rx.stats["late"] >= 1
        rx.open(3, peer.address, row_shape=(HIDDEN,), dtype=torch.bfloat16)  # reused id
        new = peer.receive(Bootstrap)
        assert new.session != old.session
        peer.send(rx.address, Abort(room=3, session=old.session, reason="late again"))
        peer.receive(AbortAck)
        assert rx.poll(3) is S.Bootstrapping
        peer.send(rx.address, Reject(room=3, session=old.session, reason="stale"))
        time.sleep(0.2)
        assert rx.poll(3) is S.Bootstrapping
    finally:
        rx.close()
        peer.close()


# -- the application API -----------------------------------------------------------------


def test_api_errors_are_typed(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    tx.add(1)
    with pytest.raises(DuplicateRoom):
        tx.add(1)
    with pytest.raises(UnknownRoom):
        tx.send(2, data(1))
    with pytest.raises(InvalidArgument):
        tx.send(1, torch.zeros(0, HIDDEN))  # 13: nothing to send is refused up front
    with pytest.raises(InvalidArgument):
        tx.send(1, data(8).t())  # not contiguous
    with pytest.raises(InvalidArgument):
        tx.add("one")  # type: ignore[arg-type]
    tx.send(1, data(4))
    with pytest.raises(IllegalTransition):
        tx.send(1, data(4))
    open_room(rx, tx, 1)
    with pytest.raises(DuplicateRoom):
        open_room(rx, tx, 1)
    with pytest.raises(InvalidArgument):
        rx.open(2, tx.address, row_shape=(0,), dtype=torch.bfloat16)
    with pytest.raises(InvalidArgument):
        open_room(rx, tx, 2, buffer=torch.zeros(4, HIDDEN + 1, dtype=torch.bfloat16))
    with pytest.raises(UnknownRoom):
        rx.result(99)
    assert rx.wait(1, 10) is S.Success
    with pytest.raises(IllegalTransition):
        rx.resume(1)


def test_result_before_success_says_why(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    open_room(rx, tx, 1)
    with pytest.raises(TransferIncomplete, match="room 1 is Bootstrapping"):
        rx.result(1)
    assert rx.wait(1, 0.1) is S.Bootstrapping  # wait returns when time runs out
    assert rx.poll(1) is S.Bootstrapping


def test_manual_resume_with_the_application_s_buffer(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    payload = data(25)
    tx.add(1)
    tx.send(1, payload)
    open_room(rx, tx, 1, allocated_tokens=10, auto_resume=False)
    for expected_chunks in (1, 2):
        wait_until(lambda n=expected_chunks: len(rx.chunks(1)) == n, what="a chunk")
        assert rx.poll(1) is S.Transferring
        assert tx.poll(1) is S.Transferring
        rx.resume(1, buffer=torch.empty(10, HIDDEN, dtype=torch.bfloat16))
    # the last 5 tokens fit the last buffer: until they land the room has memory left,
    # then it is Success; a resume is illegal either way (after the first resume the
    # next chunk may fill its buffer at once, so only this one is certain)
    with pytest.raises(IllegalTransition):
        rx.resume(1)
    assert rx.wait(1, 10) is S.Success
    assert same(rx.result(1).tensor(), payload)


def test_on_status_sees_every_step_and_survives_a_bad_callback() -> None:
    seen: list[tuple[str, int, str, str]] = []

    def record(change: object) -> None:
        seen.append((change.side, change.room, change.source.name, change.dest.name))  # type: ignore[attr-defined]
        raise RuntimeError("a careless callback")

    with (
        Sender("zmq", on_status=record, **FAST) as tx,
        Receiver("zmq", on_status=record, **FAST) as rx,
    ):
        tx.add(1)
        tx.send(1, data(1500))
        open_room(rx, tx, 1)
        assert rx.wait(1, 10) is S.Success
        assert tx.wait(1, 10) is S.Success
    assert ("receiver", 1, "Transferring", "Success") in seen
    assert ("sender", 1, "Bootstrapping", "WaitingForInput") in seen
    assert len([s for s in seen if s[0] == "receiver"]) == 4


def _inline_bootstrap(peer: ScriptedPeer, room: int, ack_with_chunk: bool) -> Bootstrap:
    buffer = peer.transport.allocate(8 * HIDDEN * 2)
    return Bootstrap(
        room=room,
        session=room * 10,
        region=buffer.descriptor,
        allocated_tokens=8,
        row_bytes=HIDDEN * 2,
        dtype=dtype_name(torch.bfloat16),
        row_shape=[HIDDEN],
        ack_with_chunk=ack_with_chunk,
    )


def test_the_first_chunk_acknowledges_the_bootstrap_when_the_data_is_all_there() -> None:
    peer = ScriptedPeer()
    tx = Sender("zmq", **FAST)
    try:
        # data complete before the bootstrap: one message back, the chunk, acknowledging
        tx.add(1)
        tx.send(1, data(8))
        peer.send(tx.address, _inline_bootstrap(peer, 1, ack_with_chunk=True))
        chunk = peer.receive(Chunk)
        assert chunk.transport == "zmq/shm"
        assert chunk.is_last
        assert tx.wait(1, 5) is S.Success
        # no data yet: the acknowledgement comes at once, alone; the chunk says nothing more
        tx.add(2)
        peer.send(tx.address, _inline_bootstrap(peer, 2, ack_with_chunk=True))
        assert peer.receive(BootstrapAck).room == 2
        tx.send(2, data(8))
        assert peer.receive(Chunk).transport is None
        # a receiver that did not ask (an older one) always gets bootstrap_ack first
        tx.add(3)
        tx.send(3, data(8))
        peer.send(tx.address, _inline_bootstrap(peer, 3, ack_with_chunk=False))
        assert peer.receive(BootstrapAck).room == 3
        assert peer.receive(Chunk).transport is None
        assert not [m for _, m in peer.inbox if isinstance(m, BootstrapAck)]  # none for room 1
    finally:
        tx.close()
        peer.close()


def test_a_receiver_steps_through_waiting_for_input_on_an_acknowledging_chunk() -> None:
    tx, rx = Sender("zmq", **FAST), Receiver("zmq", **FAST)
    try:
        tx.add(1)
        tx.send(1, data(8))
        open_room(rx, tx, 1)
        assert rx.wait(1, 5) is S.Success
        steps = [(t.source.name, t.dest.name) for t in rx.info(1).history]
        assert steps == [("Bootstrapping", "WaitingForInput"), ("WaitingForInput", "Success")]
        assert rx.info(1).paths == ("zmq/shm",)
        assert rx.stats["messages_in"] == 1  # the chunk alone
    finally:
        tx.close()
        rx.close()


def test_an_acknowledging_chunk_for_a_room_past_bootstrapping_is_just_a_chunk() -> None:
    peer = ScriptedPeer()
    rx = Receiver("zmq", **FAST)
    try:
        rx.open(1, peer.address, row_shape=(HIDDEN,), dtype=torch.bfloat16, allocated_tokens=8)
        boot = peer.receive(Bootstrap)
        assert boot.ack_with_chunk
        peer.send(rx.address, BootstrapAck(room=1, session=boot.session, transport="zmq/shm"))
        wait_until(lambda: rx.poll(1) is S.WaitingForInput, 5)
        peer.send(
            rx.address,
            Chunk(
                room=1,
                session=boot.session,
                sent_tokens=8,
                chunk_tokens=8,
                is_last=True,
                total_tokens=8,
                transport="zmq/shm",
            ),
        )
        assert rx.wait(1, 5) is S.Success
    finally:
        rx.close()
        peer.close()
