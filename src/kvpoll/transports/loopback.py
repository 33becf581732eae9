"""``loopback``: an in-process reference transport.

Endpoints in one process find each other by address through a process-wide
fabric. A write copies straight into the peer's region; messages go into the
peer's inbox. It shows the contract in its simplest form and serves tests
that need no sockets.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Sequence
from typing import ClassVar

import torch

from kvpoll.transports.base import (
    Capabilities,
    MessageReceived,
    PeerClosed,
    Region,
    RegionDescriptor,
    Span,
    Transport,
    TransportError,
    TransportEvent,
    WriteDone,
    as_bytes,
    check_batch,
    copy_bytes,
    new_region_id,
)

__all__ = ["LoopbackTransport"]

_FABRIC: dict[str, LoopbackTransport] = {}
_FABRIC_LOCK = threading.Lock()
_NAMES = itertools.count(1)


class LoopbackTransport(Transport):
    """In-process transport. ``LoopbackTransport()`` gets a fresh address."""

    name: ClassVar[str] = "loopback"
    capabilities: ClassVar[Capabilities] = Capabilities(
        zero_copy=True,
        same_host_only=True,
        device_memory=False,
        cross_process=False,
        notices=True,
    )

    def __init__(self) -> None:
        self._address = f"loopback://{next(_NAMES)}"
        self._cond = threading.Condition()
        self._inbox: deque[TransportEvent] = deque()
        self._regions: dict[int, Region] = {}
        self._peers: set[str] = set()
        self._write_ids = itertools.count(1)
        self._closed = False
        with _FABRIC_LOCK:
            _FABRIC[self._address] = self

    @property
    def address(self) -> str:
        return self._address

    def register(self, tensor: torch.Tensor) -> Region:
        self._check_open()
        if tensor.device.type != "cpu":
            raise TransportError("the loopback transport registers CPU memory only")
        data = as_bytes(tensor)
        region = Region(
            RegionDescriptor(
                transport=self.name,
                endpoint=self._address,
                region_id=new_region_id(),
                nbytes=data.numel(),
            ),
            data,
        )
        with self._cond:
            self._regions[region.descriptor.region_id] = region
        return region

    def allocate(self, nbytes: int) -> Region:
        region = self.register(torch.zeros(nbytes, dtype=torch.uint8))
        region.pooled = True
        return region

    def release(self, region: Region, *, reuse: bool = True) -> None:
        with self._cond:
            self._regions.pop(region.descriptor.region_id, None)

    def write_batch(self, spans: Sequence[Span], notice: bytes | None = None) -> int:
        self._check_open()
        address = check_batch(spans)
        write_id = next(self._write_ids)
        error = None
        with _FABRIC_LOCK:
            peer = _FABRIC.get(address)
        if peer is None:
            error = f"peer {address} is closed or unknown"
        else:
            for span in spans:  # a loop of copies
                data = span.src.data[span.src_offset : span.src_offset + span.nbytes]
                error = peer._accept_write(data, span.dst, span.dst_offset)
                if error is not None:
                    break
            if error is None and notice is not None:  # after the copies, as the data
                peer._post(MessageReceived(self._address, bytes(notice)))
        self._post(WriteDone(write_id, error))
        return write_id

    def _accept_write(self, data: torch.Tensor, dst: RegionDescriptor, offset: int) -> str | None:
        with self._cond:
            if self._closed:
                return f"peer {self._address} is closed"
            region = self._regions.get(dst.region_id)
            if region is None:
                return f"region {dst.region_id} is not registered at {self._address}"
            if offset + data.numel() > region.nbytes:
                return (
                    f"bytes {offset}..{offset + data.numel()} are outside region "
                    f"{dst.region_id} of {region.nbytes} bytes"
                )
            copy_bytes(region.data[offset : offset + data.numel()], data)
            return None

    def send(self, peer: str, payload: bytes) -> None:
        self._check_open()
        with _FABRIC_LOCK:
            target = _FABRIC.get(peer)
        self._peers.add(peer)
        if target is not None:
            target._peers.add(self._address)
            target._post(MessageReceived(self._address, bytes(payload)))

    def _post(self, event: TransportEvent) -> None:
        with self._cond:
            if not self._closed:
                self._inbox.append(event)
                self._cond.notify_all()

    def progress(self, timeout: float) -> list[TransportEvent]:
        self._check_open()
        with self._cond:
            if not self._inbox and timeout > 0:
                self._cond.wait(timeout)
            events = list(self._inbox)
            self._inbox.clear()
        return events

    def wakeup(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        with _FABRIC_LOCK:
            if self._closed:
                return
            _FABRIC.pop(self._address, None)
            peers = [_FABRIC[p] for p in self._peers if p in _FABRIC]
        with self._cond:
            self._closed = True
            self._regions.clear()
            self._inbox.clear()
            self._cond.notify_all()
        for peer in peers:
            peer._post(PeerClosed(self._address))
