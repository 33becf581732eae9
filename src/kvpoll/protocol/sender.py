"""The sender side (encoder, prefill worker): holds the data, writes it into
the buffers its receivers offer, chunk by chunk."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from kvpoll.errors import DuplicateRoom, IllegalTransition, InvalidArgument
from kvpoll.protocol.endpoint import Endpoint, RoomBase
from kvpoll.protocol.messages import (
    MAX_AUX_BYTES,
    Abort,
    AbortAck,
    Bootstrap,
    BootstrapAck,
    Chunk,
    Message,
    Reject,
    Resume,
)
from kvpoll.protocol.negotiation import choose_path, mismatch
from kvpoll.statemachine.status import Event, TransferStatus
from kvpoll.transports.base import Region, RegionDescriptor, TransportError, WriteDone
from kvpoll.transports.shm import boot_id

__all__ = ["Sender"]

_PENDING_ROOMS = 10_000


@dataclass
class _Dest:
    peer: str
    session: int
    region: RegionDescriptor
    allocated_tokens: int
    row_bytes: int
    dtype: str
    row_shape: tuple[int, ...]
    ready: bool = True  # holds an empty buffer for the next chunk
    resumed_at: int = -1  # sent_tokens of its last accepted resume (duplicates repeat it)


@dataclass
class _Data:
    region: Region
    total_tokens: int
    row_bytes: int
    dtype: str
    row_shape: tuple[int, ...]
    aux: bytes


class _SenderRoom(RoomBase):
    __slots__ = ("chunk_end", "chunk_last", "data", "dests", "in_flight", "required")

    def __init__(self, room: int, required: int, history: bool) -> None:
        super().__init__(room, history)
        self.required = required
        self.dests: dict[int, _Dest] = {}
        self.data: _Data | None = None
        self.in_flight: set[int] = set()
        self.chunk_end = 0
        self.chunk_last = False

    @property
    def total_tokens(self) -> int | None:
        return self.data.total_tokens if self.data is not None else None


@dataclass
class _Pending:
    at: float
    bootstraps: list[tuple[str, Bootstrap]] = field(default_factory=list)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


class Sender(Endpoint[_SenderRoom]):
    """The side that holds the data (an encoder or prefill worker).

    Receivers open rooms toward :attr:`address`. A room stays Bootstrapping
    until all its ``required_destinations`` have bootstrapped, then
    WaitingForInput. :meth:`send` writes ``min(remaining, allocated)`` tokens
    to every destination; when all confirmed the chunk, the room is
    Transferring, or Success after the last chunk. Each resume from every
    destination releases the next chunk. See :class:`Endpoint` for the
    options shared with :class:`~kvpoll.Receiver`.
    """

    side = "sender"

    def _setup(self) -> None:
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._host = boot_id()

    # -- public ------------------------------------------------------------------
    def add(self, room: int, *, required_destinations: int = 1) -> None:
        """Open a room; receivers may bootstrap before or after this call.

        Raises:
            DuplicateRoom: the room is open here already.
            InvalidArgument: a non-int room, or fewer than one destination.
        """
        if isinstance(room, bool) or not isinstance(room, int):
            raise InvalidArgument(f"room must be an int, not {type(room).__name__}")
        if (
            isinstance(required_destinations, bool)
            or not isinstance(required_destinations, int)
            or required_destinations < 1
        ):
            raise InvalidArgument(f"room {room}: required_destinations must be an int >= 1")
        self._call(lambda: self._add(room, required_destinations))

    def send(self, room: int, tensor: torch.Tensor, *, aux: bytes = b"") -> None:
        """Hand the room its data: a tensor of shape ``[tokens, *row_shape]``.

        The tensor must stay unchanged until the room is final (it is written
        from, not copied). If the room is still Bootstrapping, the data waits
        for the destinations.

        Raises:
            UnknownRoom: the room is not open here.
            IllegalTransition: the room already has data, or is final.
            InvalidArgument: not a contiguous CPU tensor with at least one token,
                or ``aux`` too large.
        """
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 1 or tensor.shape[0] < 1:
            raise InvalidArgument(
                f"room {room}: send() needs a tensor with at least one token (shape [tokens, ...])"
            )
        if not tensor.is_contiguous():
            raise InvalidArgument(f"room {room}: the tensor must be contiguous")
        if not isinstance(aux, bytes | bytearray) or len(aux) > MAX_AUX_BYTES:
            raise InvalidArgument(f"room {room}: aux must be bytes of at most {MAX_AUX_BYTES}")
        self._call(lambda: self._set_data(room, tensor, bytes(aux)))

    # -- commands (I/O thread) ------------------------------------------------------
    def _add(self, room: int, required: int) -> None:
        if room in self._rooms:
            raise DuplicateRoom(room)
        rec = _SenderRoom(room, required, self._history)
        self._register(room, rec)
        pending = self._pending.pop(room, None)
        for peer, message in pending.bootstraps if pending else ():
            self._bootstrap(peer, message)

    def _set_data(self, room: int, tensor: torch.Tensor, aux: bytes) -> None:
        rec = self._room(room)
        if rec.data is not None or rec.state.is_final:
            raise IllegalTransition(
                room,
                rec.state.status,
                "send",
                "the room already has its data"
                if rec.data is not None
                else f"{rec.state.status.name} is final",
            )
        try:
            region = self._transport.register(tensor)
        except TransportError as exc:
            raise InvalidArgument(f"room {room}: {exc}") from exc
        rows = tensor.shape[0]
        rec.data = _Data(
            region,
            rows,
            region.nbytes // rows,
            dtype_name(tensor.dtype),
            tuple(tensor.shape[1:]),
            aux,
        )
        if rec.state.can(Event.CHUNK_SENT):  # bootstrapped: the data can go now
            self._next_chunk(room, rec)

    # -- messages ----------------------------------------------------------------------
    def _on_message(self, peer: str, message: Message) -> None:
        if isinstance(message, Bootstrap):
            self._bootstrap(peer, message)
        elif isinstance(message, Resume):
            self._resume(peer, message)
        elif isinstance(message, Abort):
            self._on_abort(peer, message)
        elif isinstance(message, AbortAck):
            self._stats["abort_acks"] += 1
        else:
            self._drop(peer, message, f"a sender does not take {message.type}")

    def _bootstrap(self, peer: str, message: Bootstrap) -> None:
        room = message.room
        rec = self._rooms.get(room)
        spoken = self._transport.paths()
        same_host = message.host == self._host if message.host else None
        path = choose_path(message.transports, spoken, same_host=same_host)
        if path is None:
            reason = mismatch(message.transports, spoken, same_host=same_host)
            self._reject(peer, message, reason)
            if rec is not None:
                self._fail(room, rec, f"rank {message.rank} at {peer}: {reason}")
            return
        if rec is None:
            if room in self._tombstones:
                self._drop(peer, message, "late")
                return
            pending = self._pending.get(room)
            if pending is None:
                if len(self._pending) >= _PENDING_ROOMS:
                    self._reject(peer, message, "too many bootstraps for unknown rooms")
                    return
                pending = self._pending[room] = _Pending(time.monotonic())
            pending.bootstraps.append((peer, message))
            return
        why = None
        if message.rank >= rec.required:
            why = f"rank {message.rank} is outside the room's {rec.required} destinations"
        elif message.rank in rec.dests:
            why = f"rank {message.rank} has already bootstrapped (a duplicate room?)"
        elif not rec.state.can(Event.BOOTSTRAPPED):
            why = f"the room is {rec.state.status.name}, not Bootstrapping"
        if why is not None:
            self._reject(peer, message, why)
            return
        rec.dests[message.rank] = _Dest(
            peer,
            message.session,
            message.region,
            message.allocated_tokens,
            message.row_bytes,
            message.dtype,
            tuple(message.row_shape),
        )
        self._watch(room, rec, peer)
        rec.paths.add(path)
        self._send(
            peer,
            BootstrapAck(room=room, session=message.session, rank=message.rank, transport=path),
        )
        if (
            len(rec.dests) == rec.required
            and self._step(room, rec, "bootstrapped", rec.state.bootstrapped)
            and rec.data is not None
        ):
            self._next_chunk(room, rec)

    def _reject(self, peer: str, message: Bootstrap | Resume, why: str) -> None:
        self._stats["rejected"] += 1
        self._send(
            peer, Reject(room=message.room, session=message.session, rank=message.rank, reason=why)
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
        if (
            message.sent_tokens != rec.state.sent_tokens
            or dest.ready
            or rec.in_flight
            or not rec.state.can(Event.RESUMED)
        ):
            self._fail(
                message.room,
                rec,
                f"protocol violation: rank {message.rank} resumed with sent_tokens="
                f"{message.sent_tokens} in {rec.state.status.name} after "
                f"{rec.state.sent_tokens} tokens were delivered",
            )
            return
        dest.resumed_at = message.sent_tokens
        dest.region, dest.allocated_tokens, dest.ready = (
            message.region,
            message.allocated_tokens,
            True,
        )
        if all(d.ready for d in rec.dests.values()) and self._step(
            message.room, rec, "resumed", lambda: rec.state.resumed(sent_tokens=message.sent_tokens)
        ):
            self._next_chunk(message.room, rec)

    # -- data ----------------------------------------------------------------------------
    def _next_chunk(self, room: int, rec: _SenderRoom) -> None:
        data = rec.data
        assert data is not None
        for rank, dest in sorted(rec.dests.items()):
            if (dest.row_bytes, dest.dtype, dest.row_shape) != (
                data.row_bytes,
                data.dtype,
                data.row_shape,
            ):
                self._fail(
                    room,
                    rec,
                    f"rank {rank} expects rows of {list(dest.row_shape)} "
                    f"{dest.dtype} ({dest.row_bytes} bytes); the data has "
                    f"{list(data.row_shape)} {data.dtype}",
                )
                return
        start = rec.state.sent_tokens
        count = min([data.total_tokens - start] + [d.allocated_tokens for d in rec.dests.values()])
        rec.chunk_end = start + count
        rec.chunk_last = rec.chunk_end == data.total_tokens
        for rank, dest in sorted(rec.dests.items()):
            dest.ready = False
            try:
                write_id = self._transport.write(
                    data.region, start * data.row_bytes, dest.region, 0, count * data.row_bytes
                )
            except TransportError as exc:
                self._fail(room, rec, f"cannot write to rank {rank}: {exc}")
                return
            self._writes[write_id] = (room, rank)
            rec.in_flight.add(write_id)

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
        if rec.in_flight:
            return  # other destinations have not confirmed this chunk yet
        # Every destination has the chunk: the sender steps first, then tells them all,
        # so no receiver can resume before the sender is Transferring.
        data = rec.data
        assert data is not None
        start, end, last = rec.state.sent_tokens, rec.chunk_end, rec.chunk_last
        if not self._step(
            room, rec, "chunk_sent", lambda: rec.state.chunk_sent(sent_tokens=end, is_last=last)
        ):
            return
        for dest_rank, dest in sorted(rec.dests.items()):
            self._send(
                dest.peer,
                Chunk(
                    room=room,
                    session=dest.session,
                    rank=dest_rank,
                    sent_tokens=end,
                    chunk_tokens=end - start,
                    is_last=last,
                    total_tokens=data.total_tokens,
                    aux=data.aux if start == 0 else None,
                ),
            )

    # -- hooks ---------------------------------------------------------------------------
    def _on_tick(self, now: float) -> None:
        limit = self._deadlines.timeouts.get(TransferStatus.Bootstrapping)
        while self._pending and limit is not None:
            room, pending = next(iter(self._pending.items()))
            if now - pending.at < limit:
                break
            del self._pending[room]
            for peer, message in pending.bootstraps:
                self._reject(
                    peer, message, f"no room {room} was added at the sender within {limit:g} s"
                )

    def _finished(self, room: int, rec: _SenderRoom) -> None:
        if rec.data is not None:
            self._transport.release(rec.data.region)

    def _abort_messages(self, room: int, rec: _SenderRoom, reason: str) -> list[tuple[str, Abort]]:
        return [
            (d.peer, Abort(room=room, session=d.session, rank=rank, reason=reason))
            for rank, d in sorted(rec.dests.items())
        ]

    def _session_ok(self, rec: _SenderRoom, peer: str, message: Abort) -> bool:
        dest = rec.dests.get(message.rank)
        return dest is not None and dest.peer == peer and dest.session == message.session
