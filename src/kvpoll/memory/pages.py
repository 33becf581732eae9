"""Page indices as runs, and the ranges a chunk moves.

A run is ``(first, count)``: pages ``first .. first + count - 1``. Engines
merge consecutive pages into one write; so does kvpoll, on both sides at once
(:func:`pair_runs`), before turning pages into byte ranges.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Any

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

    Held as sorted, disjoint intervals (a page run of any length costs one
    entry), so a peer's pool of 2**40 pages costs no more than a small one.
    """

    __slots__ = ("_ends", "_held", "_owners", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._owners: list[int] = []
        self._held: dict[int, list[Run]] = {}

    def __len__(self) -> int:
        """Rooms holding pages."""
        return len(self._held)

    def conflict(self, runs: Iterable[Run], *, but: int | None = None) -> tuple[int, int] | None:
        """(a page, the room holding it) for the first of ``runs`` held by a room
        other than ``but``, or None."""
        starts, ends, owners = self._starts, self._ends, self._owners
        for first, count in runs:
            end = first + count
            i = max(0, bisect.bisect_right(starts, first) - 1)
            while i < len(starts) and starts[i] < end:
                if ends[i] > first and owners[i] != but:
                    return max(first, starts[i]), owners[i]
                i += 1
        return None

    def hold(self, room: int, runs: Iterable[Run]) -> None:
        """Mark ``runs`` held by ``room`` (checked free with :meth:`conflict` first)."""
        held = self._held.setdefault(room, [])
        for first, count in runs:
            i = bisect.bisect_left(self._starts, first)
            self._starts.insert(i, first)
            self._ends.insert(i, first + count)
            self._owners.insert(i, room)
            held.append((first, count))

    def release(self, room: int) -> None:
        """Free every page ``room`` holds (nothing if it holds none)."""
        for first, _ in self._held.pop(room, ()):
            i = bisect.bisect_left(self._starts, first)
            while i < len(self._starts) and self._starts[i] == first and self._owners[i] != room:
                i += 1
            if i < len(self._starts) and self._starts[i] == first:
                del self._starts[i], self._ends[i], self._owners[i]
