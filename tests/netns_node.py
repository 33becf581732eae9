"""One side of the cross-host test, run inside a network namespace.

python tests/netns_node.py sender HOST            prints its address, serves rooms
python tests/netns_node.py receiver ADDRESS HOST N...  receives rooms of N tokens, prints JSON
"""

from __future__ import annotations

import json
import sys

import torch

HIDDEN = 1024


def payload(room: int, tokens: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(room)
    return torch.randn(tokens, HIDDEN, generator=gen).to(torch.bfloat16)


def sender(host: str, sizes: list[int]) -> None:
    from kvpoll.protocol import Sender

    tx = Sender("zmq", transport_options={"host": host, "shm": False})
    keep = {room: payload(room, n) for room, n in enumerate(sizes, start=1)}
    for room, data in keep.items():
        tx.add(room)
        tx.send(room, data)
    print(tx.address, flush=True)
    finals = [tx.wait(room, 60).name for room in keep]
    stats = tx.transport.stats  # type: ignore[attr-defined]
    print(json.dumps({"finals": finals, "stats": stats}), flush=True)
    tx.close()


def receiver(address: str, sizes: list[int], host: str) -> None:
    from kvpoll.protocol import Receiver

    rx = Receiver("zmq", transport_options={"host": "0.0.0.0", "advertise": host, "shm": False})
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
    role, where, *rest = sys.argv[1:]
    if role == "sender":
        sender(where, [int(n) for n in rest])
    else:
        receiver(where, [int(n) for n in rest[1:]], rest[0])
