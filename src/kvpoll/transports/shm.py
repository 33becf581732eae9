"""Pooled shared-memory segments for :meth:`Transport.allocate` (the zmq family).

Each allocated region lives in a segment of its own (a sealed memfd, see
:mod:`kvpoll.memory.shm`) after a small header that names the region living
there now, so a write with a stale or forged descriptor is refused. Segments
are reused by size class, so receive buffers stay warm.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

from kvpoll.memory.shm import Attachments, Segment, SegmentError, SegmentInfo, boot_id

__all__ = [
    "HEADER",
    "Attachments",
    "Segment",
    "SegmentError",
    "SegmentInfo",
    "SegmentPool",
    "boot_id",
    "check_header",
    "check_stamp",
    "stamp",
    "unstamp",
]

MIN_SEGMENT = 64 * 1024
HEADER = 64
"""Bytes at the start of a pooled segment that say which region lives there now."""
_MAGIC = 0x6B76706F6C6C0001


def stamp(segment: Segment, region_id: int, nbytes: int) -> None:
    """Record that region ``region_id`` of ``nbytes`` now lives after the header."""
    segment.data[:24].view(torch.int64).copy_(
        torch.tensor([_MAGIC, region_id, nbytes], dtype=torch.int64)
    )


def unstamp(segment: Segment) -> None:
    """Record that no region lives here: writes with an old descriptor fail."""
    if segment.data.numel() >= 24:
        segment.data[:24].zero_()


def check_stamp(segment: Segment, region_id: int, end: int) -> str | None:
    """Why a write of bytes up to ``end`` into ``region_id`` must not happen, or None."""
    if segment.data.numel() < HEADER:
        return "the segment has no header"
    return check_header(segment.data.numpy()[:24].view(np.int64), region_id, end)


def check_header(header: Any, region_id: int, end: int) -> str | None:
    """:func:`check_stamp` on a segment's first 24 bytes seen as three int64."""
    magic, current, nbytes = int(header[0]), int(header[1]), int(header[2])
    if magic != _MAGIC or current != region_id:
        return f"region {region_id} is no longer registered there"
    if end > nbytes:
        return f"bytes up to {end} are outside region {region_id} of {nbytes} bytes"
    return None


def _size_class(nbytes: int) -> int:
    size = max(nbytes + HEADER, MIN_SEGMENT)
    return 1 << (size - 1).bit_length()


class SegmentPool:
    """Reuses segments by size class (powers of two), so buffers stay warm.

    Args:
        max_idle_bytes: idle segments kept for reuse beyond this are closed.
    """

    def __init__(self, *, max_idle_bytes: int = 4 << 30) -> None:
        self.max_idle_bytes = max_idle_bytes
        self._idle: dict[int, list[Segment]] = defaultdict(list)
        self._idle_bytes = 0
        self._busy: dict[int, Segment] = {}
        self.created = 0

    def acquire(self, nbytes: int) -> Segment:
        """A segment with room for ``nbytes`` after its header (reused when possible).

        Raises:
            SegmentError: no memory or file descriptor left (ResourceExhausted).
        """
        size = _size_class(nbytes)
        idle = self._idle[size]
        if idle:
            segment = idle.pop()
            self._idle_bytes -= size
        else:
            segment = Segment.create(size)
            self.created += 1
        self._busy[id(segment)] = segment
        return segment

    def release(self, segment: Segment, *, reuse: bool = True) -> None:
        """Give a segment back; without ``reuse`` it is closed at once."""
        if self._busy.pop(id(segment), None) is None:
            return
        unstamp(segment)
        if reuse and self._idle_bytes + segment.size <= self.max_idle_bytes:
            self._idle[segment.size].append(segment)
            self._idle_bytes += segment.size
        else:
            segment.close()

    def close(self) -> None:
        """Unstamp and close every segment, busy or idle."""
        for segment in self._busy.values():
            unstamp(segment)
            segment.close()
        self._busy.clear()
        for segments in self._idle.values():
            for segment in segments:
                segment.close()
        self._idle.clear()
        self._idle_bytes = 0
