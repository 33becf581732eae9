"""Pools kvpoll owns, for the contiguous-buffer API (``open(allocated_tokens=...)``).

Each pool (an *arena*) has one buffer and pages of one token, and hands out
contiguous runs of pages, so a chunk is one view. Runs of one size are reused
exactly (rooms mostly ask for the same size); an arena whose runs are all free
starts over. Runs of a failed room are quarantined before reuse: a late write
from its sender must not land in another room's data. Arenas are few and
large, so descriptors and mappings grow with memory in use, not with rooms.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import torch

from kvpoll.memory.pool import PagedPool

__all__ = ["Arenas", "Lease"]


@dataclass
class _Arena:
    pool: PagedPool
    top: int = 0
    live: int = 0
    free: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))

    def take(self, count: int) -> int | None:
        runs = self.free.get(count)
        if runs:
            self.live += 1
            return runs.pop()
        if self.top + count <= self.pool.num_pages:
            start, self.top = self.top, self.top + count
            self.live += 1
            return start
        return None

    def give(self, start: int, count: int) -> None:
        self.live -= 1
        if self.live == 0:  # all free: start over, no fragmentation carried
            self.top = 0
            self.free.clear()
        else:
            self.free[count].append(start)


@dataclass(frozen=True)
class Lease:
    """A run of pages of one arena, held by one buffer of one room."""

    pool: PagedPool
    start: int
    count: int


class Arenas:
    """Arenas by row layout: ``take`` a run, ``give`` it back (maybe after a quarantine).

    Args:
        memory: where arenas live (``"shm"``, ``"host"``, ...; see PagedPool.allocate).
        arena_bytes: the smallest arena; a bigger request gets an arena of its own size.
        quarantine: seconds a failed room's runs wait before reuse.
        max_idle: empty arenas kept per layout; more are dropped.
    """

    def __init__(
        self,
        memory: str,
        *,
        arena_bytes: int = 64 << 20,
        quarantine: float = 30.0,
        max_idle: int = 1,
    ) -> None:
        self.memory = memory
        self.arena_bytes = arena_bytes
        self.quarantine = quarantine
        self.max_idle = max_idle
        self._arenas: dict[tuple[tuple[int, ...], torch.dtype], list[_Arena]] = defaultdict(list)
        self._by_pool: dict[int, _Arena] = {}
        self._held: deque[tuple[float, Lease]] = deque()

    def take(
        self, row_shape: tuple[int, ...], dtype: torch.dtype, count: int
    ) -> tuple[Lease, bool]:
        """A run of ``count`` rows; True when a new arena was made for it
        (the caller registers its pool).

        Raises:
            InvalidArgument, SegmentError: the memory could not be had.
        """
        arenas = self._arenas[(row_shape, dtype)]
        for arena in arenas:
            start = arena.take(count)
            if start is not None:
                return Lease(arena.pool, start, count), False
        row_bytes = max(1, torch.empty(row_shape, dtype=dtype).numel() * dtype.itemsize)
        pages = max(count, self.arena_bytes // row_bytes)
        pool = PagedPool.allocate(
            num_pages=pages, page_size=1, buffers=[(row_shape, dtype)], memory=self.memory
        )
        arena = _Arena(pool)
        arenas.append(arena)
        self._by_pool[pool.id] = arena
        start = arena.take(count)
        assert start is not None
        return Lease(pool, start, count), True

    def take_existing(
        self, row_shape: tuple[int, ...], dtype: torch.dtype, count: int
    ) -> Lease | None:
        """A run of ``count`` rows from an arena that exists already, or None (no
        new memory is made, so no pool needs registering)."""
        for arena in self._arenas.get((row_shape, dtype), ()):
            start = arena.take(count)
            if start is not None:
                return Lease(arena.pool, start, count)
        return None

    def put_back(self, lease: Lease) -> None:
        """Undo a :meth:`take_existing` at once (the run was never used; no arena is dropped)."""
        arena = self._by_pool.get(lease.pool.id)
        if arena is not None:
            arena.give(lease.start, lease.count)

    def give(self, lease: Lease, *, quarantine: bool = False) -> list[PagedPool]:
        """Return a run; pools of arenas now dropped are returned (to unregister)."""
        if quarantine and self.quarantine > 0:
            self._held.append((time.monotonic() + self.quarantine, lease))
            return []
        return self._give(lease)

    def _give(self, lease: Lease) -> list[PagedPool]:
        arena = self._by_pool.get(lease.pool.id)
        if arena is None:
            return []
        arena.give(lease.start, lease.count)
        if arena.live:
            return []
        arenas = self._arenas[(lease.pool.buffers[0].shape[1:], lease.pool.buffers[0].dtype)]
        idle = [a for a in arenas if a.live == 0]
        if len(idle) <= self.max_idle:
            return []
        arenas.remove(arena)
        del self._by_pool[lease.pool.id]
        lease.pool.close()
        return [lease.pool]

    def tick(self, now: float) -> list[PagedPool]:
        """Release quarantined runs whose time is up; returns pools dropped."""
        dropped: list[PagedPool] = []
        while self._held and self._held[0][0] <= now:
            dropped += self._give(self._held.popleft()[1])
        return dropped

    def close(self) -> None:
        for arena in self._by_pool.values():
            arena.pool.close()
        self._arenas.clear()
        self._by_pool.clear()
        self._held.clear()
