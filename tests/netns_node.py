"""One side of the cross-host test, run inside a network namespace.

python tests/netns_node.py TRANSPORT sender HOST N...  prints its address, serves rooms
python tests/netns_node.py TRANSPORT receiver ADDRESS HOST N...  receives rooms, prints JSON

TRANSPORT is zmq or ucx, each told to use TCP only (the namespaces share /dev/shm).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

HIDDEN = 1024


def payload(room: int, tokens: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(room)
    return torch.randn(tokens, HIDDEN, generator=gen).to(torch.bfloat16)


def tcp_only(transport: str, host: str) -> dict[str, Any]:
    if transport == "ucx":
        return {"host": host, "ucx": {"TLS": "tcp"}}
    return {"host": host, "shm": False}


def sender(transport: str, host: str, sizes: list[int]) -> None:
    from kvpoll.protocol import Sender

    tx = Sender(transport, transport_options=tcp_only(transport, host))
    keep = {room: payload(room, n) for room, n in enumerate(sizes, start=1)}
    for room, data in keep.items():
        tx.add(room)
        tx.send(room, data)
    print(tx.address, flush=True)
    finals = [tx.wait(room, 60).name for room in keep]
    stats = tx.transport.stats  # type: ignore[attr-defined]
    paths = sorted({p for room in keep for p in tx.info(room).paths})
    print(json.dumps({"finals": finals, "stats": stats, "paths": paths}), flush=True)
    tx.close()


def receiver(transport: str, address: str, sizes: list[int], host: str) -> None:
    from kvpoll.protocol import Receiver

    options = tcp_only(transport, host)
    if transport == "zmq":  # listening on every interface, advertising one
        options.update(host="0.0.0.0", advertise=host)
    rx = Receiver(transport, transport_options=options)
    result = []
    for room in range(1, len(sizes) + 1):
        rx.open(room, address, row_shape=(HIDDEN,), dtype=torch.bfloat16, allocated_tokens=256)
    for room, n in enumerate(sizes, start=1):
        status = rx.wait(room, 60)
        ok = status.name == "Success" and torch.equal(
            rx.result(room).tensor().view(torch.uint8), payload(room, n).view(torch.uint8)
        )
        result.append(
            {"room": room, "status": status.name, "matched": ok, "reason": rx.info(room).reason}
        )
    print(json.dumps(result), flush=True)
    rx.close()


if __name__ == "__main__":
    transport, role, where, *rest = sys.argv[1:]
    if role == "sender":
        sender(transport, where, [int(n) for n in rest])
    else:
        receiver(transport, where, [int(n) for n in rest[1:]], rest[0])
