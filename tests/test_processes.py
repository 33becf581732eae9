"""Real peer processes: a peer that dies fails every unfinished room it shared (14)."""

from __future__ import annotations

import time
from typing import Any

import torch

from kvpoll import Receiver, Sender
from kvpoll import TransferStatus as S
from tests.helpers import wait_until
from tests.peers import HIDDEN, payload, receiver_process, sender_process

HEARTBEAT = 0.2
WINDOW = HEARTBEAT * 3


def test_a_dead_sender_fails_every_unfinished_room_and_only_those(spawn: Any) -> None:
    ctx, start = spawn
    info = ctx.Queue()
    # room 1 completes; room 2 stops in Transferring (no resume); room 3 has no data
    proc = start(sender_process, {1: 10, 2: 40, 3: None}, info, HEARTBEAT)
    address = info.get(timeout=60)
    with Receiver("zmq", heartbeat_interval=HEARTBEAT) as rx:
        for room in (1, 2, 3):
            rx.open(
                room,
                address,
                row_shape=(HIDDEN,),
                dtype=torch.bfloat16,
                allocated_tokens=16,
                auto_resume=False,
            )
        assert rx.wait(1, 30) is S.Success
        wait_until(
            lambda: rx.poll(2) is S.Transferring and rx.poll(3) is S.WaitingForInput,
            30,
            "rooms 2 and 3 to be mid-transfer",
        )
        time.sleep(3 * HEARTBEAT)  # heartbeats keep a live sender's rooms alive
        assert (rx.poll(2), rx.poll(3)) == (S.Transferring, S.WaitingForInput)
        proc.kill()
        killed = time.monotonic()
        assert rx.wait(2, 10) is S.Failed
        assert rx.wait(3, 10) is S.Failed
        took = time.monotonic() - killed
        assert took < WINDOW + 1.0, f"noticed after {took:.2f} s"
        assert "silent" in (rx.info(3).reason or "")
        assert rx.poll(1) is S.Success
        assert torch.equal(
            rx.result(1).tensor().view(torch.uint8), payload(1, 10).view(torch.uint8)
        )
        assert rx.stats["peers_lost"] == 1


def test_a_dead_receiver_fails_the_sender_s_rooms(spawn: Any) -> None:
    ctx, start = spawn
    info = ctx.Queue()
    with Sender("zmq", heartbeat_interval=HEARTBEAT) as tx:
        for room in (1, 2):
            tx.add(room)
        tx.send(1, payload(1, 40))
        proc = start(receiver_process, tx.address, [1, 2], info, HEARTBEAT)
        assert info.get(timeout=60) == "open"
        wait_until(
            lambda: tx.poll(1) is S.Transferring and tx.poll(2) is S.WaitingForInput,
            30,
            "rooms mid-transfer",
        )
        proc.kill()
        assert tx.wait(1, 10) is S.Failed
        assert tx.wait(2, 10) is S.Failed
        assert "silent" in (tx.info(2).reason or "")
