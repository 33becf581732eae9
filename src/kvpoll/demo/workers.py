"""The demo's processes: one sender ("encoder") and N receivers ("language model").

Each runs in its own process, reports every status step of its rooms to the
orchestrator through a queue, and obeys commands from another queue. Data is
random but reproducible: both sides derive it from the room and a seed, so the
receiver can check what arrived bit for bit.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Settings:
    transport: str
    options: dict[str, Any]
    hidden: int
    dtype: str
    capacity: int
    destinations: int
    heartbeat: float
    misses: int
    seed: int


@dataclass(frozen=True)
class RoomSpec:
    room: int
    tokens: int
    auto_resume: bool = True


def make_data(spec: RoomSpec, settings: Settings) -> torch.Tensor:
    """The room's data, the same in every process."""
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + spec.room)
    return torch.randn(spec.tokens, settings.hidden, generator=gen).to(DTYPES[settings.dtype])


Events = "multiprocessing.queues.Queue[dict[str, Any]]"


def _on_status(events: Any, who: str) -> Any:
    def report(change: Any) -> None:
        record = asdict(change)
        record.update(kind="status", who=who, source=change.source.name, dest=change.dest.name)
        events.put(record)

    return report


def sender_main(settings: Settings, commands: Any, events: Any) -> None:
    """Run the sender until told to exit (or killed)."""
    from kvpoll.protocol import Sender

    logging.basicConfig(level=logging.ERROR)
    keep: dict[int, torch.Tensor] = {}
    tx = Sender(
        settings.transport,
        transport_options=settings.options,
        heartbeat_interval=settings.heartbeat,
        heartbeat_misses=settings.misses,
        on_status=_on_status(events, "encoder"),
    )
    try:
        events.put({"kind": "ready", "who": "encoder", "address": tx.address})
        while True:
            command = commands.get(timeout=600)
            if command[0] == "exit":
                break
            spec: RoomSpec = command[1]
            keep[spec.room] = make_data(spec, settings)
            tx.add(spec.room, required_destinations=settings.destinations)
            events.put({"kind": "sending", "who": "encoder", "room": spec.room, "at": time.time()})
            tx.send(spec.room, keep[spec.room], aux=f"room {spec.room}".encode())
    finally:
        tx.close()


def receiver_main(settings: Settings, rank: int, sender: str, commands: Any, events: Any) -> None:
    """Run receiver ``rank`` until told to exit."""
    from kvpoll.protocol import Receiver

    logging.basicConfig(level=logging.ERROR)
    who = f"lm rank {rank}"
    rx = Receiver(
        settings.transport,
        transport_options=settings.options,
        heartbeat_interval=settings.heartbeat,
        heartbeat_misses=settings.misses,
        on_status=_on_status(events, who),
    )
    dtype = DTYPES[settings.dtype]
    try:
        events.put({"kind": "ready", "who": who, "address": rx.address})
        while True:
            try:
                command = commands.get(timeout=600)
            except queue.Empty:
                break
            if command[0] == "exit":
                break
            spec: RoomSpec = command[1]
            limit: float = command[2]
            start = time.time()
            rx.open(
                spec.room,
                sender,
                row_shape=(settings.hidden,),
                dtype=dtype,
                allocated_tokens=settings.capacity,
                rank=rank,
                auto_resume=spec.auto_resume,
            )
            status = rx.wait(spec.room, limit)
            done = time.time()
            info = rx.info(spec.room)
            matched = None
            nbytes = 0
            if status.name == "Success":
                got = rx.result(spec.room).tensor()
                expected = make_data(spec, settings)
                matched = got.shape == expected.shape and torch.equal(
                    got.contiguous().view(torch.uint8), expected.view(torch.uint8)
                )
                nbytes = got.numel() * got.element_size()
            events.put(
                {
                    "kind": "done",
                    "who": who,
                    "room": spec.room,
                    "status": status.name,
                    "reason": info.reason,
                    "matched": matched,
                    "bytes": nbytes,
                    "seconds": done - start,
                    "at": done,
                    "chunks": len(rx.chunks(spec.room)),
                }
            )
            rx.remove(spec.room)
    finally:
        rx.close()
