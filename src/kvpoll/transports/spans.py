"""A batched write held as columns: many ranges, no Python object per range.

A paged room's chunk is thousands of ranges (every page run of every layer's
K and V buffer) between a few pairs of regions. :class:`SpanBatch` holds them
as four integer columns and a short table of (source, destination) pairs.
It *is* a ``Sequence[Span]`` - indexing or iterating it makes :class:`Span`
tuples on demand - so a transport written for a list of spans takes it
unchanged; the built-in transports read the columns instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

import numpy as np

from kvpoll.transports.base import (
    Region,
    RegionDescriptor,
    Span,
    TransportError,
    check_range,
)

__all__ = ["Columns", "SpanBatch", "Views", "copy_batch"]

Columns = np.ndarray[Any, np.dtype[np.int64]]
_GATHER_MIN_RANGES = 32  # fewer ranges: a loop of copies
_GATHER_MIN_GRANULE = 256  # smaller common granule: a loop (the row index would be long)
_GATHER_ROWS = 1 << 14  # rows gathered at once (bounds the index and scratch memory)


class SpanBatch(Sequence[Span]):
    """Ranges between a few pairs of regions, as columns.

    Range ``i`` moves ``nbytes[i]`` bytes from ``pairs[pair[i]][0]`` at
    ``src_offset[i]`` into ``pairs[pair[i]][1]`` at ``dst_offset[i]``. The
    columns are read-only int64 arrays of one length; ranges keep their order.

    Args:
        pairs: (source region, destination descriptor) pairs the ranges refer to.
        pair: for each range, its index into ``pairs``.
        src_offset, dst_offset, nbytes: for each range, where and how much.

    Raises:
        TransportError: columns of different lengths, not integers, negative
            where an offset or size is meant, or a pair index out of range.
            (Ranges are checked against their regions by
            :func:`~kvpoll.transports.base.check_batch`, as for spans.)
    """

    __slots__ = ("dst_offset", "nbytes", "pair", "pairs", "src_offset", "used")

    def __init__(
        self,
        pairs: Sequence[tuple[Region, RegionDescriptor]],
        pair: Any,
        src_offset: Any,
        dst_offset: Any,
        nbytes: Any,
    ) -> None:
        self.pairs = tuple(pairs)
        for src, dst in self.pairs:
            if not isinstance(src, Region) or not isinstance(dst, RegionDescriptor):
                raise TransportError(
                    "a SpanBatch's pairs are (Region, RegionDescriptor), "
                    f"not ({type(src).__name__}, {type(dst).__name__})"
                )
        columns = [_column(name, value) for name, value in (
            ("pair", pair), ("src_offset", src_offset), ("dst_offset", dst_offset),
            ("nbytes", nbytes),
        )]  # fmt: skip
        if len({len(c) for c in columns}) != 1:
            raise TransportError(
                "a SpanBatch's columns differ in length: " + ", ".join(str(len(c)) for c in columns)
            )
        self.pair, self.src_offset, self.dst_offset, self.nbytes = columns
        self.used: list[int] = np.unique(self.pair).tolist()
        """The pairs some range refers to, in order (others are ignored)."""
        if self.used and self.used[-1] >= len(self.pairs):
            raise TransportError(
                f"a SpanBatch range refers to pair {self.used[-1]}; it has {len(self.pairs)}"
            )

    @classmethod
    def _trusted(
        cls,
        pairs: tuple[tuple[Region, RegionDescriptor], ...],
        columns: Sequence[Columns],
        used: list[int] | None = None,
    ) -> SpanBatch:
        """A batch from columns known good (made here): no checks, no copies."""
        batch = object.__new__(cls)
        batch.pairs = pairs
        for column in columns:
            column.flags.writeable = False
        batch.pair, batch.src_offset, batch.dst_offset, batch.nbytes = columns
        batch.used = np.unique(batch.pair).tolist() if used is None else used
        return batch

    @classmethod
    def of(cls, spans: Sequence[Span]) -> SpanBatch:
        """The same ranges as ``spans`` (a list of :class:`Span`), as columns.

        The spans are taken as they are: check them (``check_batch``) first.
        """
        if isinstance(spans, SpanBatch):
            return spans
        index: dict[tuple[int, int], int] = {}
        pairs: list[tuple[Region, RegionDescriptor]] = []
        rows: list[tuple[int, int, int, int]] = []
        for src, src_offset, dst, dst_offset, nbytes in spans:
            key = (id(src), id(dst))
            at = index.get(key)
            if at is None:
                at = index[key] = len(pairs)
                pairs.append((src, dst))
            rows.append((at, src_offset, dst_offset, nbytes))
        table = np.array(rows, dtype=np.int64).reshape(-1, 4).T
        return cls._trusted(tuple(pairs), list(table), list(range(len(pairs))))

    # -- Sequence[Span] -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.pair)

    @overload
    def __getitem__(self, i: int) -> Span: ...

    @overload
    def __getitem__(self, i: slice) -> SpanBatch: ...

    def __getitem__(self, i: int | slice) -> Span | SpanBatch:
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        src, dst = self.pairs[int(self.pair[i])]
        return Span(src, int(self.src_offset[i]), dst, int(self.dst_offset[i]), int(self.nbytes[i]))

    def __iter__(self) -> Iterator[Span]:
        pairs = self.pairs
        for p, so, do, n in zip(
            self.pair.tolist(),
            self.src_offset.tolist(),
            self.dst_offset.tolist(),
            self.nbytes.tolist(),
            strict=True,
        ):
            src, dst = pairs[p]
            yield Span(src, so, dst, do, n)

    def __repr__(self) -> str:
        return f"SpanBatch({len(self)} ranges, {len(self.pairs)} pairs, {self.total} bytes)"

    # -- columns --------------------------------------------------------------------
    @property
    def total(self) -> int:
        """Bytes over every range."""
        return int(self.nbytes.sum())

    def take(self, which: Any) -> SpanBatch:
        """The ranges ``which`` (a boolean mask or indices), in their order."""
        return SpanBatch._trusted(
            self.pairs,
            [self.pair[which], self.src_offset[which], self.dst_offset[which], self.nbytes[which]],
        )

    def nonempty(self) -> SpanBatch:
        """The ranges that move at least one byte."""
        if len(self) and bool(self.nbytes.all()):
            return self
        return self.take(self.nbytes > 0)

    def sizes(self) -> tuple[Columns, Columns]:
        """For each range, the size of its source region and of its destination."""
        src = np.zeros(len(self.pairs), dtype=np.int64)
        for at in self.used:
            src[at] = self.pairs[at][0].descriptor.nbytes
        return src[self.pair], self.dst_column(lambda d: d.nbytes)

    def src_addresses(self) -> Columns:
        """For each range, the address its bytes are read from (host or device)."""
        bases = np.zeros(len(self.pairs), dtype=np.int64)
        for at in self.used:
            bases[at] = int(self.pairs[at][0].data.data_ptr())
        return bases[self.pair] + self.src_offset

    def dst_column(self, read: Callable[[RegionDescriptor], int]) -> Columns:
        """For each range, ``read(its destination)`` (called once per pair used)."""
        values = np.zeros(len(self.pairs), dtype=np.int64)
        for at in self.used:
            values[at] = read(self.pairs[at][1])
        return values[self.pair]

    @property
    def peer(self) -> str:
        """The endpoint of the first range's destination."""
        return self.pairs[int(self.pair[0])][1].endpoint

    def overlapping(self) -> bool:
        """Whether two ranges write the same bytes of one destination."""
        ids: dict[int, int] = {}
        keys = np.array([ids.setdefault(id(d), len(ids)) for _, d in self.pairs], dtype=np.int64)
        keep = self.nbytes > 0
        dst, starts = keys[self.pair[keep]], self.dst_offset[keep]
        order = np.lexsort((starts, dst))
        dst, starts, ends = dst[order], starts[order], starts[order] + self.nbytes[keep][order]
        return bool(((dst[1:] == dst[:-1]) & (starts[1:] < ends[:-1])).any())

    def check(self) -> str:
        """What :func:`~kvpoll.transports.base.check_batch` checks, over the columns.

        Returns:
            The one peer every destination belongs to.

        Raises:
            RegionBoundsError: the first range outside its source or destination.
            TransportError: an empty batch, or destinations on several peers.
        """
        if not len(self):
            raise TransportError("a batch needs at least one range")
        peer = self.peer
        for at in self.used:
            other = self.pairs[at][1].endpoint
            if other != peer:
                i = int(np.argmax(self.pair == at))
                raise TransportError(
                    f"a batch writes to one peer; range {i} goes to {other}, not {peer}"
                )
        src_size, dst_size = self.sizes()
        bad = (self.src_offset > src_size - self.nbytes) | (
            self.dst_offset > dst_size - self.nbytes
        )
        if bool(bad.any()):
            i = int(np.argmax(bad))
            n = int(self.nbytes[i])
            check_range(
                f"range {i} of the batch: source",
                int(self.src_offset[i]),
                n,
                int(src_size[i]),
            )
            check_range(
                f"range {i} of the batch: destination",
                int(self.dst_offset[i]),
                n,
                int(dst_size[i]),
            )
        return peer


Views = Callable[[int], tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]
"""A pair's index -> (its destination's bytes, its source's bytes): 1-D uint8 arrays."""


def copy_batch(batch: SpanBatch, views: Views) -> bool:
    """Copy every range of ``batch`` as one memcpy each would, each pair's between
    the arrays ``views`` gives; False, and nothing copied, when two ranges write
    the same bytes of one destination (the caller then copies them in order).

    Ranges are sorted by pair and destination offset (order does not matter
    once destinations are apart). Many ranges sharing a granule (every offset
    and length a multiple of it, as pages are) are copied as rows of that
    granule by one gather and one scatter per pair and block of rows: the row
    indices of every pair come from one set of array operations, so nothing is
    done per range in Python. Ranges were checked against their regions;
    NumPy still refuses (IndexError, ValueError) one outside its array.
    """
    batch = batch.nonempty()
    if not len(batch):
        return True
    used = batch.used
    if len({id(batch.pairs[at][1]) for at in used}) == len(used):  # one pair per destination
        order = np.lexsort((batch.dst_offset, batch.pair))
        pair, dst_offset, nbytes = batch.pair[order], batch.dst_offset[order], batch.nbytes[order]
        clash = (pair[1:] == pair[:-1]) & (dst_offset[1:] < (dst_offset + nbytes)[:-1])
        if bool(clash.any()):
            return False
    else:
        if batch.overlapping():
            return False
        order = np.argsort(batch.pair, kind="stable")
        pair, dst_offset, nbytes = batch.pair[order], batch.dst_offset[order], batch.nbytes[order]
    src_offset = batch.src_offset[order]
    granule = int(np.gcd.reduce(np.concatenate([src_offset, dst_offset, nbytes])))
    if len(batch) < _GATHER_MIN_RANGES or granule < _GATHER_MIN_GRANULE:
        seen: dict[int, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = {}
        for at, so, do, n in zip(
            pair.tolist(), src_offset.tolist(), dst_offset.tolist(), nbytes.tolist(), strict=True
        ):
            arrays = seen.get(at)
            if arrays is None:
                arrays = seen[at] = views(at)
            np.copyto(arrays[0][do : do + n], arrays[1][so : so + n])
        return True
    rows = nbytes // granule
    row_end = np.cumsum(rows)
    step = np.arange(int(row_end[-1]), dtype=np.int64) - np.repeat(row_end - rows, rows)
    src_rows = np.repeat(src_offset // granule, rows) + step
    dst_rows = np.repeat(dst_offset // granule, rows) + step
    first = np.searchsorted(pair, used, side="left")
    last = np.searchsorted(pair, used, side="right") - 1
    lows, highs = (row_end - rows)[first].tolist(), row_end[last].tolist()
    for at, low, high in zip(used, lows, highs, strict=True):
        dst, src = views(at)
        dst2 = dst[: len(dst) // granule * granule].reshape(-1, granule)
        src2 = src[: len(src) // granule * granule].reshape(-1, granule)
        for block in range(low, high, _GATHER_ROWS):
            end = min(block + _GATHER_ROWS, high)
            dst2[dst_rows[block:end]] = src2[src_rows[block:end]]
    return True


def _column(name: str, value: Any) -> Columns:
    try:
        column = np.array(value, dtype=np.int64, copy=True).reshape(-1)
    except (OverflowError, TypeError, ValueError) as exc:
        raise TransportError(f"a SpanBatch's {name} must be integers: {exc}") from None
    if np.asarray(value).dtype.kind not in "iu" and column.size:
        raise TransportError(f"a SpanBatch's {name} must be integers")
    if column.size and int(column.min()) < 0:
        raise TransportError(f"a SpanBatch's {name} must be >= 0, not {int(column.min())}")
    column.flags.writeable = False
    return column
