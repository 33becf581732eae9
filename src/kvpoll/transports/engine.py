"""The shared shape of transports that wrap a one-sided transfer engine (NIXL, Mooncake).

Control messages travel over the ZMQ channel of :class:`ZmqTransport`; the
bytes travel through the engine, which writes into the peer's registered memory
without the peer's code running. Because the engine itself cannot tell a live
region from a released one, a write is granted first:

1. the writer asks the destination (``G``: write id, then region, offset and
   length of every range of the batch);
2. the destination checks each region is live and each range inside it and
   answers (``g``: write id, ok, reason);
3. on a yes, the writer hands the whole batch to the engine (a descriptor
   list, or several operations in flight) and polls it; the write is done when
   the engine says every byte is in the peer's memory; a notice
   (``write_batch(..., notice=)``) then goes to the peer on the control channel
   before the write is reported done.

A subclass supplies four things: how to register memory (and what a peer needs
to reach it), how to start a batch, how to poll one, and how to shut down.
"""

from __future__ import annotations

import contextlib
import struct
import time
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvpoll.transports.base import Region, RegionDescriptor, Span, TransportError
from kvpoll.transports.spans import SpanBatch
from kvpoll.transports.zmq_transport import _FEW_RANGES, ZmqTransport

__all__ = ["EngineTransport"]

_GRANT_HEAD = struct.Struct("<QQ")  # write id, ranges
_GRANT_RANGE = struct.Struct("<QQQ")  # region id, offset, length
_MAX_RANGES = 1 << 16
_GRANT = struct.Struct("<QB")  # write id, ok
_ASK, _ANSWER = b"G", b"g"


class EngineTransport(ZmqTransport):
    """Base of the engine adapters: grants over ZMQ, bytes through the engine."""

    def __init__(self, *, poll_interval: float = 50e-6, **options: Any) -> None:
        super().__init__(shm=False, **options)
        self._asked: dict[int, SpanBatch] = {}
        self._running: dict[int, Any] = {}
        # One engine registration per memory range, shared by the regions over it
        # (a sender may register one tensor for many rooms; engines refuse twice).
        self._registrations: dict[int, tuple[int, int]] = {}  # region id -> range
        self._ranges: dict[tuple[int, int], list[Any]] = {}  # range -> [handle, reach, count]
        self._poll_interval = poll_interval
        self.stats.update({"engine_writes": 0})

    # -- what a subclass supplies --------------------------------------------------
    @abstractmethod
    def _register(self, data: torch.Tensor) -> tuple[Any, dict[str, Any]]:
        """Register ``data`` with the engine: (a handle, what a peer needs to write there)."""

    @abstractmethod
    def _unregister(self, handle: Any) -> None:
        """Undo :meth:`_register`."""

    @abstractmethod
    def _start(self, batch: SpanBatch) -> Any:
        """Start the engine's writes of one batch (one peer, every range of at least
        one byte); return a handle for :meth:`_poll`. The batch's columns give each
        range's source address (:meth:`SpanBatch.src_addresses`), destination
        offset and size; its pairs the regions.

        Raises:
            TransportError: the engine refused the write.
        """

    @abstractmethod
    def _poll(self, handle: Any) -> tuple[bool, str | None]:
        """(finished, error) of a started batch; releases the handle once finished."""

    @abstractmethod
    def _close_engine(self) -> None:
        """Shut the engine down (every registration is already undone)."""

    def paths(self) -> list[str]:
        return [self.name]  # the engine picks shared memory or the network itself

    # -- regions ----------------------------------------------------------------------
    def _add_region(self, data: torch.Tensor, extra: dict[str, Any]) -> Region:
        if not data.numel():
            return super()._add_region(data, extra)
        key = (int(data.data_ptr()), data.numel())
        entry = self._ranges.get(key)
        if entry is None:
            handle, reach = self._register(data)
            entry = self._ranges[key] = [handle, reach, 0]
        region = super()._add_region(data, {**extra, **entry[1]})
        entry[2] += 1
        self._registrations[region.descriptor.region_id] = key
        return region

    def release(self, region: Region, *, reuse: bool = True) -> None:
        key = self._registrations.pop(region.descriptor.region_id, None)
        entry = self._ranges.get(key) if key is not None else None
        if key is not None and entry is not None:
            entry[2] -= 1
            if entry[2] <= 0:
                del self._ranges[key]
                self._unregister(entry[0])
        super().release(region, reuse=reuse)

    # -- writes -------------------------------------------------------------------------
    def _write_remote(self, write_id: int, spans: Sequence[Span], notice: bytes | None) -> None:
        batch = SpanBatch.of(spans).nonempty()
        for at in batch.used:
            dst = batch.pairs[at][1]
            if dst.transport != self.name:
                raise TransportError(
                    f"{dst!r} belongs to the {dst.transport} transport, not {self.name}"
                )
        if len(batch) > _MAX_RANGES:
            raise TransportError(f"a batch of {len(batch)} ranges; at most {_MAX_RANGES}")
        if len(batch) <= _FEW_RANGES:  # packed range by range: NumPy costs more for a few
            ranges = b"".join(
                _GRANT_RANGE.pack(batch.pairs[at][1].region_id, offset, nbytes)
                for at, offset, nbytes in zip(
                    batch.pair.tolist(),
                    batch.dst_offset.tolist(),
                    batch.nbytes.tolist(),
                    strict=True,
                )
            )
        else:
            table = np.stack(
                [batch.dst_column(lambda d: d.region_id), batch.dst_offset, batch.nbytes], axis=1
            )
            ranges = table.astype("<u8").tobytes()
        request = _GRANT_HEAD.pack(write_id, len(batch)) + ranges
        peer = batch.peer
        if not self._post(peer, [_ASK, request]):
            raise TransportError(f"{peer} is not reading: its queue is full")
        self._asked[write_id] = batch
        self._expect_ack(write_id, peer)
        self._notify_when_done(write_id, peer, notice)

    @staticmethod
    def _remote_addresses(batch: SpanBatch) -> Any:
        """For each range, the address it lands at in the peer's memory: its
        region's ``addr`` (as the peer described it) plus the offset.

        Raises:
            ValueError: a region without a usable ``addr`` (missing, not an int,
                negative or past 63 bits).
        """
        return batch.dst_column(_addr) + batch.dst_offset

    @classmethod
    def _addresses(cls, batch: SpanBatch) -> tuple[Any, Any, Any]:
        """(source address, destination address, size) of each range, as three
        columns: NumPy's for many ranges, lists of ints for a few (NumPy's fixed
        cost per call made a one-range NIXL write ~50 us slower).

        Raises:
            ValueError: as :meth:`_remote_addresses`.
        """
        if len(batch) > _FEW_RANGES:
            return batch.src_addresses(), cls._remote_addresses(batch), batch.nbytes
        src = {at: int(batch.pairs[at][0].data.data_ptr()) for at in batch.used}
        dst = {at: _addr(batch.pairs[at][1]) for at in batch.used}
        pairs = batch.pair.tolist()
        return (
            [src[p] + o for p, o in zip(pairs, batch.src_offset.tolist(), strict=True)],
            [dst[p] + o for p, o in zip(pairs, batch.dst_offset.tolist(), strict=True)],
            batch.nbytes.tolist(),
        )

    def _handle_frame(self, peer: str, kind: bytes) -> bool:
        if kind not in (_ASK, _ANSWER):
            return False
        frames = self._frames()
        if kind == _ASK and len(frames) == 1 and len(frames[0]) >= _GRANT_HEAD.size:
            write_id, count = _GRANT_HEAD.unpack_from(frames[0])
            if not 0 < count <= _MAX_RANGES or len(frames[0]) != (
                _GRANT_HEAD.size + count * _GRANT_RANGE.size
            ):
                self._malformed(peer, "bad write grant request")
                return True
            self._alive(peer)
            table = np.frombuffer(frames[0], dtype="<u8", offset=_GRANT_HEAD.size)
            error = self._lookup_all(table.reshape(count, 3))
            if error is not None:
                self.stats["rejected_writes"] += 1
            reason = (error or "").encode()
            with contextlib.suppress(TransportError):
                self._post(peer, [_ANSWER, _GRANT.pack(write_id, error is None), reason])
        elif kind == _ANSWER and len(frames) == 2 and len(frames[0]) == _GRANT.size:
            write_id, ok = _GRANT.unpack(frames[0])
            writes = self._asked.pop(write_id, None)
            pending = self._pending.get(write_id)
            if writes is None or pending is None or pending.peer != peer:
                return True  # a late answer for a write that already failed
            self._alive(peer)
            if not ok:
                self._finish(write_id, frames[1].decode("utf-8", "replace") or "refused")
                return True
            try:
                self._running[write_id] = self._start(writes)
                self.stats["engine_writes"] += 1
            except TransportError as exc:
                self._finish(write_id, str(exc))
        else:
            self._malformed(peer, f"bad {kind!r} frame")
        return True

    # -- progress -----------------------------------------------------------------------
    def _wait_ms(self, timeout: float) -> int:
        if self._running:
            time.sleep(min(timeout, self._poll_interval))
            return 0
        return super()._wait_ms(timeout)

    def _progress_engine(self) -> None:
        for write_id, handle in list(self._running.items()):
            finished, error = self._poll(handle)
            if finished:
                del self._running[write_id]
                self._finish(write_id, error)

    def close(self) -> None:
        if self._closed:
            return
        deadline = time.monotonic() + 2.0
        while self._running and time.monotonic() < deadline:
            self._progress_engine()  # the engine may still read our memory: let it finish
        for handle, _, _ in self._ranges.values():
            self._unregister(handle)
        self._ranges.clear()
        self._registrations.clear()
        self._asked.clear()
        self._close_engine()
        super().close()


def _addr(dst: RegionDescriptor) -> int:
    """The address a peer's region starts at, as it described it (``extra["addr"]``).

    Raises:
        ValueError: missing, not an int, negative or past 63 bits.
    """
    try:
        addr = int(dst.extra["addr"])
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"no usable addr: {exc!r}") from None
    if not 0 <= addr < 1 << 63:
        raise ValueError(f"an addr outside 0 .. 2**63: {addr}")
    return addr
