"""Shared-memory segments: created owner-only, pre-touched, pooled, always unlinked.

Segments are files in ``/dev/shm`` named ``kvpoll-<pid>-<token>``. They are
made directly (not with ``multiprocessing.shared_memory``, whose resource
tracker unlinks a segment when a process that merely attached to it exits).
A segment left by a crashed process is reclaimed by :func:`reclaim_orphans`,
which every pool runs when it starts.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import secrets
from collections import defaultdict
from pathlib import Path

import torch

from kvpoll.transports.base import TransportError

__all__ = [
    "HEADER",
    "SHM_DIR",
    "Attachments",
    "Segment",
    "SegmentPool",
    "boot_id",
    "reclaim_orphans",
]

log = logging.getLogger("kvpoll.transports.shm")

SHM_DIR = Path("/dev/shm")
PREFIX = "kvpoll-"
_NAME = re.compile(r"^kvpoll-(\d+)-[0-9a-f]{16}$")
PAGE = mmap.PAGESIZE
MIN_SEGMENT = 64 * 1024
HEADER = 64
"""Bytes at the start of a segment that say which region lives there now."""
_MAGIC = 0x6B76706F6C6C0001


def boot_id() -> str:
    """An id of this host's running kernel: equal ids mean one host."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return os.uname().nodename


class Segment:
    """One mapped shared-memory segment.

    Attributes:
        name: the file name in ``/dev/shm``.
        size: bytes.
        inode: identifies the file, so a peer can tell it attached the right one.
        data: the whole segment as a uint8 tensor.
    """

    def __init__(self, name: str, size: int, *, create: bool, inode: int | None = None) -> None:
        path = SHM_DIR / name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise TransportError(
                f"cannot {'create' if create else 'open'} shared memory "
                f"segment {name}: {exc.strerror}"
            ) from exc
        try:
            if create:
                os.ftruncate(fd, size)
            st = os.fstat(fd)
            if inode is not None and st.st_ino != inode:
                raise TransportError(
                    f"shared memory segment {name} is not the one described "
                    "(another host, or it was replaced)"
                )
            if st.st_size < size:
                raise TransportError(
                    f"shared memory segment {name} holds {st.st_size} bytes, not {size}"
                )
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            if create:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.name = name
        self.size = size
        self.inode = st.st_ino
        self.owner = create
        self.data = torch.frombuffer(self._map, dtype=torch.uint8)
        if create:
            self.data.numpy()[::PAGE] = 0  # touch every page now, not on the data path

    def stamp(self, region_id: int, nbytes: int) -> None:
        """Record that region ``region_id`` of ``nbytes`` now lives after the header."""
        self.data[:24].view(torch.int64).copy_(
            torch.tensor([_MAGIC, region_id, nbytes], dtype=torch.int64)
        )

    def unstamp(self) -> None:
        """Record that no region lives here: writes with an old descriptor fail."""
        self.data[:24].zero_()

    def check_stamp(self, region_id: int, end: int) -> str | None:
        """Why a write of bytes up to ``end`` into ``region_id`` must not happen, or None."""
        magic, current, nbytes = self.data[:24].view(torch.int64).tolist()
        if magic != _MAGIC or current != region_id:
            return f"region {region_id} is no longer registered in segment {self.name}"
        if end > nbytes:
            return f"bytes up to {end} are outside region {region_id} of {nbytes} bytes"
        return None

    @classmethod
    def create(cls, size: int) -> Segment:
        """A new segment, readable and writable by this user only."""
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        return cls(name, size, create=True)

    @classmethod
    def attach(cls, name: str, size: int, inode: int | None = None) -> Segment:
        """Map a segment another process created.

        Raises:
            TransportError: missing, too small, or not the expected file.
        """
        if not _NAME.match(name):
            raise TransportError(f"not a kvpoll shared memory segment name: {name!r}")
        return cls(name, size, create=False, inode=inode)

    def close(self, *, unlink: bool | None = None) -> None:
        """Unmap (when no view of it is alive) and, for the creator, unlink."""
        if unlink is None:
            unlink = self.owner
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SHM_DIR / self.name)
        del self.data
        with contextlib.suppress(BufferError):  # views still alive: unmapped when freed
            self._map.close()


def reclaim_orphans() -> list[str]:
    """Unlink segments whose creating process no longer runs; return their names."""
    reclaimed = []
    uid = os.getuid()
    try:
        entries = list(SHM_DIR.iterdir())
    except OSError:
        return []
    for path in entries:
        match = _NAME.match(path.name)
        if not match:
            continue
        try:
            if path.stat().st_uid != uid:
                continue
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                reclaimed.append(path.name)
        except OSError:
            continue
    if reclaimed:
        log.info("reclaimed %d shared memory segments left by dead processes", len(reclaimed))
    return reclaimed


def _size_class(nbytes: int) -> int:
    size = max(nbytes + HEADER, MIN_SEGMENT)
    return 1 << (size - 1).bit_length()


class SegmentPool:
    """Reuses segments by size class (powers of two), so buffers stay warm.

    Args:
        max_idle_bytes: idle segments kept for reuse beyond this are unlinked.
    """

    def __init__(self, *, max_idle_bytes: int = 4 << 30) -> None:
        reclaim_orphans()
        self.max_idle_bytes = max_idle_bytes
        self._idle: dict[int, list[Segment]] = defaultdict(list)
        self._idle_bytes = 0
        self._busy: dict[str, Segment] = {}
        self.created = 0

    def acquire(self, nbytes: int) -> Segment:
        """A segment with room for ``nbytes`` after its header (reused when possible)."""
        size = _size_class(nbytes)
        idle = self._idle[size]
        if idle:
            segment = idle.pop()
            self._idle_bytes -= size
        else:
            segment = Segment.create(size)
            self.created += 1
        self._busy[segment.name] = segment
        return segment

    def release(self, segment: Segment, *, reuse: bool = True) -> None:
        """Give a segment back; without ``reuse`` it is unlinked at once."""
        if self._busy.pop(segment.name, None) is None:
            return
        segment.unstamp()
        if reuse and self._idle_bytes + segment.size <= self.max_idle_bytes:
            self._idle[segment.size].append(segment)
            self._idle_bytes += segment.size
        else:
            segment.close()

    def close(self) -> None:
        """Unstamp and unlink every segment, busy or idle."""
        for segment in list(self._busy.values()):
            segment.unstamp()
            segment.close()
        self._busy.clear()
        for segments in self._idle.values():
            for segment in segments:
                segment.close()
        self._idle.clear()
        self._idle_bytes = 0


class Attachments:
    """Peers' segments this process has mapped, by name (mapped once, reused)."""

    def __init__(self) -> None:
        self._segments: dict[str, Segment] = {}

    def get(self, name: str, size: int, inode: int | None) -> Segment:
        segment = self._segments.get(name)
        if segment is None or segment.size < size or (inode is not None and segment.inode != inode):
            if segment is not None:
                segment.close()
            segment = Segment.attach(name, size, inode)
            self._segments[name] = segment
        return segment

    def forget(self, name: str) -> None:
        segment = self._segments.pop(name, None)
        if segment is not None:
            segment.close()

    def close(self) -> None:
        for segment in self._segments.values():
            segment.close()
        self._segments.clear()
