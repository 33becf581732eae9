"""The soak's hostile traffic: malformed frames, forged bootstraps and aborts,
and heartbeats that ask for replies to an address nobody listens on, sent to
every endpoint from made-up identities for as long as the soak runs."""

from __future__ import annotations

import random
import threading

import zmq

from kvpoll.protocol.messages import Abort, Bootstrap, Heartbeat, encode
from kvpoll.transports.base import RegionDescriptor

__all__ = ["Injector"]

_ROGUE = "tcp://127.0.0.1:9"  # a made-up identity: nothing listens there


class Injector:
    """A thread that sends hostile traffic to ``targets`` (addresses; replaceable
    while it runs, for restarted peers) until :meth:`stop`."""

    def __init__(self, targets: list[str], sender: str, *, interval: float = 0.02) -> None:
        self.targets = list(targets)
        self._sender = sender
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvpoll-soak-injector")
        self.counts = {"malformed frames": 0, "forged bootstraps": 0, "forged aborts": 0}
        self._random = random.Random(7)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sockets: dict[str, zmq.Socket[bytes]] = {}
        region = RegionDescriptor(transport="zmq", endpoint=_ROGUE, region_id=1, nbytes=1 << 20)
        try:
            while not self._stop.wait(self._interval):
                for address in list(self.targets):
                    sock = sockets.get(address)
                    if sock is None:
                        sock = sockets[address] = ctx.socket(zmq.DEALER)
                        sock.setsockopt(zmq.LINGER, 0)
                        sock.setsockopt(zmq.SNDHWM, 1000)
                        sock.setsockopt(zmq.IDENTITY, _ROGUE.encode())
                        sock.connect(address)
                    self._burst(sock, address == self._sender, region)
        finally:
            for sock in sockets.values():
                sock.close(0)
            ctx.term()

    def _burst(self, sock: zmq.Socket[bytes], sender: bool, region: RegionDescriptor) -> None:
        rnd = self._random
        frames = [
            [b"C", rnd.randbytes(rnd.randrange(64))],
            [b"C", b'{"v": 1, "type": "chunk", "room": "x"}'],
            [b"W", rnd.randbytes(29), rnd.randbytes(16)],
            [b"A", rnd.randbytes(9)],
            [rnd.randbytes(2)],
            [b"C", encode(Heartbeat(seq=rnd.randrange(1 << 30)))],
        ]
        room = rnd.randrange(1, 1 << 16)  # the soak's room ids are small: some are live
        forged = [
            [b"C", encode(Abort(room=room, session=rnd.randrange(1 << 62), reason="forged"))],
        ]
        if sender:
            bootstrap = Bootstrap(
                room=room,
                session=rnd.randrange(1 << 62),
                region=region,
                allocated_tokens=4,
                row_bytes=128,
                dtype="bfloat16",
                row_shape=[64],
                transports=["zmq/tcp", "ucx", "nixl", "mooncake"],
            )
            forged.append([b"C", encode(bootstrap)])
        for message in frames + forged:
            try:
                sock.send_multipart(message, zmq.NOBLOCK)
            except zmq.Again:
                return  # the target reads slower than this: fine, it is bounded
        self.counts["malformed frames"] += len(frames)
        self.counts["forged aborts"] += 1
        self.counts["forged bootstraps"] += int(sender)
