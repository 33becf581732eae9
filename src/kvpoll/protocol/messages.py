"""The wire messages between a sender and its receivers (version 1).

Every message is a JSON object with ``v`` (the protocol version) and ``type``.
Room messages carry the room id and the receiver's ``session``: a random number
chosen each time a receiver opens a room, so a late message from an earlier
use of the same room id can never touch the new one.

Receiver -> sender: ``bootstrap``, ``resume``, ``abort``, ``abort_ack``.
Sender -> receiver: ``bootstrap_ack``, ``reject``, ``chunk``, ``abort``,
``abort_ack``. Either way: ``heartbeat``, ``heartbeat_ack``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from kvpoll.transports.base import RegionDescriptor

__all__ = [
    "MAX_AUX_BYTES",
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
    "Reject",
    "Resume",
    "decode",
    "encode",
]

PROTOCOL_VERSION = 1
MAX_AUX_BYTES = 1 << 20

RoomId = Annotated[int, Field(ge=-(2**63), lt=2**63)]
Count = Annotated[int, Field(ge=0, lt=2**62)]


class _Wire(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64"
    )
    v: Literal[1] = 1


class _RoomMessage(_Wire):
    room: RoomId
    session: Count
    rank: Count = 0


class Bootstrap(_RoomMessage):
    """A receiver says where to write: its buffer, and the shape of a token's row."""

    type: Literal["bootstrap"] = "bootstrap"
    region: RegionDescriptor
    allocated_tokens: Annotated[int, Field(ge=1, lt=2**40)]
    row_bytes: Annotated[int, Field(ge=1, lt=2**40)]
    dtype: str = Field(max_length=32)
    row_shape: list[Count] = Field(max_length=8)
    transports: list[str] = Field(default_factory=list, max_length=16)
    """The data paths the receiver speaks (see :mod:`kvpoll.protocol.negotiation`)."""
    host: str = Field(default="", max_length=128)
    """An id of the receiver's host (its kernel's boot id)."""


class BootstrapAck(_RoomMessage):
    """The sender has the receiver's destination."""

    type: Literal["bootstrap_ack"] = "bootstrap_ack"
    transport: str = Field(default="", max_length=64)
    """The data path the sender chose."""


class Reject(_RoomMessage):
    """The sender refused a bootstrap or a resume; the receiver's room fails."""

    type: Literal["reject"] = "reject"
    reason: str = Field(max_length=1000)


class Chunk(_RoomMessage):
    """A chunk is in the receiver's buffer."""

    type: Literal["chunk"] = "chunk"
    sent_tokens: Count
    chunk_tokens: Count
    is_last: bool
    total_tokens: Count
    aux: bytes | None = Field(default=None, max_length=MAX_AUX_BYTES)


class Resume(_RoomMessage):
    """The receiver took the last chunk and offers a new buffer."""

    type: Literal["resume"] = "resume"
    sent_tokens: Count
    region: RegionDescriptor
    allocated_tokens: Annotated[int, Field(ge=1, lt=2**40)]


class Abort(_RoomMessage):
    """Fail the room on both sides; answered with ``abort_ack``."""

    type: Literal["abort"] = "abort"
    reason: str = Field(max_length=1000)


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
    Bootstrap
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
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise MessageError(f"{first.get('msg', 'invalid')} at {where or 'top level'}") from None
