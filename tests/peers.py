"""Peer processes for the integration tests (run with multiprocessing's spawn)."""

from __future__ import annotations

import time
from typing import Any

import torch

HIDDEN = 64


def payload(room: int, tokens: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(room)
    return torch.randn(tokens, HIDDEN, generator=gen).to(torch.bfloat16)


def sender_process(plan: dict[int, int | None], info: Any, heartbeat: float) -> None:
    """Add one room per ``plan`` entry (tokens, or None: no data), then serve until killed."""
    from kvpoll.protocol import Sender

    tx = Sender("zmq", heartbeat_interval=heartbeat)
    info.put(tx.address)
    keep = {}
    for room, tokens in plan.items():
        tx.add(room)
        if tokens is not None:
            keep[room] = payload(room, tokens)
            tx.send(room, keep[room])
    time.sleep(600)


def receiver_process(sender: str, rooms: list[int], info: Any, heartbeat: float) -> None:
    """Open ``rooms`` toward ``sender`` without resuming, then serve until killed."""
    from kvpoll.protocol import Receiver

    rx = Receiver("zmq", heartbeat_interval=heartbeat)
    for room in rooms:
        rx.open(
            room,
            sender,
            row_shape=(HIDDEN,),
            dtype=torch.bfloat16,
            allocated_tokens=16,
            auto_resume=False,
        )
    info.put("open")
    time.sleep(600)
