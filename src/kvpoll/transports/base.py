"""The transport interface: every adapter (loopback, zmq, ucx, ...) implements it.

A transport moves bytes between registered memory regions of endpoints and
carries small control messages. It knows nothing of rooms, statuses or the
transition table: the protocol layer (:mod:`kvpoll.protocol`) builds those on
top.

Threading contract: a transport is driven by one owner thread. Every method
except :meth:`Transport.wakeup` (and :meth:`Transport.close` once that thread
has stopped) must be called from it. Nothing happens in the background that the
owner cannot see: completions and messages are returned by
:meth:`Transport.progress`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvpoll.errors import KvpollError
from kvpoll.ids import random_bits

__all__ = [
    "Capabilities",
    "MessageReceived",
    "PeerActive",
    "PeerClosed",
    "Region",
    "RegionBoundsError",
    "RegionDescriptor",
    "Span",
    "Transport",
    "TransportClosed",
    "TransportError",
    "TransportEvent",
    "TransportUnavailable",
    "WriteDone",
    "as_bytes",
    "check_batch",
    "check_range",
    "copy_bytes",
    "new_region_id",
]


MAX_EXTRA_BYTES = 16 * 1024
"""The largest ``RegionDescriptor.extra`` (as JSON) accepted from anyone."""


class TransportError(KvpollError):
    """A transport could not do what was asked."""


class TransportUnavailable(TransportError):
    """The named transport does not exist or its optional dependency is missing."""


class TransportClosed(TransportError):
    """The transport was used after :meth:`Transport.close`."""


class RegionBoundsError(TransportError):
    """A write reaches outside a registered region."""


@dataclass(frozen=True)
class Capabilities:
    """What a transport can do, declared rather than guessed."""

    zero_copy: bool
    """Data lands in the destination region without an intermediate copy in kvpoll."""
    same_host_only: bool
    """Both endpoints must be on one host."""
    device_memory: bool
    """Regions may live in accelerator memory."""
    cross_process: bool = True
    """Endpoints may live in different processes (false for in-process transports)."""
    notices: bool = False
    """:meth:`Transport.write_batch` takes a ``notice``: a control message the
    destination receives once the batch's bytes are there (so a "chunk landed"
    message rides with the data instead of following its completion)."""


class RegionDescriptor(BaseModel):
    """A serialisable description of a registered region, sent to peers.

    ``extra`` carries what a transport needs to reach the region (a shared
    memory segment's name, a remote key); other transports ignore it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    transport: str = Field(max_length=64)
    endpoint: str = Field(
        description="address of the endpoint that owns the region", max_length=1024
    )
    region_id: int = Field(ge=0, lt=2**63)
    nbytes: int = Field(ge=0)
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("extra")
    @classmethod
    def _small_extra(cls, extra: dict[str, Any]) -> dict[str, Any]:
        """What a transport adds (a segment's name, a NIXL agent's metadata: about
        1 KiB) stays under :data:`MAX_EXTRA_BYTES` once written as JSON: a peer
        cannot make a table of descriptors hold megabytes each."""
        if extra and len(json.dumps(extra, default=str)) > MAX_EXTRA_BYTES:
            raise ValueError(f"extra is larger than {MAX_EXTRA_BYTES} bytes as JSON")
        return extra

    @property
    def size(self) -> int:
        """About what this description holds in memory, in bytes."""
        return (
            256
            + len(self.endpoint)
            + (len(json.dumps(self.extra, default=str)) if self.extra else 0)
        )


class Region:
    """A registered region: a contiguous 1-D uint8 view of the memory.

    Attributes:
        descriptor: what a peer needs to write into it.
        data: the bytes, as a uint8 tensor (a view, never a copy).
    """

    __slots__ = ("data", "descriptor", "pooled")

    def __init__(
        self, descriptor: RegionDescriptor, data: torch.Tensor, *, pooled: bool = False
    ) -> None:
        self.descriptor = descriptor
        self.data = data
        self.pooled = pooled

    @property
    def nbytes(self) -> int:
        return self.descriptor.nbytes

    def __repr__(self) -> str:
        d = self.descriptor
        return f"Region({d.transport}, id={d.region_id}, {d.nbytes} bytes)"


class Span(NamedTuple):
    """One range of a batched write: ``nbytes`` from ``src`` at ``src_offset`` into
    the peer's ``dst`` at ``dst_offset`` (a tuple: thousands are made per chunk)."""

    src: Region
    src_offset: int
    dst: RegionDescriptor
    dst_offset: int
    nbytes: int


@dataclass(frozen=True)
class WriteDone:
    """A write finished: ``error`` is None on success, else why it failed."""

    write_id: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class MessageReceived:
    """A control message arrived from ``peer`` (its address).

    ``trusted``: the connection it came on proved it is that peer (its
    incarnation, under the cluster secret where there is one). Only a trusted
    message proves a peer alive; an untrusted one is still handled (its room
    checks decide), so a transport that cannot tell passes True.
    """

    peer: str
    payload: bytes
    trusted: bool = True


@dataclass(frozen=True)
class PeerClosed:
    """``peer`` closed its transport; its pending writes have failed.

    ``why`` says how that was learnt, for the rooms' failure reasons.
    """

    peer: str
    why: str = "closed its endpoint"


@dataclass(frozen=True)
class PeerActive:
    """Something other than a control message came from ``peer`` (pieces of a
    write, a write's answer, a grant): proof that it is alive, for an owner that
    judges silence (:mod:`kvpoll.protocol.liveness`). Optional for a transport;
    at most one per peer per :meth:`Transport.progress`."""

    peer: str


TransportEvent = WriteDone | MessageReceived | PeerClosed | PeerActive


def new_region_id() -> int:
    """A fresh random region id (never reused, so stale writes are caught)."""
    return random_bits(63)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 view of a contiguous tensor's memory (no copy).

    Raises:
        TransportError: the tensor is not contiguous.
    """
    if not tensor.is_contiguous():
        raise TransportError("a region must be a contiguous tensor; call .contiguous() first")
    if tensor.dtype == torch.uint8 and tensor.dim() == 1:
        return tensor
    if tensor.dim() == 0:
        tensor = tensor.reshape(1)
    return tensor.view(torch.uint8).reshape(-1)


def check_range(what: str, offset: int, nbytes: int, size: int) -> None:
    """Raise RegionBoundsError unless ``[offset, offset + nbytes)`` lies in ``size`` bytes."""
    if offset < 0 or nbytes < 0 or offset + nbytes > size:
        raise RegionBoundsError(
            f"{what}: bytes {offset}..{offset + nbytes} are outside a region of {size} bytes"
        )


def check_batch(spans: Sequence[Span]) -> str:
    """Check every range of a batch; return the one peer all destinations belong to.

    A :class:`~kvpoll.transports.spans.SpanBatch` is checked over its columns.

    Raises:
        RegionBoundsError: a range lies outside its source or destination.
        TransportError: an empty batch, or destinations on several peers.
    """
    if type(spans) is not list:  # a list (the common case) is no SpanBatch
        from kvpoll.transports.spans import SpanBatch

        if isinstance(spans, SpanBatch):
            return spans.check()
    if not spans:
        raise TransportError("a batch needs at least one range")
    peer = spans[0].dst.endpoint
    for i, (src, src_offset, dst, dst_offset, nbytes) in enumerate(spans):
        if (  # one test per range; the message is made only for a bad one
            src_offset < 0
            or dst_offset < 0
            or nbytes < 0
            or src_offset + nbytes > src.descriptor.nbytes
            or dst_offset + nbytes > dst.nbytes
            or dst.endpoint != peer
        ):
            check_range(f"range {i} of the batch: source", src_offset, nbytes, src.nbytes)
            check_range(f"range {i} of the batch: destination", dst_offset, nbytes, dst.nbytes)
            raise TransportError(
                f"a batch writes to one peer; range {i} goes to {dst.endpoint}, not {peer}"
            )
    return peer


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy between two uint8 tensors of one size with a plain memcpy.

    Not ``Tensor.copy_``: that may wake torch's OpenMP pool, whose threads then
    spin and starve the other side's threads on a machine with few cores.
    """
    np.copyto(dst.numpy(), src.numpy())


class Transport(ABC):
    """Moves bytes into peers' registered regions and carries control messages.

    Contract for every implementation (checked by
    :func:`kvpoll.testing.check_transport`):

    * Control messages from one endpoint to another arrive in the order sent,
      each once, or not at all if the receiver closed.
    * Each :meth:`write` ends in exactly one :class:`WriteDone`, success or
      failure, within the transport's write time-out: a write never hangs.
      A write to a closed peer, an unknown region or outside a region fails
      and changes nothing in the destination.
    * The source region must not change or be released until its write is done.
    * A batch (:meth:`write_batch`) is one write: every range is checked
      before any byte moves, and it ends in one :class:`WriteDone`, ok only
      when every range landed.
    * Where ``capabilities.notices``: a batch's ``notice`` reaches the
      destination's owner as a :class:`MessageReceived` from the writer's
      address only after every byte of the batch is visible there, at most
      once, and never for a write that was refused or failed. Control
      messages sent to that peer before the batch arrive before it.
    * :meth:`close` always closes: it releases every region and resource, and
      tells connected peers, whose pending writes to it then fail.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    @property
    @abstractmethod
    def address(self) -> str:
        """Where peers reach this endpoint (a string to hand them)."""

    @abstractmethod
    def register(self, tensor: torch.Tensor) -> Region:
        """Register an existing contiguous tensor's memory as a region.

        Raises:
            TransportError: not contiguous, or memory this transport cannot reach.
        """

    @abstractmethod
    def allocate(self, nbytes: int) -> Region:
        """A region of ``nbytes`` from the transport's pool: reused, pre-touched
        memory the fastest path reaches (on one host, a shared segment)."""

    @abstractmethod
    def release(self, region: Region, *, reuse: bool = True) -> None:
        """Deregister ``region``; later writes to its descriptor fail.

        A pooled region goes back to the pool when ``reuse`` is true; pass
        False when a peer may still write into it (after a failure), so the
        memory is discarded instead of handed to someone else.
        """

    def write(
        self, src: Region, src_offset: int, dst: RegionDescriptor, dst_offset: int, nbytes: int
    ) -> int:
        """Start copying ``nbytes`` from ``src`` into the peer's ``dst``.

        Returns a write id; its :class:`WriteDone` comes from :meth:`progress`.
        (A batch of one range: see :meth:`write_batch`.)

        Raises:
            RegionBoundsError: the range is outside ``src`` or ``dst``.
            TransportClosed: this transport is closed.
        """
        return self.write_batch([Span(src, src_offset, dst, dst_offset, nbytes)])

    @abstractmethod
    def write_batch(self, spans: Sequence[Span], notice: bytes | None = None) -> int:
        """Start one write made of several ranges, all to one peer.

        Each transport moves a batch the way its engine is fastest (a loop of
        copies into shared memory, pieces on one socket, several operations in
        flight, a descriptor list). Returns one write id; its one
        :class:`WriteDone` is ok only when every range landed.

        ``spans`` may be a :class:`~kvpoll.transports.spans.SpanBatch` (many
        ranges as columns; the Sender hands paged chunks over so): it is a
        sequence of spans, so iterating it always works; reading its columns
        is faster.

        ``notice`` (only where ``capabilities.notices``; kvpoll never passes
        one to a transport without them, which should raise TransportError
        if it gets one anyway): a control message for the destination, handed
        to its owner once the whole batch landed there (see the contract
        above); messages sent after the batch may overtake it. The writer's
        :class:`WriteDone` comes as without one.

        Raises:
            RegionBoundsError: a range is outside its source or destination
                (checked for all ranges before anything moves).
            TransportError: no ranges, destinations on several peers, or a
                notice where the transport delivers none.
            TransportClosed: this transport is closed.
        """

    @abstractmethod
    def send(self, peer: str, payload: bytes) -> None:
        """Queue a small control message to ``peer`` (an address); never waits.

        Raises:
            TransportError: the message cannot be queued (a bad address, or a
                peer that does not read and whose queue is full); the caller
                fails what the message concerned.
        """

    def send_many(self, peer: str, payloads: Sequence[bytes]) -> None:
        """Queue several control messages to ``peer``, in order; never waits.

        The destination's owner gets them as that many :class:`MessageReceived`,
        in the same order, exactly as if each had been sent with :meth:`send`.
        A transport may carry them as one unit (the zmq transports put up to
        128 in one ZMQ message, so the peer reads them in one go: how many
        rooms' bootstraps or chunk notices leave together when many rooms are
        in flight). This default sends each with :meth:`send`.

        Raises:
            TransportError: as :meth:`send`; then any of the messages may be
                lost (the caller fails what each of them concerned).
        """
        for payload in payloads:
            self.send(peer, payload)

    @abstractmethod
    def progress(self, timeout: float) -> list[TransportEvent]:
        """Do pending work; wait up to ``timeout`` seconds for something to happen.

        Returns completions and messages, possibly none. Returns early when
        :meth:`wakeup` is called.
        """

    @abstractmethod
    def wakeup(self) -> None:
        """Make a :meth:`progress` in another thread return soon. Thread-safe."""

    def forget(self, peer: str) -> None:
        """Release what is held to reach ``peer`` (it died); reopened if it is used again.

        Optional: the default holds nothing per peer.
        """
        return None

    @abstractmethod
    def close(self) -> None:
        """Release everything and tell peers. Idempotent; never raises."""

    def memory_kind(self) -> str:
        """Where pool memory for this transport is best allocated: ``"shm"``
        (shared memory peers on this host write into) or ``"host"``."""
        return "host"

    def paths(self) -> list[str]:
        """The data paths this endpoint speaks, most preferred first.

        Announced at bootstrap so both sides agree on one. A path ending in
        ``/shm`` reaches only endpoints on the same host. Fixed for the
        transport's life (an endpoint reads it once). Default: the name.
        """
        return [self.name]

    def _check_open(self) -> None:
        """Raise TransportClosed once the transport is closed (it keeps ``_closed``)."""
        if getattr(self, "_closed", False):
            raise TransportClosed(f"{self.address} is closed")

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
