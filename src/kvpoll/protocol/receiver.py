"""The receiver side (language model, decode worker): offers memory, mirrors
the status of its room, and hands the application views of what arrived."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvpoll.errors import DuplicateRoom, IllegalTransition, InvalidArgument, ResourceExhausted
from kvpoll.ids import random_bits
from kvpoll.memory.arena import Arenas, Lease
from kvpoll.memory.pages import PageLedger, PageList, Run, first_repeat
from kvpoll.memory.pool import PagedPool, dtype_name
from kvpoll.memory.shm import SegmentError
from kvpoll.protocol.endpoint import Endpoint, RoomBase, TransferIncomplete
from kvpoll.protocol.messages import (
    Abort,
    AbortAck,
    BootstrapAck,
    Chunk,
    Message,
    Reject,
    Resume,
    check_token,
    encode,
    peer_reason,
)
from kvpoll.protocol.payloads import bootstrap_payload
from kvpoll.protocol.pools import token_runs
from kvpoll.statemachine.registry import check_room_id
from kvpoll.statemachine.status import Event, TransferStatus
from kvpoll.transports.base import Region, TransportError
from kvpoll.transports.shm import boot_id

__all__ = ["Received", "Receiver"]


@dataclass(frozen=True)
class Received:
    """What a room delivered.

    Attributes:
        room: the room.
        chunks: the data of the first buffer, piece by piece, as views of the
            receive memory (no copy); they stay readable as long as they exist.
        aux: the auxiliary bytes the sender attached.
        total_tokens: tokens in all.
    """

    room: int
    chunks: tuple[torch.Tensor, ...]
    aux: bytes
    total_tokens: int

    def tensor(self) -> torch.Tensor:
        """The whole data as one tensor: the view itself for one chunk, else a copy."""
        if len(self.chunks) == 1:
            return self.chunks[0]
        return torch.cat(self.chunks)


@dataclass
class _Part:
    """Memory offered for room tokens ``base ..``: token runs of ``pool``'s buffers."""

    base: int
    pool: PagedPool
    tokens: PageList
    lease: Lease | None = None  # a run of a kvpoll-owned arena
    region: Region | None = None  # an application buffer registered for this room

    @property
    def capacity(self) -> int:
        return self.base + len(self.tokens)


class _ReceiverRoom(RoomBase):
    __slots__ = (
        "allocated",
        "auto_resume",
        "aux",
        "aux_index",
        "chunks",
        "dtype",
        "parts",
        "pool",
        "rank",
        "row_shape",
        "sender",
        "session",
        "token",
        "total",
        "whole",
    )

    def __init__(self, room: int, history: bool) -> None:
        super().__init__(room, history)
        self.sender = ""
        self.session = random_bits(62)
        self.token: str | None = None
        self.rank = 0
        self.row_shape: tuple[int, ...] = ()
        self.dtype = torch.uint8
        self.auto_resume = True
        self.pool: PagedPool | None = None  # the application's pool (paged rooms)
        self.aux_index: int | None = None
        self.parts: list[_Part] = []
        self.chunks: list[torch.Tensor] = []
        self.total: int | None = None
        self.aux = b""
        self.whole = False  # each buffer takes one chunk (buffer rooms)
        self.allocated = 1  # rows of each buffer kvpoll allocates (buffer rooms)

    @property
    def total_tokens(self) -> int | None:
        return self.total

    @property
    def capacity(self) -> int:
        return self.parts[-1].capacity if self.parts else 0


def _check_buffer(
    buffer: torch.Tensor | None,
    row_shape: tuple[int, ...],
    dtype: torch.dtype,
    room: int,
) -> None:
    if buffer is None:
        return
    if (
        not isinstance(buffer, torch.Tensor)
        or buffer.dtype != dtype
        or tuple(buffer.shape[1:]) != row_shape
        or buffer.shape[0] < 1
    ):
        raise InvalidArgument(
            f"room {room}: the buffer must be a tensor of shape "
            f"[tokens, {', '.join(map(str, row_shape))}] and dtype {dtype}"
        )
    if not buffer.is_contiguous():
        raise InvalidArgument(f"room {room}: the buffer must be contiguous")


_PHYSICAL_MEMORY = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
MAX_ROWS = 2**40
"""Rows of one receive buffer: at most 2**40 - 1 (the wire's limit)."""


def _check_row_shape(room: int, row_shape: object) -> tuple[int, ...]:
    """``row_shape`` as a tuple of positive ints, or InvalidArgument naming it."""
    if isinstance(row_shape, int | str | bytes) or not isinstance(row_shape, Sequence):
        raise InvalidArgument(
            f"room {room}: row_shape must be a sequence of sizes, such as (4096,), "
            f"not {row_shape!r}"
        )
    bad = [d for d in row_shape if isinstance(d, bool) or not isinstance(d, int) or d < 1]
    if bad or not row_shape or len(row_shape) > 8:
        raise InvalidArgument(
            f"room {room}: row_shape must be 1 to 8 positive ints, such as (4096,), "
            f"not {tuple(row_shape)!r}"
        )
    return tuple(row_shape)


def _check_fits(room: int, rows: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """A buffer kvpoll allocates must fit this machine's memory."""
    need = rows * math.prod(shape) * dtype.itemsize
    have = _PHYSICAL_MEMORY
    if need > have:
        raise InvalidArgument(
            f"room {room}: allocated_tokens={rows} rows of {list(shape)} {dtype} need "
            f"{need / 2**30:.1f} GiB, more than this machine's {have / 2**30:.1f} GiB"
        )


def _distinct_pages(pool: PagedPool, pages: Any, room: int) -> list[Run]:
    """``pages`` of ``pool`` as runs, each page once.

    Raises:
        InvalidArgument: a page outside the pool, or one listed twice (two of
            the room's pages would be the same memory).
    """
    runs = pool.check_pages(pages, what=f"room {room}: pages")
    twice = first_repeat(runs)
    if twice is not None:
        raise InvalidArgument(
            f"room {room}: page {twice} is listed twice: each page holds tokens of its own"
        )
    return runs


def _page_runs(part: _Part, page_size: int) -> list[Run]:
    """The pool pages a part's token runs lie on."""
    return [(first // page_size, -(-count // page_size)) for first, count in part.tokens.runs()]


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    start = tensor.data_ptr()
    return start, start + tensor.numel() * tensor.element_size()


def _check_not_reused(room: int, buffer: torch.Tensor, parts: list[_Part]) -> None:
    """Refuse a resume buffer that shares memory with an earlier chunk of the room:
    that chunk is part of the room's result and would be overwritten."""
    start, end = _span(buffer)
    for part in parts:
        for held in part.pool.buffers:
            if held.device != buffer.device:
                continue
            lo, hi = _span(held)
            if start < hi and lo < end:
                raise InvalidArgument(
                    f"room {room}: the resume buffer shares memory with the buffer of "
                    f"tokens {part.base}.. of this room, which still hold that chunk "
                    "(rx.chunks() and result() are views of it): pass a new buffer, "
                    "or let kvpoll allocate one (buffer=None)"
                )


class Receiver(Endpoint[_ReceiverRoom]):
    """The side that receives (a language-model or decode worker).

    :meth:`open` offers memory and bootstraps toward a sender: pages of the
    application's :class:`~kvpoll.PagedPool` (``pool=``, ``pages=``), or a
    buffer of ``allocated_tokens`` rows (from a pool kvpoll owns, or the
    application's ``buffer``). The room mirrors the sender's steps:
    WaitingForInput once the sender has the memory, Transferring after a chunk
    that is not the last, Success after the last. When the memory is full and
    data remains, the room waits in Transferring for :meth:`resume` with more
    (for buffers from kvpoll's pool, ``auto_resume`` does it at once).
    """

    side = "receiver"

    def _setup(self) -> None:
        self._arenas = Arenas(self._transport.memory_kind())
        self._paths = list(self._transport.paths())  # fixed for the transport's life
        # pool id -> the pages its live (unfinished) rooms were offered: a page is
        # offered to one live room at a time, so no room's data overwrites another's
        self._ledgers: dict[int, PageLedger] = {}

    def _teardown(self) -> None:
        self._arenas.close()  # descriptors go now; views keep their memory mapped

    # -- public ------------------------------------------------------------------
    def open(
        self,
        room: int,
        sender: str,
        *,
        pool: PagedPool | None = None,
        pages: Any = None,
        aux_index: int | None = None,
        row_shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        allocated_tokens: int = 1024,
        rank: int = 0,
        buffer: torch.Tensor | None = None,
        auto_resume: bool = True,
        token: int | str | None = None,
    ) -> None:
        """Open a room toward ``sender`` (its address) and bootstrap.

        Args:
            room: the room id (the sender must use the same).
            sender: the sender's address.
            pool, pages: memory for the data: these pages of the application's
                pool (in room order; by default the one pool registered here
                with :meth:`register`). When they are full and data remains, the
                room waits in Transferring for :meth:`resume` with more pages.
            aux_index: the row of the pool's aux buffers the sender's aux row
                goes to.
            row_shape, dtype: without a pool: the shape of one token's row
                (``[hidden]`` for embeddings) and the data's dtype.
            allocated_tokens: without a pool: rows in each receive buffer.
            rank: this receiver's destination index at the sender (tensor-parallel rank).
            buffer: without a pool: the first receive buffer,
                ``[allocated_tokens, *row_shape]`` (default: one from kvpoll's pool).
            auto_resume: without a pool: after a partial chunk, resume with a
                buffer from kvpoll's pool at once; with False the room waits
                in Transferring for :meth:`resume`.
            token: the room's token, when the sender's ``add()`` was given one
                (the same value): the sender takes this bootstrap only with it.

        Raises:
            DuplicateRoom: the room is open here already.
            InvalidArgument: a bad argument.
            ResourceExhausted: no file descriptor, mapping or memory left for a
                buffer (nothing was changed).
        """
        check_room_id(room)
        if not isinstance(sender, str) or not sender:
            raise InvalidArgument(f"room {room}: sender must be an address string")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise InvalidArgument(f"room {room}: rank must be an int >= 0, not {rank!r}")
        wire_token = check_token(room, token)
        if pool is not None or pages is not None:
            if pages is None:
                raise InvalidArgument(f"room {room}: open() needs pages= with pool=")
            pool = self._default_pool(pool, f"room {room}")
            if buffer is not None:
                raise InvalidArgument(f"room {room}: open() takes pool pages or a buffer, not both")
            runs = _distinct_pages(pool, pages, room)
            if not runs:
                raise InvalidArgument(f"room {room}: open() needs at least one page")
            if aux_index is not None and (
                isinstance(aux_index, bool)
                or not isinstance(aux_index, int)
                or not 0 <= aux_index < pool.aux_rows
            ):
                raise InvalidArgument(
                    f"room {room}: aux_index must be a row of the pool's {pool.aux_rows} aux rows"
                )
            with self._lock:
                if self._here() and self._open_paged_here(
                    room, sender, pool, runs, aux_index, rank, wire_token
                ):
                    return
            self._call(
                lambda: self._open_paged(room, sender, pool, runs, aux_index, rank, wire_token)
            )
            return
        if row_shape is None or dtype is None:
            raise InvalidArgument(
                f"room {room}: open() needs pool= and pages=, or row_shape= and dtype="
            )
        shape = _check_row_shape(room, row_shape)
        if not isinstance(dtype, torch.dtype):
            raise InvalidArgument(f"room {room}: dtype must be a torch.dtype, not {dtype!r}")
        if (
            isinstance(allocated_tokens, bool)
            or not isinstance(allocated_tokens, int)
            or not 1 <= allocated_tokens < MAX_ROWS
        ):
            raise InvalidArgument(
                f"room {room}: allocated_tokens must be an int in 1 .. {MAX_ROWS - 1}, "
                f"not {allocated_tokens!r}"
            )
        _check_buffer(buffer, shape, dtype, room)
        if buffer is None:
            _check_fits(room, allocated_tokens, shape, dtype)
            with self._lock:
                if self._here() and self._open_here(
                    room, sender, shape, dtype, allocated_tokens, rank, auto_resume, wire_token
                ):
                    return
        self._call(
            lambda: self._open(
                room, sender, shape, dtype, allocated_tokens, rank, buffer, auto_resume, wire_token
            )
        )

    def resume(self, room: int, *, pages: Any = None, buffer: torch.Tensor | None = None) -> None:
        """Offer more memory once the room's memory is full and data remains.

        ``pages`` (of the room's pool) for a room opened on a pool; for a
        buffer room, ``buffer`` (default: one from kvpoll's pool).

        Raises:
            UnknownRoom: the room is not open here.
            IllegalTransition: the room is not Transferring, or has memory left.
            InvalidArgument: pages outside the pool, a buffer of the wrong
                shape or dtype, or one that shares memory with an earlier
                chunk of the room (which it would overwrite).
        """
        self._call(lambda: self._resume_command(room, pages, buffer))

    def result(self, room: int) -> Received:
        """What the room delivered, once it is Success.

        Raises:
            UnknownRoom: the room is not open here.
            TransferIncomplete: the room is not Success (yet, or ever).
        """
        with self._lock:
            rec = self._room(room)
            if rec.state.status is not TransferStatus.Success:
                raise TransferIncomplete(room, rec.state.status, rec.state.reason)
            return Received(room, tuple(rec.chunks), rec.aux, rec.total or 0)

    def chunks(self, room: int) -> tuple[torch.Tensor, ...]:
        """The chunks that have arrived so far (views), also before Success.

        Raises:
            UnknownRoom: the room is not open here.
        """
        with self._lock:
            rec = self._room(room)
            return tuple(rec.chunks)

    # -- commands (I/O thread) ----------------------------------------------------------
    def _new_room(self, room: int, sender: str, rank: int, token: str | None) -> _ReceiverRoom:
        if room in self._rooms:
            raise DuplicateRoom(room)
        rec = _ReceiverRoom(room, self._history)
        rec.sender, rec.rank, rec.token = sender, rank, token
        return rec

    def _paged_room(
        self,
        room: int,
        sender: str,
        pool: PagedPool,
        runs: list[tuple[int, int]],
        aux_index: int | None,
        rank: int,
        token: str | None,
    ) -> _ReceiverRoom:
        """A new record of a room on pages of ``pool`` (not registered yet)."""
        rec = self._new_room(room, sender, rank, token)
        self._check_free(room, pool, runs)
        rec.pool, rec.aux_index, rec.auto_resume = pool, aux_index, False
        rec.parts.append(_Part(0, pool, token_runs(runs, pool.page_size)))
        return rec

    def _check_free(
        self, room: int, pool: PagedPool, runs: list[Run], *, resume: bool = False
    ) -> None:
        """Refuse pages another live room of the pool holds (and, opening a room,
        any held at all: a room id open twice is refused before this).

        A resume may offer the room's own earlier pages again: resuming says
        what arrived there was taken out (the seed's "consume and free").

        Raises:
            InvalidArgument: naming a page and the room holding it.
        """
        ledger = self._ledgers.get(pool.id)
        held = ledger.conflict(runs, but=room if resume else None) if ledger else None
        if held is not None:
            page, other = held
            raise InvalidArgument(
                f"room {room}: page {page} of the pool is offered to room {other}, which is "
                "not finished; a page is offered to one unfinished room at a time"
            )

    def _hold_pages(self, room: int, pool: PagedPool, runs: list[Run]) -> None:
        ledger = self._ledgers.get(pool.id)
        if ledger is None:
            ledger = self._ledgers[pool.id] = PageLedger(pool.num_pages)
        ledger.hold(room, runs)

    def _release_pages(self, room: int, rec: _ReceiverRoom) -> None:
        pool = rec.pool
        ledger = self._ledgers.get(pool.id) if pool is not None else None
        if pool is not None and ledger is not None:
            ledger.release(room)
            if not len(ledger):
                del self._ledgers[pool.id]

    def _register(self, room: int, rec: _ReceiverRoom) -> None:
        super()._register(room, rec)
        if rec.pool is not None:  # the application's pages: held until the room ends
            for part in rec.parts:
                self._hold_pages(room, rec.pool, _page_runs(part, rec.pool.page_size))

    def _buffer_room(
        self,
        room: int,
        sender: str,
        rank: int,
        token: str | None,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        allocated: int,
        auto_resume: bool,
    ) -> _ReceiverRoom:
        """A new record of a buffer room, its memory not taken yet (not registered yet)."""
        rec = self._new_room(room, sender, rank, token)
        rec.row_shape, rec.dtype, rec.auto_resume = shape, dtype, auto_resume
        rec.whole, rec.allocated = True, allocated
        return rec

    def _open_paged_here(
        self,
        room: int,
        sender: str,
        pool: PagedPool,
        runs: list[tuple[int, int]],
        aux_index: int | None,
        rank: int,
        token: str | None,
    ) -> bool:
        """Open a paged room on the caller's thread (the lock is held) when only the
        bootstrap must reach the transport: the pool is registered and offered to
        this sender already. False, with nothing changed, otherwise."""
        entry = self._pools.get(pool.id)
        if entry is None or entry.pool is not pool or sender not in entry.offered_to:
            return False
        rec = self._paged_room(room, sender, pool, runs, aux_index, rank, token)
        self._enter(room, rec, self._bootstrap_message(room, rec, pool=pool, pages=runs))
        return True

    def _open_here(
        self,
        room: int,
        sender: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        allocated: int,
        rank: int,
        auto_resume: bool,
        token: str | None,
    ) -> bool:
        """Open a buffer room on the caller's thread (the lock is held) when only the
        bootstrap must reach the transport: an arena already registered and offered
        to this sender has the rows. False, with nothing changed, otherwise."""
        if room in self._rooms:
            raise DuplicateRoom(room)
        lease = self._arenas.take_existing(shape, dtype, allocated)
        if lease is None:
            return False
        entry = self._pools.get(lease.pool.id)
        if entry is None or sender not in entry.offered_to:
            self._arenas.put_back(lease)
            return False
        rec = self._buffer_room(room, sender, rank, token, shape, dtype, allocated, auto_resume)
        rec.parts.append(_Part(0, lease.pool, PageList([(lease.start, allocated)]), lease=lease))
        pages = [(lease.start, allocated)]
        self._enter(room, rec, self._bootstrap_message(room, rec, pool=lease.pool, pages=pages))
        return True

    def _enter(self, room: int, rec: _ReceiverRoom, bootstrap: bytes) -> None:
        """Register a room opened on the caller's thread; its bootstrap goes out next."""
        self._register(room, rec)
        self._watch(room, rec, rec.sender)
        self._queue(rec.sender, bootstrap, "bootstrap", room, rec)

    def _open_paged(
        self,
        room: int,
        sender: str,
        pool: PagedPool,
        runs: list[tuple[int, int]],
        aux_index: int | None,
        rank: int,
        token: str | None,
    ) -> None:
        rec = self._paged_room(room, sender, pool, runs, aux_index, rank, token)
        self._bootstrap(room, rec, pool=pool, pages=runs)

    def _open(
        self,
        room: int,
        sender: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        allocated: int,
        rank: int,
        buffer: torch.Tensor | None,
        auto_resume: bool,
        token: str | None,
    ) -> None:
        rec = self._buffer_room(room, sender, rank, token, shape, dtype, allocated, auto_resume)
        part = self._buffer(rec, buffer, allocated, 0)
        rec.parts.append(part)
        try:
            if part.region is not None:
                self._bootstrap(room, rec, region=part.region, tokens=len(part.tokens))
            else:
                assert part.lease is not None
                self._bootstrap(room, rec, pool=part.pool, pages=[(part.lease.start, allocated)])
        except BaseException:
            self._give_back(rec, quarantine=False)
            raise

    def _bootstrap(
        self,
        room: int,
        rec: _ReceiverRoom,
        *,
        pool: PagedPool | None = None,
        pages: list[tuple[int, int]] | None = None,
        region: Region | None = None,
        tokens: int = 0,
    ) -> None:
        try:  # an address this transport cannot use is the caller's error, not a hang
            if pool is not None:
                self._offer(rec.sender, pool)
            bootstrap = self._bootstrap_message(
                room, rec, pool=pool, pages=pages, region=region, tokens=tokens
            )
            self._transport.send(rec.sender, bootstrap)
        except Exception as exc:  # nothing was opened: the caller learns why
            if region is not None:
                self._transport.release(region, reuse=False)
            if not isinstance(exc, TransportError):
                raise
            raise InvalidArgument(
                f"room {room}: cannot reach the sender at {rec.sender!r}: {exc}"
            ) from exc
        self._stats["messages_out"] += 1
        self._register(room, rec)
        self._watch(room, rec, rec.sender)

    def _bootstrap_message(
        self,
        room: int,
        rec: _ReceiverRoom,
        *,
        pool: PagedPool | None = None,
        pages: list[tuple[int, int]] | None = None,
        region: Region | None = None,
        tokens: int = 0,
    ) -> bytes:
        """The room's bootstrap, encoded: pages of an offered pool, or one region inline."""
        common: dict[str, Any] = {
            "room": room,
            "session": rec.session,
            "rank": rec.rank,
            "transports": self._paths,
            "host": boot_id(),
            "token": rec.token,
            "ack_with_chunk": True,
        }
        if pool is not None:
            return bootstrap_payload(
                **common, pool=pool.id, pages=pages, aux_index=rec.aux_index, whole=rec.whole
            )
        assert region is not None
        return bootstrap_payload(
            **common,
            region=region.descriptor,
            allocated_tokens=tokens,
            row_bytes=region.nbytes // tokens,
            dtype=dtype_name(rec.dtype),
            row_shape=list(rec.row_shape),
        )

    def _offer(self, sender: str, pool: PagedPool) -> None:
        """Register ``pool`` here and announce it to ``sender``, each once.

        Raises:
            InvalidArgument: the transport cannot reach the pool's memory.
            TransportError: the sender's address is not usable.
        """
        entry = self._pool_entry(pool)
        if sender not in entry.offered_to:
            self._transport.send(sender, encode(entry.offer()))
            self._stats["messages_out"] += 1
            entry.offered_to.add(sender)

    def _buffer(
        self, rec: _ReceiverRoom, buffer: torch.Tensor | None, allocated: int, base: int
    ) -> _Part:
        """Memory for a buffer room: the application's buffer, or a run of an arena."""
        room = rec.state.room
        if buffer is not None:
            try:
                region = self._transport.register(buffer)
            except TransportError as exc:
                raise InvalidArgument(f"room {room}: {exc}") from exc
            own = PagedPool([buffer], page_size=1)
            return _Part(base, own, PageList([(0, int(buffer.shape[0]))]), region=region)
        try:
            lease, new = self._arenas.take(rec.row_shape, rec.dtype, allocated)
        except (ResourceExhausted, OSError, MemoryError) as exc:
            raise ResourceExhausted(
                f"room {room}: cannot allocate allocated_tokens={allocated} rows: {exc}"
            ) from exc
        except (SegmentError, InvalidArgument, RuntimeError) as exc:
            raise InvalidArgument(f"room {room}: cannot allocate {allocated} rows: {exc}") from exc
        if new:
            try:
                self._pool_entry(lease.pool).internal = True
            except InvalidArgument:
                self._arenas.give(lease)
                raise
        return _Part(base, lease.pool, PageList([(lease.start, allocated)]), lease=lease)

    def _resume_command(self, room: int, pages: Any, buffer: torch.Tensor | None) -> None:
        rec = self._room(room)
        if not rec.state.can(Event.RESUMED) or rec.capacity > rec.state.sent_tokens:
            raise IllegalTransition(
                room,
                rec.state.status,
                "resumed",
                "a resume needs a room in Transferring whose memory is full",
            )
        if rec.pool is not None:
            if pages is None or buffer is not None:
                raise InvalidArgument(f"room {room}: a room on a pool resumes with pages=")
            runs = _distinct_pages(rec.pool, pages, room)
            if not runs:
                raise InvalidArgument(f"room {room}: a resume needs at least one page")
            self._check_free(room, rec.pool, runs, resume=True)
            self._resume_pages(room, rec, runs)
            return
        if pages is not None:
            raise InvalidArgument(f"room {room}: a buffer room resumes with buffer=, not pages=")
        _check_buffer(buffer, rec.row_shape, rec.dtype, room)
        if buffer is not None:
            _check_not_reused(room, buffer, rec.parts)
        self._resume(room, rec, buffer)

    def _resume_pages(self, room: int, rec: _ReceiverRoom, runs: list[tuple[int, int]]) -> None:
        pool = rec.pool
        assert pool is not None
        delivered = rec.state.sent_tokens
        rec.parts.append(_Part(delivered, pool, token_runs(runs, pool.page_size)))
        self._release_pages(room, rec)  # the earlier pages were taken out: resuming says so
        self._hold_pages(room, pool, runs)
        if self._step(room, rec, "resumed", lambda: rec.state.resumed(sent_tokens=delivered)):
            self._send(
                rec.sender,
                Resume(
                    room=room,
                    session=rec.session,
                    rank=rec.rank,
                    sent_tokens=delivered,
                    pages=runs,
                    pool=pool.id,
                ),
            )

    def _resume(self, room: int, rec: _ReceiverRoom, buffer: torch.Tensor | None) -> None:
        delivered = rec.state.sent_tokens
        try:
            part = self._buffer(rec, buffer, rec.allocated, delivered)
        except (InvalidArgument, ResourceExhausted) as exc:
            self._fail(room, rec, str(exc))
            return
        rec.parts.append(part)
        try:
            if part.lease is not None:
                self._offer(rec.sender, part.pool)
        except (InvalidArgument, TransportError) as exc:
            self._fail(room, rec, str(exc))
            return
        if not self._step(room, rec, "resumed", lambda: rec.state.resumed(sent_tokens=delivered)):
            return
        if part.region is not None:
            message = Resume(
                room=room,
                session=rec.session,
                rank=rec.rank,
                sent_tokens=delivered,
                region=part.region.descriptor,
                allocated_tokens=len(part.tokens),
            )
        else:
            assert part.lease is not None
            message = Resume(
                room=room,
                session=rec.session,
                rank=rec.rank,
                sent_tokens=delivered,
                pages=[(part.lease.start, part.lease.count)],
                pool=part.pool.id,
            )
        self._send(rec.sender, message)

    # -- messages ----------------------------------------------------------------------
    def _on_message(self, peer: str, message: Message) -> None:
        if isinstance(message, Abort):
            self._on_abort(peer, message)
            return
        if isinstance(message, AbortAck):
            self._stats["abort_acks"] += 1
            return
        rec = self._rooms.get(message.room) if hasattr(message, "room") else None
        if (
            rec is None
            or peer != rec.sender
            or getattr(message, "session", None) != rec.session
            or getattr(message, "rank", None) != rec.rank
        ):
            self._drop(peer, message, "no such room here, or not from its sender")
            return
        room = message.room  # type: ignore[union-attr]
        if isinstance(message, BootstrapAck):
            if message.transport:
                rec.paths.add(message.transport)
            if rec.state.can(Event.BOOTSTRAPPED):
                self._step(room, rec, "bootstrapped", rec.state.bootstrapped)
            else:
                self._stats["late"] += 1
        elif isinstance(message, Reject):
            if message.unknown_pool:  # the sender forgot us (a restart): offer again
                for entry in self._pools.values():
                    entry.offered_to.discard(peer)
            self._fail(room, rec, f"the sender refused: {message.reason}", tell=False)
        elif isinstance(message, Chunk):
            if message.transport is not None and rec.state.can(Event.BOOTSTRAPPED):
                # the acknowledgement came with the first chunk (ack_with_chunk)
                rec.paths.add(message.transport)
                if not self._step(room, rec, "bootstrapped", rec.state.bootstrapped):
                    return
            self._chunk(room, rec, message)
        else:
            self._drop(peer, message, f"a receiver does not take {message.type}")

    def _chunk(self, room: int, rec: _ReceiverRoom, message: Chunk) -> None:
        before = rec.state.sent_tokens
        capacity = rec.capacity - before
        why = None
        if rec.state.is_final:
            self._drop(rec.sender, message, f"the room is {rec.state.status.name}")
            return
        if capacity <= 0:
            why = "a chunk arrived before the receiver resumed"
        elif not 1 <= message.chunk_tokens <= capacity:
            why = f"a chunk of {message.chunk_tokens} tokens for a buffer of {capacity}"
        elif message.sent_tokens != before + message.chunk_tokens:
            why = (
                f"sent_tokens={message.sent_tokens} does not follow {before} delivered plus "
                f"{message.chunk_tokens}"
            )
        elif rec.total is not None and message.total_tokens not in (None, rec.total):
            why = f"the total changed from {rec.total} to {message.total_tokens}"
        elif message.is_last != (message.sent_tokens == message.total_tokens):
            why = (
                f"is_last={message.is_last} with {message.sent_tokens} of "
                f"{message.total_tokens} tokens delivered"
            )
        if why is not None:
            self._stats["rejected"] += 1
            self._fail(room, rec, f"protocol violation: {why}")
            return
        if message.total_tokens is not None:
            rec.total = message.total_tokens
        if message.aux is not None and not rec.aux:
            rec.aux = message.aux
        part = rec.parts[-1]
        data = part.pool.buffers[0]
        runs = part.tokens.slice(before - part.base, message.sent_tokens - part.base)
        entry = self._pools.get(part.pool.id)
        if entry is not None and entry.staging is not None:  # into device memory, then count it
            rec.staged = True
            try:
                entry.stage_in(runs, rec.aux_index)  # the aux row may come with any chunk
            except RuntimeError as exc:
                self._fail(room, rec, f"cannot copy the chunk into device memory: {exc}")
                return
        for first, count in runs:
            rec.chunks.append(data[first : first + count])
        if rec.whole and not message.is_last:  # this buffer took its chunk
            part.tokens = PageList(part.tokens.slice(0, message.sent_tokens - part.base))
        row_bytes = sum(layout.row_bytes for layout in part.pool.layouts)
        rec.bytes_moved += message.chunk_tokens * row_bytes
        if message.is_last and rec.aux_index is not None and rec.pool is not None:
            rec.bytes_moved += sum(layout.row_bytes for layout in rec.pool.aux_layouts)
        if (
            self._step(
                room,
                rec,
                "chunk_sent",
                lambda: rec.state.chunk_sent(
                    sent_tokens=message.sent_tokens, is_last=message.is_last
                ),
            )
            and rec.state.status is TransferStatus.Transferring
            and rec.auto_resume
            and rec.capacity == rec.state.sent_tokens
        ):
            self._resume(room, rec, None)

    # -- hooks ----------------------------------------------------------------------------
    def _give_back(self, rec: _ReceiverRoom, *, quarantine: bool) -> None:
        for part in rec.parts:
            if part.lease is not None:
                for pool in self._arenas.give(part.lease, quarantine=quarantine):
                    self._drop_pool(pool)
            if part.region is not None:
                self._transport.release(part.region, reuse=False)
        rec.parts.clear()

    def _drop_pool(self, pool: PagedPool) -> None:
        entry = self._pools.pop(pool.id, None)
        if entry is not None:
            entry.release(self._transport)

    def _finished(self, room: int, rec: _ReceiverRoom) -> None:
        self._release_pages(room, rec)
        if rec.state.status is TransferStatus.Failed:
            # A sender may still write into this memory: quarantine it, never hand it on now.
            self._give_back(rec, quarantine=True)

    def _released(self, room: int, rec: _ReceiverRoom) -> None:
        self._release_pages(room, rec)
        self._give_back(rec, quarantine=False)
        rec.chunks.clear()

    def _on_tick(self, now: float) -> None:
        for pool in self._arenas.tick(now):
            self._drop_pool(pool)

    def _uses_pool(self, rec: _ReceiverRoom, pool: PagedPool) -> bool:
        return any(part.pool is pool for part in rec.parts)

    def _abort_messages(
        self, room: int, rec: _ReceiverRoom, reason: str
    ) -> list[tuple[str, Abort]]:
        abort = Abort(room=room, session=rec.session, rank=rec.rank, reason=peer_reason(reason))
        return [(rec.sender, abort)]

    def _session_ok(self, rec: _ReceiverRoom, peer: str, message: Abort) -> bool:
        return peer == rec.sender and message.session == rec.session and message.rank == rec.rank
