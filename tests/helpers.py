"""Test helpers: a scripted peer that speaks the wire protocol by hand, raw sockets."""

from __future__ import annotations

import os
import time
from typing import Any, TypeVar

import zmq

from kvpoll.protocol.messages import Message, decode, encode
from kvpoll.transports.base import MessageReceived
from kvpoll.transports.zmq_transport import ZmqTransport

M = TypeVar("M")


class ScriptedPeer:
    """A real zmq endpoint whose messages the test writes and reads one by one."""

    def __init__(self, **options: Any) -> None:
        self.transport = ZmqTransport(**options)
        self.inbox: list[tuple[str, Message]] = []

    @property
    def address(self) -> str:
        return self.transport.address

    def send(self, peer: str, message: Any) -> None:
        self.transport.send(peer, encode(message))

    def send_raw(self, peer: str, payload: bytes) -> None:
        self.transport.send(peer, payload)

    def receive(self, kind: type[M], timeout: float = 10.0) -> M:
        deadline = time.monotonic() + timeout
        while True:
            for i, (_, message) in enumerate(self.inbox):
                if isinstance(message, kind):
                    del self.inbox[i]
                    return message
            if time.monotonic() > deadline:
                raise AssertionError(f"no {kind.__name__} within {timeout} s; got {self.inbox}")
            for event in self.transport.progress(0.01):
                if isinstance(event, MessageReceived):
                    self.inbox.append((event.peer, decode(event.payload)))

    def close(self) -> None:
        self.transport.close()


def wait_until(condition: Any, timeout: float = 10.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def own_segments() -> set[str]:
    """This process's shared memory: files in /dev/shm (none are made any more)
    and kvpoll's memfds (by inode)."""
    files = {n for n in os.listdir("/dev/shm") if n.startswith(f"kvpoll-{os.getpid()}-")}
    return files | {f"memfd:{inode}" for inode in own_memfds().values()}


def own_memfds() -> dict[int, int]:
    """This process's kvpoll shared memory: file descriptor -> inode."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:kvpoll "):
                out[int(name)] = os.stat(f"/proc/self/fd/{name}").st_ino
        except OSError:
            continue
    return out


def need_transport(name: str) -> None:
    """Skip the test, naming why, when transport ``name`` cannot be loaded here;
    under CI_REQUIRE_ENGINES=1 (CI installs every engine) fail it instead."""
    import pytest

    from kvpoll.transports import TransportUnavailable, resolve

    try:
        resolve(name)
    except TransportUnavailable as exc:
        if os.environ.get("CI_REQUIRE_ENGINES") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def raw_dealer(
    ctx: zmq.Context[zmq.Socket[bytes]], address: str, identity: str, *, hwm: int = 1000
) -> zmq.Socket[bytes]:
    """A bare DEALER connected to ``address`` under ``identity``: frames of the
    test's own making, as a hostile or broken peer would send them."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.SNDTIMEO, 10_000)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.connect(address)
    return sock
