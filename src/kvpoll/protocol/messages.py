"""The wire messages between a sender and its receivers (version 1).

Every message is a JSON object with ``v`` (the protocol version) and ``type``.
Room messages carry the room id and the receiver's ``session``: a random number
chosen each time a receiver opens a room, so a late message from an earlier
use of the same room id can never touch the new one.

A receiver offers memory in one of two forms: a pool it announced once to
that sender (``pool``: its buffers' descriptors and layout) and, per room,
page indices of it as runs ``[[first, count], ...]``; or one contiguous region
inline in the bootstrap or resume (a buffer the application handed over).

Receiver -> sender: ``pool``, ``bootstrap``, ``resume``, ``abort``, ``abort_ack``.
Sender -> receiver: ``bootstrap_ack``, ``reject``, ``chunk``, ``abort``,
``abort_ack``. Either way: ``heartbeat``, ``heartbeat_ack``.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from kvpoll.errors import InvalidArgument
from kvpoll.transports.base import RegionDescriptor

__all__ = [
    "MAX_AUX_BYTES",
    "MAX_RUNS",
    "MAX_TOKEN_CHARS",
    "PROTOCOL_VERSION",
    "Abort",
    "AbortAck",
    "Bootstrap",
    "BootstrapAck",
    "Chunk",
    "Heartbeat",
    "HeartbeatAck",
    "Message",
    "MessageError",
    "PoolBuffer",
    "PoolOffer",
    "Reject",
    "Resume",
    "check_token",
    "decode",
    "encode",
    "peer_reason",
]

PROTOCOL_VERSION = 1
MAX_AUX_BYTES = 1 << 20
MAX_TOKEN_CHARS = 256
MAX_REASON_CHARS = 1000

RoomId = Annotated[int, Field(ge=-(2**63), lt=2**63)]
Count = Annotated[int, Field(ge=0, lt=2**62)]
Positive = Annotated[int, Field(ge=1, lt=2**40)]
MAX_RUNS = 1 << 16
Runs = Annotated[
    list[tuple[Annotated[int, Field(ge=0, lt=2**40)], Positive]], Field(max_length=MAX_RUNS)
]
"""Page indices as ``[first, count]`` runs."""


class _Wire(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64"
    )
    v: Literal[1] = 1


class _RoomMessage(_Wire):
    room: RoomId
    session: Count
    rank: Count = 0


class PoolBuffer(BaseModel):
    """One buffer of an offered pool: where it is and what a token (or aux row) holds."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    region: RegionDescriptor
    row_bytes: Positive
    dtype: str = Field(max_length=32)
    row_shape: list[Count] = Field(max_length=8)


class PoolOffer(_Wire):
    """A receiver registers a pool with a sender, once, before naming its pages."""

    type: Literal["pool"] = "pool"
    pool: Count
    page_size: Positive
    num_pages: Positive
    buffers: list[PoolBuffer] = Field(min_length=1, max_length=1024)
    aux: list[PoolBuffer] = Field(default_factory=list, max_length=64)
    aux_rows: Count = 0


class Bootstrap(_RoomMessage):
    """A receiver says where to write: pages of an offered pool, or one region inline.

    Inline form: ``region``, ``allocated_tokens``, ``row_bytes``, ``dtype``,
    ``row_shape``. Pool form: ``pool`` and ``pages`` (and ``aux_index``, the
    row of the pool's aux buffers this room's aux data goes to).
    """

    type: Literal["bootstrap"] = "bootstrap"
    region: RegionDescriptor | None = None
    allocated_tokens: Positive | None = None
    row_bytes: Positive | None = None
    dtype: str | None = Field(default=None, max_length=32)
    row_shape: list[Count] | None = Field(default=None, max_length=8)
    pool: Count | None = None
    pages: Runs | None = None
    aux_index: Count | None = None
    whole: bool = False
    """Each memory offered takes one chunk: after a chunk that is not the last,
    the receiver resumes with new memory (buffer rooms; an inline region always)."""
    transports: list[str] = Field(default_factory=list, max_length=16)
    """The data paths the receiver speaks (see :mod:`kvpoll.protocol.negotiation`)."""
    host: str = Field(default="", max_length=128)
    """An id of the receiver's host (its kernel's boot id)."""
    token: str | None = Field(default=None, max_length=MAX_TOKEN_CHARS)
    """The room's token, when the application gave one to both sides: a sender
    whose room has a token takes only bootstraps that carry it."""
    ack_with_chunk: bool = False
    """The receiver takes the acknowledgement inside the first chunk (its
    ``transport`` set) when the sender has the room's whole data and writes at
    once: one message less each way. Otherwise ``bootstrap_ack`` comes first."""

    @model_validator(mode="after")
    def _one_form(self) -> Bootstrap:
        inline = (self.region, self.allocated_tokens, self.row_bytes, self.dtype, self.row_shape)
        if self.pool is not None and self.pages:
            if any(v is not None for v in inline):
                raise ValueError("a bootstrap names pool pages or a region, not both")
        elif any(v is None for v in inline) or self.pool is not None or self.pages is not None:
            raise ValueError(
                "a bootstrap needs pool and pages, or region, allocated_tokens, "
                "row_bytes, dtype and row_shape"
            )
        return self


class BootstrapAck(_RoomMessage):
    """The sender has the receiver's destination."""

    type: Literal["bootstrap_ack"] = "bootstrap_ack"
    transport: str = Field(default="", max_length=64)
    """The data path the sender chose."""


class Reject(_RoomMessage):
    """The sender refused a bootstrap or a resume; the receiver's room fails."""

    type: Literal["reject"] = "reject"
    reason: str = Field(max_length=MAX_REASON_CHARS)
    unknown_pool: bool = False
    """The bootstrap named a pool the sender does not know (it restarted, say):
    the receiver offers its pools again before its next bootstrap."""


class Chunk(_RoomMessage):
    """A chunk is in the receiver's memory (``total_tokens``: None while the
    sender does not know it yet, as when its data still arrives in pieces)."""

    type: Literal["chunk"] = "chunk"
    sent_tokens: Count
    chunk_tokens: Count
    is_last: bool
    total_tokens: Count | None
    aux: bytes | None = Field(default=None, max_length=MAX_AUX_BYTES)
    transport: str | None = Field(default=None, max_length=64)
    """Set when this chunk also acknowledges the bootstrap (it asked for
    ``ack_with_chunk``): the data path the sender chose, as in ``bootstrap_ack``."""


class Resume(_RoomMessage):
    """The receiver's memory for the room is full; it offers more: pages of the
    room's pool, or a new region inline."""

    type: Literal["resume"] = "resume"
    sent_tokens: Count
    region: RegionDescriptor | None = None
    allocated_tokens: Positive | None = None
    pages: Runs | None = None
    pool: Count | None = None
    """The offered pool ``pages`` belong to (default: the room's current one)."""

    @model_validator(mode="after")
    def _one_form(self) -> Resume:
        if (self.pages is not None) == (
            self.region is not None or self.allocated_tokens is not None
        ):
            raise ValueError("a resume offers pages, or a region and allocated_tokens")
        if self.pages is None and (self.region is None or self.allocated_tokens is None):
            raise ValueError("a resume offers pages, or a region and allocated_tokens")
        if self.pages is not None and not self.pages:
            raise ValueError("a resume offers at least one page")
        return self


class Abort(_RoomMessage):
    """Fail the room on both sides; answered with ``abort_ack``."""

    type: Literal["abort"] = "abort"
    reason: str = Field(max_length=MAX_REASON_CHARS)


class AbortAck(_RoomMessage):
    """The peer failed the room after an ``abort``."""

    type: Literal["abort_ack"] = "abort_ack"


class Heartbeat(_Wire):
    type: Literal["heartbeat"] = "heartbeat"
    seq: Count


class HeartbeatAck(_Wire):
    type: Literal["heartbeat_ack"] = "heartbeat_ack"
    seq: Count


Message = Annotated[
    PoolOffer
    | Bootstrap
    | BootstrapAck
    | Reject
    | Chunk
    | Resume
    | Abort
    | AbortAck
    | Heartbeat
    | HeartbeatAck,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)


def check_token(room: int, token: object) -> str | None:
    """A room token as sent on the wire (an int or a non-empty string), or None.

    Raises:
        InvalidArgument: anything else, or a string over MAX_TOKEN_CHARS.
    """
    if token is None:
        return None
    if isinstance(token, bool) or not isinstance(token, int | str) or token == "":
        raise InvalidArgument(
            f"room {room}: token must be an int or a non-empty str, not {token!r}"
        )
    text = str(token)
    if len(text) > MAX_TOKEN_CHARS:
        raise InvalidArgument(f"room {room}: token is longer than {MAX_TOKEN_CHARS} characters")
    return text


_LOCAL_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.@%+~-]+/)*[\w.@%+~-]*")


def peer_reason(reason: str) -> str:
    """A failure reason fit to send to a peer: every local path (``/proc/<pid>/fd/<n>``,
    a file a descriptor turned out to be) replaced by ``<local path>``, at most
    :data:`MAX_REASON_CHARS` characters. The full reason stays in this side's
    log and ``info()``."""
    clean = _LOCAL_PATH.sub("<local path>", reason)
    if len(clean) > MAX_REASON_CHARS:
        clean = clean[: MAX_REASON_CHARS - 3] + "..."
    return clean


class MessageError(ValueError):
    """A message could not be read (malformed, unknown type or version)."""


def encode(message: _Wire) -> bytes:
    """The message as bytes for the wire."""
    return message.model_dump_json().encode()


def decode(payload: bytes) -> Message:
    """Read a message.

    Raises:
        MessageError: malformed JSON, an unknown type or version, a bad field.
    """
    try:
        return _ADAPTER.validate_json(payload)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        # field names may come from the peer: each shortened, never a payload in a log
        where = ".".join(str(p)[:32] for p in first.get("loc", ())[:6])
        raise MessageError(
            f"{first.get('msg', 'invalid')[:200]} at {where or 'top level'}"
        ) from None
