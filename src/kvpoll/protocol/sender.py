"""The sender side (encoder, prefill worker): holds the data, writes it into
the memory its receivers offer, chunk by chunk, as the data becomes available."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from kvpoll.errors import DuplicateRoom, IllegalTransition, InvalidArgument
from kvpoll.memory.pages import PageList, Run, first_repeat, pair_runs
from kvpoll.memory.pool import PagedPool, dtype_name
from kvpoll.protocol.early import PENDING_ROOMS, EarlyBootstraps
from kvpoll.protocol.endpoint import Endpoint, RoomBase
from kvpoll.protocol.messages import (
    MAX_AUX_BYTES,
    Abort,
    AbortAck,
    Bootstrap,
    BootstrapAck,
    Message,
    PoolBuffer,
    PoolOffer,
    Reject,
    Resume,
    check_token,
    peer_reason,
)
from kvpoll.protocol.negotiation import choose_path, mismatch
from kvpoll.protocol.payloads import chunk_payload
from kvpoll.protocol.pools import MAX_PEER_POOLS, PeerPool, Registered, token_runs
from kvpoll.statemachine.registry import check_room_id
from kvpoll.statemachine.status import Event, TransferStatus
from kvpoll.transports.base import Span, TransportError, WriteDone
from kvpoll.transports.shm import boot_id
from kvpoll.transports.spans import SpanBatch

__all__ = ["PENDING_ROOMS", "Sender", "dtype_name"]

_FEW_RANGES = 16
"""A write of at most this many page ranges is a list of spans, not columns."""
POOL_PEERS = 1_024
"""Peers whose offered pools are kept, at most (the least recently used goes)."""
POOL_BYTES_PER_PEER = 8 << 20
"""What one peer's offered pools may hold here (their descriptions), at most."""
POOL_BYTES = 64 << 20
"""What every peer's offered pools may hold here together, at most."""
log = logging.getLogger("kvpoll.protocol")


@dataclass
class _Dest:
    """One destination (rank) of a room: its memory for the room, part by part.

    A part is the memory offered at bootstrap or by one resume; room tokens
    ``base ..`` live in ``tokens`` (token runs of ``pool``'s buffers).
    """

    peer: str
    session: int
    pool: PeerPool
    tokens: PageList
    aux_index: int | None
    whole: bool = False  # one chunk per memory offered: full after every chunk
    base: int = 0
    resumed_at: int = -1  # sent_tokens of its last accepted resume (duplicates repeat it)
    ack: str | None = None  # its bootstrap is acknowledged with the first chunk (this path)
    noticed: bool = False  # its next chunk message rides with the write in flight

    @property
    def capacity(self) -> int:
        """Room tokens this destination has memory for, in all."""
        return self.base + len(self.tokens)


@dataclass
class _Source:
    """The room's data: token runs of a registered pool, growing with each send()."""

    entry: Registered
    tokens: PageList = field(default_factory=PageList)
    pages: list[Run] = field(default_factory=list)  # every page sent so far, as runs
    last: bool = False
    aux_index: int | None = None
    aux_bytes: bytes = b""

    @property
    def owned(self) -> bool:
        """A pool kvpoll made for send(room, tensor): released with the room."""
        return self.entry.internal

    @property
    def total(self) -> int | None:
        return len(self.tokens) if self.last else None


class _SenderRoom(RoomBase):
    __slots__ = (
        "aux_done",
        "aux_with",
        "data",
        "dests",
        "in_flight",
        "planned",
        "planned_aux",
        "required",
        "token",
        "written",
    )

    def __init__(
        self, room: int, required: int, history: bool, aux_with: str, token: str | None = None
    ) -> None:
        super().__init__(room, history)
        self.required = required
        self.token = token
        self.aux_with = aux_with
        self.dests: dict[int, _Dest] = {}
        self.data: _Source | None = None
        self.in_flight: set[int] = set()
        self.written = 0  # tokens every destination confirmed (stepped or not yet)
        self.planned = 0  # where the writes in flight end
        self.planned_aux = False  # the writes in flight carry the aux row
        self.aux_done = False

    @property
    def total_tokens(self) -> int | None:
        return self.data.total if self.data is not None else None


def _spans(
    entry: Registered,
    pool: PeerPool,
    runs: list[tuple[int, int, int]],
    aux_rows: tuple[int, int] | None,
) -> Sequence[Span] | None:
    """The ranges of one write to one destination (None: nothing to move); as
    columns (a :class:`SpanBatch`) unless they are few.

    ``runs`` are (source token, destination token, tokens) of the pages; each
    run is one range in every buffer (run-major, buffer-minor), with each
    buffer's row size. ``aux_rows``: (source row, destination row) of the aux
    row, one range in every aux buffer.
    """
    pairs = list(zip(entry.regions, [b.region for b in pool.buffers], strict=True))
    row_bytes = [b.row_bytes for b in pool.buffers]
    if len(runs) * len(pairs) <= _FEW_RANGES:  # columns would cost more than they save
        spans = [
            Span(src, s * rb, dst, d * rb, n * rb)
            for s, d, n in runs
            for (src, dst), rb in zip(pairs, row_bytes, strict=True)
        ]
        if aux_rows is not None:
            spans += [
                Span(
                    src, aux_rows[0] * b.row_bytes, b.region, aux_rows[1] * b.row_bytes, b.row_bytes
                )
                for src, b in zip(entry.aux_regions, pool.aux, strict=True)
            ]
        return spans or None
    columns = np.zeros((4, 0), dtype=np.int64)
    if runs:
        table = np.array(runs, dtype=np.int64)
        rb = np.array(row_bytes, dtype=np.int64)
        columns = np.stack(
            [
                np.tile(np.arange(len(rb), dtype=np.int64), len(table)),
                (table[:, 0:1] * rb).reshape(-1),
                (table[:, 1:2] * rb).reshape(-1),
                (table[:, 2:3] * rb).reshape(-1),
            ]
        )
    if aux_rows is not None:
        src_row, dst_row = aux_rows
        aux = [
            (len(pairs) + i, src_row * b.row_bytes, dst_row * b.row_bytes, b.row_bytes)
            for i, b in enumerate(pool.aux)
        ]
        pairs += zip(entry.aux_regions, [b.region for b in pool.aux], strict=True)
        if aux:
            columns = np.concatenate([columns, np.array(aux, dtype=np.int64).T], axis=1)
    if not columns.shape[1]:
        return None
    return SpanBatch(pairs, *columns)


def _check_int(room: int, name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgument(f"room {room}: {name} must be an int >= {low}, not {value!r}")


def _check_tensor(room: int, tensor: object) -> torch.Tensor:
    """``tensor`` can be sent as ``[tokens, *row_shape]``, or InvalidArgument says why."""
    if not isinstance(tensor, torch.Tensor):
        hint = " (torch.from_numpy(array) makes one)" if type(tensor).__name__ == "ndarray" else ""
        raise InvalidArgument(
            f"room {room}: send() takes a torch.Tensor or pages of a pool, "
            f"not {type(tensor).__name__}{hint}"
        )
    if tensor.device.type not in ("cpu", "cuda"):
        raise InvalidArgument(
            f"room {room}: send() moves CPU or CUDA memory, not a {tensor.device.type} tensor"
            + (" (a meta tensor has no data)" if tensor.device.type == "meta" else "")
        )
    if tensor.dim() < 2:
        raise InvalidArgument(
            f"room {room}: send() needs a tensor of shape [tokens, *row_shape], not "
            f"{list(tensor.shape)} (for one value per token: tensor[:, None])"
        )
    if tensor.shape[0] < 1 or tensor.numel() < 1:
        raise InvalidArgument(f"room {room}: send() needs at least one token of data")
    if tensor.is_conj() or tensor.is_neg():
        raise InvalidArgument(
            f"room {room}: the tensor is a lazy conjugate or negation view "
            "(.conj()): pass tensor.resolve_conj().resolve_neg()"
        )
    if not tensor.is_contiguous():
        raise InvalidArgument(f"room {room}: the tensor must be contiguous (.contiguous())")
    return tensor


class Sender(Endpoint[_SenderRoom]):
    """The side that holds the data (an encoder or prefill worker).

    Receivers open rooms toward :attr:`address`. A room stays Bootstrapping
    until all its ``required_destinations`` have bootstrapped, then
    WaitingForInput. Data comes with :meth:`send`: a whole tensor, or pages
    of a :class:`~kvpoll.PagedPool` in as many calls as the data takes to
    appear. Whatever the destinations have memory for is written at once, to
    every destination. The room steps (once every destination confirmed the
    writes) to Success when the data is complete and written, or to
    Transferring when data waits that a destination has no memory for; that
    destination resumes with more, and the next chunk goes when every
    destination has room (see docs/memory.md). See :class:`Endpoint` for the options shared with
    :class:`~kvpoll.Receiver`.
    """

    side = "sender"

    def _setup(self) -> None:
        self._early = EarlyBootstraps()  # bootstraps for rooms not added yet
        self._host = boot_id()
        self._spoken = list(self._transport.paths())  # fixed for the transport's life
        self._peer_pools: dict[str, OrderedDict[int, PeerPool]] = {}
        self._pool_bytes = 0  # what every peer's pool descriptions hold here

    # -- public ------------------------------------------------------------------
    def add(
        self,
        room: int,
        *,
        required_destinations: int = 1,
        aux_with: Literal["first", "last"] = "last",
        token: int | str | None = None,
    ) -> None:
        """Open a room; receivers may bootstrap before or after this call.

        Args:
            room: the room id (the receivers use the same).
            required_destinations: ranks that must each receive the data.
            aux_with: which chunk carries the room's aux row (see :meth:`send`).
            token: a value the application hands to this room's receivers too
                (SGLang's bootstrap room, a request id): only a bootstrap that
                carries it is taken; any other is refused alone, the room
                unchanged. Without a token the first bootstrap of a rank wins.

        Raises:
            DuplicateRoom: the room is open here already.
            InvalidArgument: a non-int room, or fewer than one destination.
        """
        check_room_id(room)
        _check_int(room, "required_destinations", required_destinations, 1)
        if aux_with not in ("first", "last"):
            raise InvalidArgument(f"room {room}: aux_with must be 'first' or 'last'")
        wire_token = check_token(room, token)
        self._call(lambda: self._add(room, required_destinations, aux_with, wire_token))

    def send(
        self,
        room: int,
        tensor: torch.Tensor | PagedPool | None = None,
        *,
        pages: Any = None,
        pool: PagedPool | None = None,
        is_last: bool = True,
        tokens: int | None = None,
        aux_index: int | None = None,
        aux: bytes = b"",
    ) -> None:
        """Hand the room its data, all at once or piece by piece.

        Either a tensor of shape ``[tokens, *row_shape]`` (the whole data, in
        one call), or ``pages`` of ``pool`` (a :class:`~kvpoll.PagedPool`; by
        default the one pool registered here with :meth:`register`):
        the next pages of the room's data, in order, as they become available
        (one call per prefill chunk). ``is_last=False`` says more will follow;
        the call with ``is_last=True`` completes the data. Every page is full
        except perhaps the last page of the last call: ``tokens`` gives the
        tokens these pages hold (default: all of them).

        Memory given is written from, not copied: it must stay unchanged until
        the room is final. If the room is still Bootstrapping, the data waits
        for the destinations. Returns at once; watch the room with
        :meth:`poll` or :meth:`wait`.

        Args:
            aux_index: the row of the pool's aux buffers that goes to the
                receiver's aux row (with the chunk ``add(aux_with=...)`` says).
            aux: small metadata bytes for the receiver (with the first chunk).

        Raises:
            UnknownRoom: the room is not open here.
            IllegalTransition: the room's data is complete already, or it is final.
            InvalidArgument: a bad tensor, pages outside the pool, a partial
                page before the end, a different pool than earlier calls, or
                ``aux`` too large.
        """
        if not isinstance(aux, bytes | bytearray) or len(aux) > MAX_AUX_BYTES:
            raise InvalidArgument(f"room {room}: aux must be bytes of at most {MAX_AUX_BYTES}")
        if isinstance(tensor, PagedPool) and pool is None:  # send(room, pool, pages=...)
            tensor, pool = None, tensor
        if not isinstance(is_last, bool):
            raise InvalidArgument(f"room {room}: is_last must be a bool")
        if tensor is not None:
            if pages is not None or pool is not None:
                raise InvalidArgument(f"room {room}: send() takes a tensor or pages, not both")
            if not is_last:
                raise InvalidArgument(
                    f"room {room}: a tensor is the room's whole data (is_last=False does not "
                    "apply); to hand data over piece by piece, send pages of a registered pool"
                )
            tensor = _check_tensor(room, tensor)
            own = PagedPool([tensor], page_size=1)
            runs = [(0, int(tensor.shape[0]))]
            self._call(lambda: self._set_data(room, own, runs, None, True, None, bytes(aux), True))
            return
        if pages is None:
            raise InvalidArgument(f"room {room}: send() needs a tensor, or pages= of a pool")
        pool = self._default_pool(pool, f"room {room}")
        runs = pool.check_pages(pages, what=f"room {room}: pages")
        twice = first_repeat(runs)
        if twice is not None:
            raise InvalidArgument(
                f"room {room}: page {twice} is listed twice: each page holds tokens of its own"
            )
        if tokens is not None:
            _check_int(room, "tokens", tokens, 0)
        if aux_index is not None:
            _check_int(room, "aux_index", aux_index, 0)
            if aux_index >= pool.aux_rows:
                raise InvalidArgument(
                    f"room {room}: aux_index {aux_index} is outside the pool's "
                    f"{pool.aux_rows} aux rows"
                )
        self._call(
            lambda: self._set_data(room, pool, runs, tokens, is_last, aux_index, bytes(aux), False)
        )

    # -- commands (I/O thread) ------------------------------------------------------
    def _add(self, room: int, required: int, aux_with: str, token: str | None) -> None:
        if room in self._rooms:
            raise DuplicateRoom(room)
        rec = _SenderRoom(room, required, self._history, aux_with, token)
        self._register(room, rec)
        for peer, message in self._early.take(room):
            self._bootstrap(peer, message)

    def _set_data(
        self,
        room: int,
        pool: PagedPool,
        runs: list[tuple[int, int]],
        tokens: int | None,
        is_last: bool,
        aux_index: int | None,
        aux: bytes,
        owned: bool,
    ) -> None:
        rec = self._room(room)
        data = rec.data
        if rec.state.is_final or (data is not None and data.last):
            raise IllegalTransition(
                room,
                rec.state.status,
                "send",
                f"{rec.state.status.name} is final"
                if rec.state.is_final
                else "the room already has all its data",
            )
        if data is not None and data.entry.pool is not pool:
            raise InvalidArgument(f"room {room}: every send() of a room names the same pool")
        full = sum(count for _, count in runs) * pool.page_size
        given = full if tokens is None else tokens
        if given > full or (given <= full - pool.page_size and runs):
            raise InvalidArgument(
                f"room {room}: {given} tokens on {full // pool.page_size} pages of "
                f"{pool.page_size}: only the last page may be partial"
            )
        if given < full and not is_last:
            raise InvalidArgument(f"room {room}: only the last send() may end in a partial page")
        if data is not None and len(data.tokens) % pool.page_size:
            raise InvalidArgument(f"room {room}: the data already ended in a partial page")
        if given == 0 and is_last and (data is None or not len(data.tokens)):
            raise InvalidArgument(f"room {room}: a room needs at least one token")
        again = first_repeat(data.pages + runs) if data is not None and not owned else None
        if again is not None:
            raise InvalidArgument(
                f"room {room}: page {again} was sent in an earlier send() of this room"
            )
        if data is None:
            try:
                entry = self._pool_entry(pool)
            except InvalidArgument as exc:
                raise InvalidArgument(f"room {room}: {exc}") from exc
            entry.internal = entry.internal or owned
            data = rec.data = _Source(entry, aux_bytes=aux)
        data.tokens.extend(token_runs(runs, pool.page_size, given).runs())
        data.pages.extend(runs)
        data.last = is_last
        if aux_index is not None:
            data.aux_index = aux_index
        if aux and not data.aux_bytes:
            data.aux_bytes = aux
        self._advance(room, rec)

    # -- messages ----------------------------------------------------------------------
    def _on_message(self, peer: str, message: Message) -> None:
        if isinstance(message, Bootstrap):
            self._bootstrap(peer, message)
        elif isinstance(message, Resume):
            self._resume(peer, message)
        elif isinstance(message, PoolOffer):
            self._pool_offer(peer, message)
        elif isinstance(message, Abort):
            self._on_abort(peer, message)
        elif isinstance(message, AbortAck):
            self._stats["abort_acks"] += 1
        else:
            self._drop(peer, message, f"a sender does not take {message.type}")

    def _pool_offer(self, peer: str, offer: PoolOffer) -> None:
        try:
            pool = PeerPool.from_offer(peer, offer)
        except InvalidArgument as exc:
            self._drop(peer, offer, str(exc))
            return
        if pool.size > POOL_BYTES_PER_PEER:
            self._drop(peer, offer, f"a pool description of {pool.size} bytes")
            return
        pools = self._peer_pools.pop(peer, None) or OrderedDict()
        self._peer_pools[peer] = pools  # most recent last
        old = pools.pop(offer.pool, None)
        self._pool_bytes -= old.size if old is not None else 0
        pools[offer.pool] = pool
        self._pool_bytes += pool.size
        held = sum(p.size for p in pools.values())
        while len(pools) > MAX_PEER_POOLS or held > POOL_BYTES_PER_PEER:  # its oldest go
            _, gone = pools.popitem(last=False)
            held -= gone.size
            self._pool_bytes -= gone.size
            self._stats["rejected"] += 1
        while len(self._peer_pools) > POOL_PEERS or self._pool_bytes > POOL_BYTES:
            self._forget_pools(next(iter(self._peer_pools)))  # the least recently used peer
            self._stats["rejected"] += 1

    def _forget_pools(self, peer: str) -> None:
        for pool in (self._peer_pools.pop(peer, None) or {}).values():
            self._pool_bytes -= pool.size

    def _forget_peer(self, address: str) -> None:
        super()._forget_peer(address)
        self._forget_pools(address)

    def _memory(
        self, peer: str, message: Bootstrap | Resume, current: PeerPool | None
    ) -> tuple[PeerPool, PageList] | str:
        """The memory a bootstrap or resume offers, or why it cannot be used."""
        if message.pages is not None:
            if message.pool is not None:
                offered = self._peer_pools.get(peer)
                found = offered.get(message.pool) if offered is not None else None
                if found is None:
                    return f"pool {message.pool} was never offered by {peer}"
                pool = found
            elif current is None:
                return "pages for a room that has no pool"
            else:
                pool = current
            runs = [(int(a), int(b)) for a, b in message.pages]
            why = pool.check_runs(runs)
            if why is not None:
                return why
            twice = first_repeat(runs)
            if twice is not None:  # two ranges would write the same memory
                return f"page {twice} is offered twice"
            return pool, token_runs(runs, pool.page_size)
        region, tokens = message.region, message.allocated_tokens
        assert region is not None
        assert tokens is not None
        if region.endpoint != peer:
            return f"the region named is memory of {region.endpoint}, not of {peer}"
        if isinstance(message, Bootstrap):
            assert message.row_bytes is not None
            assert message.dtype is not None
            assert message.row_shape is not None
            buffer = PoolBuffer(
                region=region,
                row_bytes=message.row_bytes,
                dtype=message.dtype,
                row_shape=message.row_shape,
            )
        else:
            if current is None or len(current.buffers) != 1:
                return "a region for a room whose memory is a pool"
            buffer = current.buffers[0].model_copy(update={"region": region})
        if region.nbytes < tokens * buffer.row_bytes:
            return (
                f"a region of {region.nbytes} bytes cannot hold {tokens} rows of {buffer.row_bytes}"
            )
        return PeerPool.inline(buffer, tokens), PageList([(0, tokens)])

    def _bootstrap(self, peer: str, message: Bootstrap) -> None:
        room = message.room
        rec = self._rooms.get(room)
        spoken = self._spoken
        same_host = message.host == self._host if message.host else None
        path = choose_path(message.transports, spoken, same_host=same_host)
        if path is None and rec is None:
            self._reject(peer, message, mismatch(message.transports, spoken, same_host=same_host))
            return
        if rec is None:
            if room in self._tombstones:
                self._drop(peer, message, "late")
                return
            refused, dropped = self._early.add(peer, message, time.monotonic())
            for p, m in dropped:  # made room for this one
                self._stats["pending_dropped"] += 1
                self._reject(p, m, "dropped: too many bootstraps wait for rooms not added yet")
            if refused is not None:
                self._stats["pending_dropped"] += 1
                self._reject(peer, message, refused)
            return
        if rec.token is not None and message.token != rec.token:
            # someone else's bootstrap (or a stale one): refused alone, the room unchanged
            self._reject(peer, message, "the bootstrap does not carry the room's token")
            return
        if path is None:
            reason = mismatch(message.transports, spoken, same_host=same_host)
            self._reject(peer, message, reason)
            # only a bootstrap the room could have taken fails it: one for a rank out
            # of range or taken already, or for a room past Bootstrapping, is refused alone
            if self._rank_refusal(rec, message) is None:
                self._fail(room, rec, f"rank {message.rank} at {peer}: {reason}")
            return
        why = self._rank_refusal(rec, message)
        memory = self._memory(peer, message, None) if why is None else why
        if isinstance(memory, str):
            known = self._peer_pools.get(peer)
            unknown = message.pool is not None and (known is None or message.pool not in known)
            self._reject(peer, message, memory, unknown_pool=unknown)
            return
        pool, tokens = memory
        if message.aux_index is not None and message.aux_index >= pool.aux_rows:
            self._reject(peer, message, f"aux_index {message.aux_index} is outside the pool")
            return
        rec.dests[message.rank] = _Dest(
            peer,
            message.session,
            pool,
            tokens,
            message.aux_index,
            whole=message.whole or message.region is not None,
        )
        self._watch(room, rec, peer)
        rec.paths.add(path)
        data = rec.data
        if (
            message.ack_with_chunk
            and data is not None
            and data.last
            and len(rec.dests) == rec.required
        ):  # the whole data is here: it is written now, and its chunk acknowledges
            rec.dests[message.rank].ack = path
        else:
            self._send(
                peer,
                BootstrapAck(room=room, session=message.session, rank=message.rank, transport=path),
            )
        if rec.state.is_final:  # the acknowledgement could not be sent: the room failed
            return
        if len(rec.dests) == rec.required and self._step(
            room, rec, "bootstrapped", rec.state.bootstrapped
        ):
            self._advance(room, rec)

    @staticmethod
    def _rank_refusal(rec: _SenderRoom, message: Bootstrap) -> str | None:
        """Why the room cannot take this bootstrap's rank now (None: it can)."""
        if message.rank >= rec.required:
            return (
                f"rank {message.rank} is outside the room's {rec.required} destinations: "
                "a sender feeding N tensor-parallel receivers opens the room with "
                "add(room, required_destinations=N)"
            )
        if message.rank in rec.dests:
            return (
                f"rank {message.rank} has already bootstrapped (from "
                f"{rec.dests[message.rank].peer}): each tensor-parallel receiver opens the "
                "room with its own rank= (0 .. required_destinations-1)"
            )
        if not rec.state.can(Event.BOOTSTRAPPED):
            return f"the room is {rec.state.status.name}, not Bootstrapping"
        return None

    def _reject(
        self, peer: str, message: Bootstrap | Resume, why: str, *, unknown_pool: bool = False
    ) -> None:
        self._stats["rejected"] += 1
        self._send(
            peer,
            Reject(
                room=message.room,
                session=message.session,
                rank=message.rank,
                reason=peer_reason(why),
                unknown_pool=unknown_pool,
            ),
        )

    def _resume(self, peer: str, message: Resume) -> None:
        rec = self._rooms.get(message.room)
        dest = rec.dests.get(message.rank) if rec is not None else None
        if rec is None or dest is None or dest.peer != peer or dest.session != message.session:
            self._drop(peer, message, "no such room or destination")
            return
        if rec.state.is_final:
            self._drop(peer, message, f"the room is {rec.state.status.name}")
            return
        if message.sent_tokens == dest.resumed_at:
            self._stats["late"] += 1  # a duplicate resume: harmless, never a second chunk
            return
        delivered = rec.state.sent_tokens
        memory = self._memory(peer, message, dest.pool)
        if (
            message.sent_tokens != delivered
            or dest.capacity > delivered
            or rec.in_flight
            or not rec.state.can(Event.RESUMED)
            or isinstance(memory, str)
        ):
            why = f": {memory}" if isinstance(memory, str) else ""
            self._fail(
                message.room,
                rec,
                f"protocol violation: rank {message.rank} resumed with sent_tokens="
                f"{message.sent_tokens} in {rec.state.status.name} after "
                f"{delivered} tokens were delivered{why}",
            )
            return
        dest.resumed_at = message.sent_tokens
        dest.pool, dest.tokens, dest.base = memory[0], memory[1], delivered
        if all(d.capacity > delivered for d in rec.dests.values()) and self._step(
            message.room, rec, "resumed", lambda: rec.state.resumed(sent_tokens=delivered)
        ):
            self._advance(message.room, rec)

    # -- data ----------------------------------------------------------------------------
    def _layout_error(self, data: _Source, rank: int, dest: _Dest) -> str | None:
        pool = data.entry.pool
        if len(dest.pool.buffers) != len(pool.layouts):
            return (
                f"rank {rank} offers {len(dest.pool.buffers)} buffers per page; "
                f"the data has {len(pool.layouts)}"
            )
        for i, (theirs, ours) in enumerate(zip(dest.pool.buffers, pool.layouts, strict=True)):
            if (theirs.row_bytes, theirs.dtype, tuple(theirs.row_shape)) != (
                ours.row_bytes,
                ours.dtype,
                ours.row_shape,
            ):
                which = f" in buffer {i}" if len(pool.layouts) > 1 else ""
                return (
                    f"rank {rank} expects rows of {list(theirs.row_shape)} {theirs.dtype} "
                    f"({theirs.row_bytes} bytes){which}; the data has {list(ours.row_shape)} "
                    f"{ours.dtype}"
                )
        if data.aux_index is not None and dest.aux_index is not None:
            theirs_aux = [(b.row_bytes, b.dtype) for b in dest.pool.aux]
            ours_aux = [(a.row_bytes, a.dtype) for a in pool.aux_layouts]
            if theirs_aux != ours_aux:
                return f"rank {rank}'s aux rows {theirs_aux} differ from the data's {ours_aux}"
        return None

    def _advance(self, room: int, rec: _SenderRoom) -> None:
        """Move the room on: write what every destination has memory for, or step.

        Bytes move as soon as data and memory are there. A chunk is *stepped*
        (the table's chunk_sent, and a ``chunk`` message) only when the data is
        complete and all written (the last chunk), or when data waits that some
        destination has no memory for (it must resume). So a chunk is never of
        zero tokens, even when the last send() brings no new pages.
        """
        data = rec.data
        if data is None or rec.in_flight or len(rec.dests) < rec.required:
            return
        if not rec.state.can(Event.CHUNK_SENT):
            return
        available, written = len(data.tokens), rec.written
        end = min([available] + [d.capacity for d in rec.dests.values()])
        need_aux = (
            data.aux_index is not None
            and not rec.aux_done
            and any(d.aux_index is not None for d in rec.dests.values())
        )
        if end > written:
            last = data.last and end == available
            aux = need_aux and (rec.aux_with == "first" or last)
            self._write(room, rec, written, end, aux, last)
            return
        last = data.last and written == available
        if last and need_aux:
            self._write(room, rec, written, written, True, False)  # the aux row alone
            return
        if written > rec.state.sent_tokens and (last or available > written):
            self._chunk_done(room, rec, last)

    def _write(
        self, room: int, rec: _SenderRoom, start: int, end: int, aux: bool, last: bool
    ) -> None:
        """Write tokens ``start..end`` (and the aux row) to every destination.

        ``last``: this write completes the room's data, so the chunk message that
        follows its confirmation is known now; where the transport takes notices
        it travels with the data (each destination has it once its bytes are
        there, without waiting for the confirmation to come back here).
        """
        data = rec.data
        assert data is not None
        for rank, dest in sorted(rec.dests.items()):
            why = self._layout_error(data, rank, dest)
            if why is not None:
                self._fail(room, rec, why)
                return
        entry = data.entry
        src_runs = data.tokens.slice(start, end)
        rec.planned, rec.planned_aux = end, aux
        if entry.staging is not None:  # device memory the transport cannot reach
            rec.staged = True
            try:
                entry.stage_out(src_runs, data.aux_index if aux else None)
            except RuntimeError as exc:
                self._fail(room, rec, f"cannot stage the data through host memory: {exc}")
                return
        for rank, dest in sorted(rec.dests.items()):
            runs: list[tuple[int, int, int]] = []
            if end > start:
                runs = pair_runs(src_runs, dest.tokens.slice(start - dest.base, end - dest.base))
            aux_rows = None
            if aux and dest.aux_index is not None and data.aux_index is not None:
                aux_rows = (data.aux_index, dest.aux_index)
            spans = _spans(entry, dest.pool, runs, aux_rows)
            if spans is None:
                continue
            notice = None
            if last and self._transport.capabilities.notices:
                notice = self._chunk(room, rec, rank, dest, rec.state.sent_tokens, end, True)
            try:
                if notice is None:
                    write_id = self._transport.write_batch(spans)
                else:
                    write_id = self._transport.write_batch(spans, notice)
                    dest.noticed = True
                    self._stats["messages_out"] += 1
            except TransportError as exc:
                self._fail(room, rec, f"cannot write to rank {rank}: {exc}")
                return
            except Exception as exc:  # a transport's bug must fail this room, not leave it stuck
                self._stats["internal_errors"] += 1
                log.exception("%s: writing room %s to rank %s failed", self.side, room, rank)
                self._fail(room, rec, f"cannot write to rank {rank}: internal error: {exc!r}")
                return
            rec.bytes_moved += (
                spans.total if isinstance(spans, SpanBatch) else sum(span.nbytes for span in spans)
            )
            self._writes[write_id] = (room, rank)
            rec.in_flight.add(write_id)
        if not rec.in_flight:  # nothing to move for anyone (no destination takes the aux row)
            self._confirmed(room, rec)

    def _on_write_done(self, room: int, rank: int, done: WriteDone) -> None:
        rec = self._rooms.get(room)
        if rec is None or done.write_id not in rec.in_flight:
            return
        rec.in_flight.discard(done.write_id)
        if rec.state.is_final:
            return
        if not done.ok:
            self._fail(room, rec, f"the write to rank {rank} failed: {done.error}")
            return
        if not rec.in_flight:  # every destination confirmed this batch
            self._confirmed(room, rec)

    def _confirmed(self, room: int, rec: _SenderRoom) -> None:
        rec.written = rec.planned
        rec.aux_done = rec.aux_done or rec.planned_aux
        self._advance(room, rec)

    def _chunk_done(self, room: int, rec: _SenderRoom, last: bool) -> None:
        """Every destination has tokens up to ``written``: step, then tell them all
        (the sender steps first, so no receiver can resume before it is Transferring)."""
        data = rec.data
        assert data is not None
        start, end = rec.state.sent_tokens, rec.written
        if not self._step(
            room, rec, "chunk_sent", lambda: rec.state.chunk_sent(sent_tokens=end, is_last=last)
        ):
            return
        for dest_rank, dest in sorted(rec.dests.items()):
            if dest.whole and not last:  # its memory took its chunk: it resumes with more
                dest.base, dest.tokens = end, PageList()
            if not dest.noticed:  # else it went with the data (_write)
                chunk = self._chunk(room, rec, dest_rank, dest, start, end, last)
                self._send_payload(dest.peer, chunk, room, "chunk")
            dest.ack, dest.noticed = None, False

    def _chunk(
        self, room: int, rec: _SenderRoom, rank: int, dest: _Dest, start: int, end: int, last: bool
    ) -> bytes:
        """The chunk message telling ``dest`` that tokens ``start..end`` are there, encoded."""
        data = rec.data
        assert data is not None
        return chunk_payload(
            room=room,
            session=dest.session,
            rank=rank,
            sent_tokens=end,
            chunk_tokens=end - start,
            is_last=last,
            total_tokens=data.total,
            aux=data.aux_bytes if start == 0 else None,
            transport=dest.ack,
        )

    # -- hooks ---------------------------------------------------------------------------
    def _on_tick(self, now: float) -> None:
        limit = self._deadlines.timeouts.get(TransferStatus.Bootstrapping)
        if limit is not None and len(self._early):
            for peer, message in self._early.expire(now, limit):  # each by its own age
                self._reject(
                    peer,
                    message,
                    f"no room {message.room} was added at the sender within {limit:g} s",
                )

    def _finished(self, room: int, rec: _SenderRoom) -> None:
        data = rec.data
        if data is not None and data.owned and not rec.in_flight:
            self._pools.pop(data.entry.pool.id, None)
            data.entry.release(self._transport)

    def _released(self, room: int, rec: _SenderRoom) -> None:
        data = rec.data
        if data is not None and data.owned and data.entry.regions:
            self._pools.pop(data.entry.pool.id, None)
            data.entry.release(self._transport)

    def _uses_pool(self, rec: _SenderRoom, pool: PagedPool) -> bool:
        return rec.data is not None and rec.data.entry.pool is pool

    def _abort_messages(self, room: int, rec: _SenderRoom, reason: str) -> list[tuple[str, Abort]]:
        return [
            (d.peer, Abort(room=room, session=d.session, rank=rank, reason=peer_reason(reason)))
            for rank, d in sorted(rec.dests.items())
        ]

    def _session_ok(self, rec: _SenderRoom, peer: str, message: Abort) -> bool:
        dest = rec.dests.get(message.rank)
        return dest is not None and dest.peer == peer and dest.session == message.session
