"""Page indices as runs, and the ranges a chunk moves.

A run is ``(first, count)``: pages ``first .. first + count - 1``. Engines
merge consecutive pages into one write; so does kvpoll, on both sides at once
(:func:`pair_runs`), before turning pages into byte ranges.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from kvpoll.errors import InvalidArgument

__all__ = ["MAX_RUNS", "PageLedger", "PageList", "Run", "as_runs", "first_repeat", "pair_runs"]

Run = tuple[int, int]
MAX_RUNS = 1 << 16
"""Runs one message may carry (a bound on what a peer can make us hold)."""


def as_runs(pages: Any, *, what: str = "pages") -> list[Run]:
    """Pages as merged runs.

    ``pages`` may be a sequence or array of page indices (a NumPy int array, a
    1-D tensor, a list, a ``range``) or a list of runs already
    (``[(first, count), ...]``, as the wire carries them).

    Raises:
        InvalidArgument: not integers >= 0, or an empty run.
    """
    if isinstance(pages, range) and pages.step == 1:
        return [(pages.start, len(pages))] if len(pages) else []
    if hasattr(pages, "tolist"):
        pages = pages.tolist()
    try:
        items = list(pages)
    except TypeError:
        raise InvalidArgument(f"{what} must be a sequence of page indices, not {pages!r}") from None
    runs: list[Run] = []
    if items and isinstance(items[0], list | tuple):
        for item in items:
            if len(item) != 2:
                raise InvalidArgument(f"{what}: a run is (first, count), not {item!r}")
            first, count = _index(item[0], what), _index(item[1], what)
            if count < 1:
                raise InvalidArgument(f"{what}: a run of {count} pages")
            _extend(runs, first, count)
        return runs
    for item in items:
        _extend(runs, _index(item, what), 1)
    return runs


def _index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise InvalidArgument(f"{what}: page indices are ints, not {value!r}")
    index = int(value.__index__())
    if not 0 <= index < 2**40:
        raise InvalidArgument(f"{what}: page index {index} is out of range")
    return index


def _extend(runs: list[Run], first: int, count: int) -> None:
    if runs and runs[-1][0] + runs[-1][1] == first:
        runs[-1] = (runs[-1][0], runs[-1][1] + count)
    else:
        runs.append((first, count))


class PageList:
    """The pages of one side of a room, in room order, held as runs.

    Room page ``i`` (tokens ``i*page_size ..``) is the ``i``-th page listed.
    """

    __slots__ = ("_runs", "_starts", "pages")

    def __init__(self, runs: Iterable[Run] = ()) -> None:
        self._runs: list[Run] = []
        self._starts: list[int] = []  # room page index where each run begins
        self.pages = 0
        self.extend(runs)

    def extend(self, runs: Iterable[Run]) -> None:
        for first, count in runs:
            if self._runs and self._runs[-1][0] + self._runs[-1][1] == first:
                last_first, last_count = self._runs[-1]
                self._runs[-1] = (last_first, last_count + count)
            else:
                self._runs.append((first, count))
                self._starts.append(self.pages)
            self.pages += count

    def __len__(self) -> int:
        return self.pages

    def runs(self) -> list[Run]:
        return list(self._runs)

    def slice(self, start: int, stop: int) -> list[Run]:
        """The runs that hold room pages ``start .. stop - 1``."""
        if not 0 <= start <= stop <= self.pages:
            raise IndexError(f"pages {start}..{stop} of {self.pages}")
        out: list[Run] = []
        i = bisect.bisect_right(self._starts, start) - 1
        while start < stop:
            first, count = self._runs[i]
            offset = start - self._starts[i]
            take = min(count - offset, stop - start)
            out.append((first + offset, take))
            start += take
            i += 1
        return out


def pair_runs(src: Sequence[Run], dst: Sequence[Run]) -> list[tuple[int, int, int]]:
    """Walk two run lists of equal length together: ``(src_first, dst_first, count)``
    for each stretch that is consecutive on both sides."""
    out: list[tuple[int, int, int]] = []
    i = j = 0
    si, sc = src[0] if src else (0, 0)
    di, dc = dst[0] if dst else (0, 0)
    while i < len(src) and j < len(dst):
        n = min(sc, dc)
        if out and out[-1][0] + out[-1][2] == si and out[-1][1] + out[-1][2] == di:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n)
        else:
            out.append((si, di, n))
        si, sc, di, dc = si + n, sc - n, di + n, dc - n
        if sc == 0:
            i += 1
            if i < len(src):
                si, sc = src[i]
        if dc == 0:
            j += 1
            if j < len(dst):
                di, dc = dst[j]
    return out


def first_repeat(runs: Iterable[Run]) -> int | None:
    """A page that two runs share (one page listed twice), or None."""
    end = -1
    for first, count in sorted(runs):
        if first < end:
            return first
        end = max(end, first + count)
    return None


class PageLedger:
    """Which pages of one pool the live rooms hold: each page by one room at most.

    One small int per page of the pool (the holder's slot, 0 when free): a
    room's runs are checked and marked with a few NumPy operations, whatever
    the number of rooms (1,000 scattered pages: tens of microseconds).

    Args:
        num_pages: the pool's pages.
    """

    __slots__ = ("_held", "_owner", "_rooms", "_slots")

    def __init__(self, num_pages: int) -> None:
        self._owner = np.zeros(num_pages, dtype=np.int32)
        self._slots: dict[int, int] = {}  # room -> its slot (1, 2, ...)
        self._rooms: dict[int, int] = {}  # slot -> room
        self._held: dict[int, list[Run]] = {}  # room -> its runs

    def __len__(self) -> int:
        """Rooms holding pages."""
        return len(self._held)

    def conflict(self, runs: Sequence[Run], *, but: int | None = None) -> tuple[int, int] | None:
        """(a page, the room holding it) for the first page of ``runs`` held by a
        room other than ``but``, or None."""
        owners = self._owner[_page_index(runs)] if len(runs) > _FEW else None
        mine = self._slots.get(but, 0) if but is not None else 0
        if owners is None:
            for first, count in runs:
                found = self._first_taken(self._owner[first : first + count], mine)
                if found is not None:
                    return first + found, self._rooms[int(self._owner[first + found])]
            return None
        taken = (owners != 0) & (owners != mine)
        if not taken.any():
            return None
        at = int(np.argmax(taken))
        return int(_page_index(runs)[at]), self._rooms[int(owners[at])]

    @staticmethod
    def _first_taken(owners: Any, mine: int) -> int | None:
        taken = (owners != 0) & (owners != mine)
        return int(np.argmax(taken)) if taken.any() else None

    def hold(self, room: int, runs: Sequence[Run]) -> None:
        """Mark ``runs`` held by ``room`` (checked free with :meth:`conflict` first)."""
        slot = self._slots.get(room)
        if slot is None:
            slot = next(i for i in itertools.count(len(self._slots) + 1) if i not in self._rooms)
            self._slots[room] = slot
            self._rooms[slot] = room
        self._mark(runs, slot)
        self._held.setdefault(room, []).extend(runs)

    def release(self, room: int) -> None:
        """Free every page ``room`` holds (nothing if it holds none)."""
        runs = self._held.pop(room, None)
        slot = self._slots.pop(room, None)
        if slot is None:
            return
        del self._rooms[slot]
        if runs:
            self._mark(runs, 0)

    def _mark(self, runs: Sequence[Run], value: int) -> None:
        if len(runs) > _FEW:
            self._owner[_page_index(runs)] = value
        else:
            for first, count in runs:
                self._owner[first : first + count] = value


_FEW = 8  # runs handled one slice each; more as one gathered index


def _page_index(runs: Sequence[Run]) -> Any:
    """Every page of ``runs``, in order, as one NumPy index."""
    table = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    starts, counts = table[:, 0], table[:, 1]
    if bool((counts == 1).all()):
        return starts
    offsets = np.cumsum(counts) - counts
    return np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(starts - offsets, counts)
