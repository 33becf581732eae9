"""Hostile or broken peers on one host, with real sockets: a flood of made-up
identities, forged bootstraps, and errors in the I/O loop never stop an endpoint
or fail someone else's room."""

from __future__ import annotations

import logging
import time

import pytest
import torch
import zmq

from kvpoll import Receiver, Sender, TransferStatus
from kvpoll.protocol.messages import Bootstrap, Heartbeat, encode
from tests.conftest import FAST
from tests.helpers import ScriptedPeer

S = TransferStatus


def good_room(tx: Sender, rx: Receiver, room: int) -> None:
    tx.add(room)
    rx.open(room, tx.address, row_shape=(4,), dtype=torch.float32, allocated_tokens=2)
    tx.send(room, torch.ones(2, 4))
    assert rx.wait(room, 20) is S.Success


def test_a_flood_of_made_up_identities_cannot_exhaust_sockets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with (
        Sender("zmq", transport_options={"max_peers": 32}, **FAST) as tx,
        Receiver("zmq", **FAST) as rx,
    ):
        good_room(tx, rx, 1)  # warm: the real peer's socket exists
        with caplog.at_level(logging.WARNING, logger="kvpoll"):
            for i in range(400):  # each a different claimed address, each answered
                rogue = ctx.socket(zmq.DEALER)
                rogue.setsockopt(zmq.LINGER, 5000)
                rogue.setsockopt(zmq.IDENTITY, f"tcp://127.0.0.1:{20000 + i}".encode())
                rogue.connect(tx.address)
                rogue.send_multipart([b"C", encode(Heartbeat(seq=i))])
                rogue.close()  # delivered within the linger
            deadline = time.monotonic() + 30
            # messages_in counts a heartbeat before its answer opens a socket (and
            # closes the oldest): wait for the answers too, not only the arrivals
            while tx.stats["messages_in"] < 400 or tx.stats["peers_dropped"] < 400 - 32:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        stats = tx.stats
        assert stats["messages_in"] >= 400, stats
        assert stats["peers_dropped"] >= 400 - 32  # the oldest sockets were closed
        assert len(tx.transport._dealers) <= 32
        good_room(tx, rx, 2)  # the endpoint still works for real peers
    ctx.term()


def test_a_forged_bootstrap_for_a_taken_rank_does_not_fail_the_room() -> None:
    with Sender("zmq", **FAST) as tx, Receiver("zmq", **FAST) as rx:
        forger = ScriptedPeer()
        try:
            tx.add(7)
            rx.open(7, tx.address, row_shape=(4,), dtype=torch.float32, allocated_tokens=2)
            deadline = time.monotonic() + 20
            while tx.poll(7) is not S.WaitingForInput:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            buffer = forger.transport.allocate(2 * 16)
            forger.send(
                tx.address,
                Bootstrap(
                    room=7,
                    session=1,
                    region=buffer.descriptor,
                    allocated_tokens=2,
                    row_bytes=16,
                    dtype="float32",
                    row_shape=[4],
                    transports=["carrier-pigeon"],  # matches nothing
                ),
            )
            deadline = time.monotonic() + 20
            while tx.stats["rejected"] < 1:
                assert time.monotonic() < deadline, tx.stats
                time.sleep(0.01)
            assert tx.poll(7) is S.WaitingForInput  # refused alone, the room unharmed
            tx.send(7, torch.ones(2, 4))
            assert rx.wait(7, 20) is S.Success
        finally:
            forger.close()


def test_an_error_in_one_turn_of_the_io_loop_does_not_stop_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with Sender("zmq", **FAST) as tx, Receiver("zmq", **FAST) as rx:
        calls = {"n": 0}
        real = type(tx)._tick

        def flaky(self: Sender) -> float:
            calls["n"] += 1
            if calls["n"] <= 3:
                raise zmq.ZMQError(24, "Too many open files")  # what fd exhaustion raised
            return float(real(self))

        monkeypatch.setattr(type(tx), "_tick", flaky)
        deadline = time.monotonic() + 10
        while calls["n"] <= 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert tx._thread.is_alive()
        assert tx.stats["internal_errors"] >= 3
        monkeypatch.setattr(type(tx), "_tick", real)
        good_room(tx, rx, 9)


def test_a_flood_of_malformed_messages_logs_a_summary_not_a_line_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with Receiver("zmq", **FAST) as rx:
        rogue = ctx.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.setsockopt(zmq.IDENTITY, b"tcp://127.0.0.1:1")
        rogue.connect(rx.address)
        try:
            with caplog.at_level(logging.WARNING, logger="kvpoll"):
                for _ in range(500):
                    rogue.send_multipart([b"C", b'{"type": "nonsense", "secret": "PAYLOAD"}'])
                deadline = time.monotonic() + 20
                while rx.stats["malformed"] < 500:
                    assert time.monotonic() < deadline, rx.stats
                    time.sleep(0.01)
        finally:
            rogue.close(0)
        lines = [r.getMessage() for r in caplog.records if r.name.startswith("kvpoll")]
        assert len(lines) <= 12  # the burst, and one line saying the rest are counted
        assert any("counted, not logged" in line for line in lines)
        assert not any("PAYLOAD" in line for line in lines)
    ctx.term()
