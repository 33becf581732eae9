"""The receiver side (language model, decode worker): offers buffers, mirrors
the status of its room, and hands the application views of what arrived."""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvpoll.errors import DuplicateRoom, IllegalTransition, InvalidArgument
from kvpoll.protocol.endpoint import Endpoint, RoomBase, TransferIncomplete
from kvpoll.protocol.messages import (
    Abort,
    AbortAck,
    Bootstrap,
    BootstrapAck,
    Chunk,
    Message,
    Reject,
    Resume,
    encode,
)
from kvpoll.protocol.sender import dtype_name
from kvpoll.statemachine.status import Event, TransferStatus
from kvpoll.transports.base import Region, TransportError
from kvpoll.transports.shm import boot_id

__all__ = ["Received", "Receiver"]


@dataclass(frozen=True)
class Received:
    """What a room delivered.

    Attributes:
        room: the room.
        chunks: the data, chunk by chunk, as views of the receive buffers
            (no copy); valid until the room is removed.
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


class _ReceiverRoom(RoomBase):
    __slots__ = (
        "allocated_tokens",
        "auto_resume",
        "aux",
        "chunks",
        "dtype",
        "rank",
        "region",
        "regions",
        "row_bytes",
        "row_shape",
        "sender",
        "session",
        "total",
    )

    def __init__(self, room: int, history: bool) -> None:
        super().__init__(room, history)
        self.sender = ""
        self.session = secrets.randbits(62)
        self.rank = 0
        self.row_shape: tuple[int, ...] = ()
        self.dtype = torch.uint8
        self.row_bytes = 1
        self.allocated_tokens = 1
        self.auto_resume = True
        self.region: Region | None = None
        self.regions: list[Region] = []
        self.chunks: list[torch.Tensor] = []
        self.total: int | None = None
        self.aux = b""

    @property
    def total_tokens(self) -> int | None:
        return self.total


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


class Receiver(Endpoint[_ReceiverRoom]):
    """The side that receives (a language-model or decode worker).

    :meth:`open` allocates a buffer of ``allocated_tokens`` rows (or takes the
    application's) and bootstraps toward a sender. The room mirrors the
    sender's steps: WaitingForInput once the sender has the buffer,
    Transferring after a chunk that is not the last, Success after the last.
    After each partial chunk the receiver resumes with a new buffer (from the
    pool, or the application's with ``auto_resume=False`` and :meth:`resume`).
    """

    side = "receiver"

    # -- public ------------------------------------------------------------------
    def open(
        self,
        room: int,
        sender: str,
        *,
        row_shape: Sequence[int],
        dtype: torch.dtype,
        allocated_tokens: int = 1024,
        rank: int = 0,
        buffer: torch.Tensor | None = None,
        auto_resume: bool = True,
    ) -> None:
        """Open a room toward ``sender`` (its address) and bootstrap.

        Args:
            room: the room id (the sender must use the same).
            sender: the sender's address.
            row_shape: the shape of one token's row (``[hidden]`` for embeddings).
            dtype: the data's dtype.
            allocated_tokens: rows in each receive buffer.
            rank: this receiver's destination index at the sender (tensor-parallel rank).
            buffer: the first receive buffer, ``[allocated_tokens, *row_shape]``
                (default: one from the transport's pool).
            auto_resume: after a partial chunk, resume with a pooled buffer at
                once; with False the room waits in Transferring for :meth:`resume`.

        Raises:
            DuplicateRoom: the room is open here already.
            InvalidArgument: a bad argument.
        """
        shape = tuple(int(d) for d in row_shape)
        if isinstance(room, bool) or not isinstance(room, int):
            raise InvalidArgument(f"room must be an int, not {type(room).__name__}")
        if not isinstance(sender, str) or not sender:
            raise InvalidArgument(f"room {room}: sender must be an address string")
        if any(d < 1 for d in shape) or not isinstance(dtype, torch.dtype):
            raise InvalidArgument(
                f"room {room}: row_shape needs positive sizes and dtype a torch.dtype"
            )
        if (
            isinstance(allocated_tokens, bool)
            or not isinstance(allocated_tokens, int)
            or allocated_tokens < 1
            or isinstance(rank, bool)
            or not isinstance(rank, int)
            or rank < 0
        ):
            raise InvalidArgument(f"room {room}: allocated_tokens must be >= 1 and rank >= 0")
        _check_buffer(buffer, shape, dtype, room)
        self._call(
            lambda: self._open(
                room, sender, shape, dtype, allocated_tokens, rank, buffer, auto_resume
            )
        )

    def resume(self, room: int, *, buffer: torch.Tensor | None = None) -> None:
        """Offer a new buffer after a partial chunk (for ``auto_resume=False``).

        Raises:
            UnknownRoom: the room is not open here.
            IllegalTransition: the room is not Transferring, or has resumed already.
            InvalidArgument: the buffer has the wrong shape or dtype.
        """
        self._call(lambda: self._resume_command(room, buffer))

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
    ) -> None:
        if room in self._rooms:
            raise DuplicateRoom(room)
        rec = _ReceiverRoom(room, self._history)
        rec.sender, rec.rank, rec.row_shape, rec.dtype = sender, rank, shape, dtype
        rec.row_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        rec.allocated_tokens = allocated
        rec.auto_resume = auto_resume
        region = self._buffer(rec, buffer)
        bootstrap = Bootstrap(
            room=room,
            session=rec.session,
            rank=rank,
            region=region.descriptor,
            allocated_tokens=region.nbytes // rec.row_bytes,
            row_bytes=rec.row_bytes,
            dtype=dtype_name(dtype),
            row_shape=list(shape),
            transports=self._transport.paths(),
            host=boot_id(),
        )
        try:  # an address this transport cannot use is the caller's error, not a hang
            self._transport.send(sender, encode(bootstrap))
        except TransportError as exc:
            self._transport.release(region)
            raise InvalidArgument(
                f"room {room}: cannot reach the sender at {sender!r}: {exc}"
            ) from exc
        self._stats["messages_out"] += 1
        self._register(room, rec)
        self._watch(room, rec, sender)

    def _buffer(self, rec: _ReceiverRoom, buffer: torch.Tensor | None) -> Region:
        try:
            if buffer is None:
                region = self._transport.allocate(rec.allocated_tokens * rec.row_bytes)
            else:
                region = self._transport.register(buffer)
        except TransportError as exc:
            raise InvalidArgument(f"room {rec.state.room}: {exc}") from exc
        rec.region = region
        rec.regions.append(region)
        return region

    def _resume_command(self, room: int, buffer: torch.Tensor | None) -> None:
        rec = self._room(room)
        if not rec.state.can(Event.RESUMED) or rec.region is not None:
            raise IllegalTransition(
                room,
                rec.state.status,
                "resumed",
                "a resume needs a room in Transferring that has taken its last chunk",
            )
        _check_buffer(buffer, rec.row_shape, rec.dtype, room)
        self._resume(room, rec, buffer)

    def _resume(self, room: int, rec: _ReceiverRoom, buffer: torch.Tensor | None) -> None:
        try:
            region = self._buffer(rec, buffer)
        except InvalidArgument as exc:
            self._fail(room, rec, str(exc))
            return
        delivered = rec.state.sent_tokens
        if self._step(room, rec, "resumed", lambda: rec.state.resumed(sent_tokens=delivered)):
            self._send(
                rec.sender,
                Resume(
                    room=room,
                    session=rec.session,
                    rank=rec.rank,
                    sent_tokens=delivered,
                    region=region.descriptor,
                    allocated_tokens=region.nbytes // rec.row_bytes,
                ),
            )

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
            self._fail(room, rec, f"the sender refused: {message.reason}", tell=False)
        elif isinstance(message, Chunk):
            self._chunk(room, rec, message)
        else:
            self._drop(peer, message, f"a receiver does not take {message.type}")

    def _chunk(self, room: int, rec: _ReceiverRoom, message: Chunk) -> None:
        region = rec.region
        capacity = region.nbytes // rec.row_bytes if region is not None else 0
        before = rec.state.sent_tokens
        why = None
        if rec.state.is_final:
            self._drop(rec.sender, message, f"the room is {rec.state.status.name}")
            return
        if region is None:
            why = "a chunk arrived before the receiver resumed"
        elif not 1 <= message.chunk_tokens <= capacity:
            why = f"a chunk of {message.chunk_tokens} tokens for a buffer of {capacity}"
        elif message.sent_tokens != before + message.chunk_tokens:
            why = (
                f"sent_tokens={message.sent_tokens} does not follow {before} delivered plus "
                f"{message.chunk_tokens}"
            )
        elif rec.total is not None and message.total_tokens != rec.total:
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
        assert region is not None
        if rec.total is None:
            rec.total = message.total_tokens
            rec.aux = message.aux or b""
        rows = message.chunk_tokens
        view = region.data[: rows * rec.row_bytes].view(rec.dtype).view(rows, *rec.row_shape)
        rec.chunks.append(view)
        rec.region = None
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
        ):
            self._resume(room, rec, None)

    # -- hooks ----------------------------------------------------------------------------
    def _finished(self, room: int, rec: _ReceiverRoom) -> None:
        if rec.state.status is TransferStatus.Failed:
            for region in rec.regions:  # a sender may still write: never hand these on
                self._transport.release(region, reuse=False)
            rec.regions.clear()
            rec.region = None

    def _released(self, room: int, rec: _ReceiverRoom) -> None:
        for region in rec.regions:
            self._transport.release(region, reuse=True)
        rec.regions.clear()
        rec.chunks.clear()

    def _abort_messages(
        self, room: int, rec: _ReceiverRoom, reason: str
    ) -> list[tuple[str, Abort]]:
        return [(rec.sender, Abort(room=room, session=rec.session, rank=rec.rank, reason=reason))]

    def _session_ok(self, rec: _ReceiverRoom, peer: str, message: Abort) -> bool:
        return peer == rec.sender and message.session == rec.session and message.rank == rec.rank
