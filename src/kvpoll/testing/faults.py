"""Fault injection: a transport that fails on the calls a test chooses.

:class:`FaultyTransport` wraps a real transport and raises
:class:`InjectedFault` on chosen calls of chosen methods (``send``,
``write_batch``, ``progress``, ...), or turns chosen successful writes into
failed ones. Everything else goes to the real transport, so an endpoint on it
moves real bytes; a test proves that an error at any step fails at most the
rooms it concerns and never stops the endpoint's I/O thread::

    faulty = FaultyTransport(create("zmq"), fail={"send": {2}})
    with Sender(faulty) as tx:   # the second control message it sends raises
        ...
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

import torch

from kvpoll.transports.base import (
    Capabilities,
    Region,
    Span,
    Transport,
    TransportError,
    TransportEvent,
    WriteDone,
)

__all__ = ["FAULT_POINTS", "FaultyTransport", "InjectedFault"]

FAULT_POINTS = ("send", "write_batch", "progress", "register", "allocate", "release")
"""The methods whose calls :class:`FaultyTransport` can make raise."""


class InjectedFault(RuntimeError):
    """Raised by :class:`FaultyTransport` where the test asked for a failure."""


class FaultyTransport(Transport):
    """A transport that delegates to ``inner`` and fails where told.

    Args:
        inner: the real transport (owned: closed with this one).
        fail: method name -> the call numbers (1 = its first call) that raise
            :class:`InjectedFault` instead of doing anything.
        fail_writes: write numbers (1 = the first write_batch) whose
            :class:`~kvpoll.transports.WriteDone` is turned into a failure.
    """

    name: ClassVar[str] = "faulty"
    capabilities: ClassVar[Capabilities] = Capabilities(
        zero_copy=False, same_host_only=False, device_memory=False
    )

    def __init__(
        self,
        inner: Transport,
        *,
        fail: Mapping[str, Iterable[int]] | None = None,
        fail_writes: Iterable[int] = (),
    ) -> None:
        unknown = set(fail or {}) - set(FAULT_POINTS)
        if unknown:
            raise ValueError(f"cannot inject faults into {sorted(unknown)}; known: {FAULT_POINTS}")
        self.inner = inner
        self._fail = {method: set(calls) for method, calls in (fail or {}).items()}
        self._fail_writes = set(fail_writes)
        self._doomed: set[int] = set()
        self.calls: dict[str, int] = dict.fromkeys(FAULT_POINTS, 0)
        self.injected = 0

    def _count(self, method: str) -> None:
        self.calls[method] += 1
        if self.calls[method] in self._fail.get(method, ()):
            self.injected += 1
            raise InjectedFault(f"injected fault: call {self.calls[method]} of {method}()")

    @property
    def address(self) -> str:
        return self.inner.address

    @property
    def stats(self) -> dict[str, int]:
        return {**dict(getattr(self.inner, "stats", {})), "injected_faults": self.injected}

    def register(self, tensor: torch.Tensor) -> Region:
        self._count("register")
        return self.inner.register(tensor)

    def allocate(self, nbytes: int) -> Region:
        self._count("allocate")
        return self.inner.allocate(nbytes)

    def release(self, region: Region, *, reuse: bool = True) -> None:
        self._count("release")
        self.inner.release(region, reuse=reuse)

    def write_batch(self, spans: Sequence[Span], notice: bytes | None = None) -> int:
        if notice is not None:  # a failure it injects must be one the peer never saw
            raise TransportError("the faulty transport delivers no notices")
        self._count("write_batch")
        write_id = self.inner.write_batch(spans)
        if self.calls["write_batch"] in self._fail_writes:
            self._doomed.add(write_id)
        return write_id

    def send(self, peer: str, payload: bytes) -> None:
        self._count("send")
        self.inner.send(peer, payload)

    def progress(self, timeout: float) -> list[TransportEvent]:
        self._count("progress")
        events = self.inner.progress(timeout)
        out: list[TransportEvent] = []
        for event in events:
            if isinstance(event, WriteDone) and event.write_id in self._doomed:
                self._doomed.discard(event.write_id)
                self.injected += 1
                event = WriteDone(event.write_id, "injected fault: the write failed")
            out.append(event)
        return out

    def wakeup(self) -> None:
        self.inner.wakeup()

    def forget(self, peer: str) -> None:
        self.inner.forget(peer)

    def close(self) -> None:
        self.inner.close()

    def memory_kind(self) -> str:
        return self.inner.memory_kind()

    def paths(self) -> list[str]:
        return self.inner.paths()
