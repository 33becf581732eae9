"""Pools registered with an endpoint's transport, and pools peers offered us.

An endpoint registers each :class:`~kvpoll.memory.PagedPool` it uses once
(one region per buffer). A receiver announces a pool to each sender once
(:class:`~kvpoll.protocol.messages.PoolOffer`); the sender keeps it as a
:class:`PeerPool` and from then on takes only page indices for it, each
checked against the pool's size. A descriptor in an offer must name the peer
that sent it: a peer can only point at memory it registered itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvpoll.errors import InvalidArgument
from kvpoll.memory.pages import PageList, Run
from kvpoll.memory.pool import BufferLayout, PagedPool
from kvpoll.protocol.messages import PoolBuffer, PoolOffer
from kvpoll.transports.base import Region, Transport, TransportError

__all__ = [
    "MAX_PEER_POOLS",
    "PeerPool",
    "Registered",
    "needs_staging",
    "register_pool",
    "token_runs",
]

MAX_PEER_POOLS = 64
"""Pools one peer may announce to a sender (a bound on what a peer can make us hold)."""


@dataclass
class Registered:
    """A pool registered with this endpoint's transport.

    With ``staging`` (a host-memory mirror of a pool the transport cannot
    reach, such as GPU memory without a device-capable transport), the regions
    are the mirror's: the sender copies pages out to it before writing, the
    receiver copies pages in from it before a chunk counts.
    """

    pool: PagedPool
    regions: list[Region]
    aux_regions: list[Region]
    offered_to: set[str] = field(default_factory=set)
    staging: PagedPool | None = None
    internal: bool = False
    """A pool kvpoll made for itself (an arena, a tensor's room), not the application's."""

    def stage_out(self, runs: list[Run], aux_row: int | None) -> None:
        """Copy these token runs (and aux row) from the pool to its mirror."""
        if self.staging is not None:
            _copy_runs(self.pool, self.staging, runs, aux_row)

    def stage_in(self, runs: list[Run], aux_row: int | None) -> None:
        """Copy these token runs (and aux row) from the mirror into the pool."""
        if self.staging is not None:
            _copy_runs(self.staging, self.pool, runs, aux_row)

    def offer(self) -> PoolOffer:
        pool = self.pool

        def describe(regions: list[Region], layouts: tuple[BufferLayout, ...]) -> list[PoolBuffer]:
            return [
                PoolBuffer(
                    region=r.descriptor,
                    row_bytes=layout.row_bytes,
                    dtype=layout.dtype,
                    row_shape=list(layout.row_shape),
                )
                for r, layout in zip(regions, layouts, strict=True)
            ]

        return PoolOffer(
            pool=pool.id,
            page_size=pool.page_size,
            num_pages=pool.num_pages,
            buffers=describe(self.regions, pool.layouts),
            aux=describe(self.aux_regions, pool.aux_layouts),
            aux_rows=pool.aux_rows,
        )

    def release(self, transport: Transport) -> None:
        for region in (*self.regions, *self.aux_regions):
            transport.release(region, reuse=False)
        self.regions.clear()
        self.aux_regions.clear()
        if self.staging is not None:
            self.staging.close()


def _copy_runs(src: PagedPool, dst: PagedPool, runs: list[Run], aux_row: int | None) -> None:
    for a, b in zip(src.buffers, dst.buffers, strict=True):
        for first, count in runs:
            b[first : first + count].copy_(a[first : first + count])
    if aux_row is not None:
        for a, b in zip(src.aux, dst.aux, strict=True):
            b[aux_row].copy_(a[aux_row])
    if dst.device.type == "cuda" or src.device.type == "cuda":
        torch.cuda.synchronize()


def needs_staging(transport: Transport, pool: PagedPool) -> bool:
    """Whether ``pool``'s data must go through host memory on ``transport``."""
    if pool.stage is not None:
        return pool.stage
    return pool.device.type != "cpu" and not transport.capabilities.device_memory


def register_pool(transport: Transport, pool: PagedPool) -> Registered:
    """Register every buffer of ``pool`` (or of its host mirror, when it must be
    staged) with ``transport``.

    Raises:
        InvalidArgument: the transport cannot reach the pool's memory.
    """
    staging = None
    if needs_staging(transport, pool):
        kind = transport.memory_kind()
        if kind != "shm":
            kind = "pinned" if torch.cuda.is_available() else "host"
        staging = pool.mirror(kind)
    reach = staging if staging is not None else pool
    done: list[Region] = []
    try:
        for tensor in (*reach.buffers, *reach.aux):
            done.append(transport.register(tensor))
    except TransportError as exc:
        for region in done:
            transport.release(region, reuse=False)
        raise InvalidArgument(f"cannot register {pool!r}: {exc}") from exc
    n = len(pool.buffers)
    return Registered(pool, done[:n], done[n:], staging=staging)


@dataclass
class PeerPool:
    """Memory a receiver registered with us: its buffers and its size."""

    page_size: int
    num_pages: int
    buffers: list[PoolBuffer]
    aux: list[PoolBuffer]
    aux_rows: int

    @property
    def size(self) -> int:
        """About what this pool's description holds in memory, in bytes."""
        return sum(b.region.size + 64 for b in (*self.buffers, *self.aux))

    @classmethod
    def from_offer(cls, peer: str, offer: PoolOffer) -> PeerPool:
        """Raises InvalidArgument when a buffer is not the peer's or is too small."""
        for what, buffers, rows in (
            ("buffer", offer.buffers, offer.page_size * offer.num_pages),
            ("aux buffer", offer.aux, offer.aux_rows),
        ):
            for i, buffer in enumerate(buffers):
                if buffer.region.endpoint != peer:
                    raise InvalidArgument(
                        f"pool {offer.pool}: {what} {i} names memory of {buffer.region.endpoint}, "
                        f"not of the peer that offered it ({peer})"
                    )
                if buffer.region.nbytes < rows * buffer.row_bytes:
                    raise InvalidArgument(
                        f"pool {offer.pool}: {what} {i} holds {buffer.region.nbytes} bytes, "
                        f"less than {rows} rows of {buffer.row_bytes}"
                    )
        return cls(
            offer.page_size, offer.num_pages, list(offer.buffers), list(offer.aux), offer.aux_rows
        )

    @classmethod
    def inline(cls, buffer: PoolBuffer, tokens: int) -> PeerPool:
        """One contiguous region handed over inline: a pool of one-token pages."""
        return cls(1, tokens, [buffer], [], 0)

    def check_runs(self, runs: list[Run]) -> str | None:
        """Why these pages cannot be named (outside the pool), or None."""
        for first, count in runs:
            if first + count > self.num_pages:
                return f"page {first + count - 1} is outside a pool of {self.num_pages} pages"
        return None


def token_runs(runs: list[Run], page_size: int, tokens: int | None = None) -> PageList:
    """Pages as runs of tokens (the first ``tokens`` of them, when given)."""
    if tokens is None:
        return PageList([(first * page_size, count * page_size) for first, count in runs if count])
    out: list[Run] = []
    left = tokens
    for first, count in runs:
        n = min(count * page_size, left)
        left -= n
        if n:
            out.append((first * page_size, n))
        if left == 0:
            break
    return PageList(out)
