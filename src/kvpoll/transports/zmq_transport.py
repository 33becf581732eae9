"""``zmq``: ZMQ for control messages; shared memory or ZMQ TCP for data.

Each endpoint binds one ROUTER socket (its address) and connects one DEALER to
each peer, with the DEALER's identity set to its own address, so every frame
that arrives names its sender.

Data path, chosen per write:

* **same host** (the destination region lives in shared memory of this
  kernel): the writer attaches the segment once (checked and sealed, see
  :mod:`kvpoll.memory.shm`) and copies straight into it. One copy end to end;
  the receiver's application gets a view. A batch is a loop of copies.
* **otherwise**: the write is cut into pieces of ``max_frame`` bytes, each sent
  zero-copy (``copy=False``) and received with ``recv_into`` straight into the
  registered region, after its bounds were checked. The receiver acknowledges
  the last piece (of the last range, for a batch).

Frames on the wire (after the identity): ``C payload`` (control message),
``M payload payload...`` (2 to 128 control messages at once, in order: what
:meth:`~kvpoll.transports.Transport.send_many` sends, and the chunk notices of
one turn's shared-memory writes), ``W header data...`` (pieces of a write: a
header listing each piece's region, offset and length, then one frame per
piece), ``A header error`` (write acknowledgement), ``B`` (the sender is
closing). Anything else is counted and dropped.

Hardening (see docs/security.md): with a cluster secret every socket speaks
CURVE and only peers holding the secret connect (:mod:`kvpoll.transports.auth`);
a second connection claiming a connected peer's identity is not read (no
handover); every queue is bounded (``max_queued`` messages per peer each way,
``max_peers`` sockets, frames over ``max_message_bytes`` close the connection);
a message to a peer whose queue is full is dropped and counted, never waited on.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import resource
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from kvpoll.memory.shm import find_shared
from kvpoll.throttle import LogThrottle
from kvpoll.transports.auth import ClusterKeys, ZapGate
from kvpoll.transports.base import (
    Capabilities,
    MessageReceived,
    PeerActive,
    PeerClosed,
    Region,
    RegionDescriptor,
    Span,
    Transport,
    TransportError,
    TransportEvent,
    WriteDone,
    as_bytes,
    check_batch,
    new_region_id,
)
from kvpoll.transports.inflight import InFlight, Limits
from kvpoll.transports.shm import (
    HEADER,
    Attachments,
    Segment,
    SegmentError,
    SegmentInfo,
    SegmentPool,
    boot_id,
    check_header,
    check_stamp,
    stamp,
)
from kvpoll.transports.spans import SpanBatch, copy_batch

__all__ = ["ZmqTransport"]

log = logging.getLogger("kvpoll.transports.zmq")

_WRITE_HEAD = struct.Struct("<QIB")  # write id, pieces, flags (_LAST, _NOTICE)
_LAST, _NOTICE = 1, 2  # the write's last message; a notice frame follows its pieces
_WRITE_PIECE = struct.Struct("<QQQ")  # region id, offset, length
_MAX_PIECES = 1024  # pieces in one W message
_ACK = struct.Struct("<QB")  # write id, ok
_CONTROL, _WRITE, _ACKNOWLEDGE, _BYE = b"C", b"W", b"A", b"B"
_MANY = b"M"  # several control messages in one ZMQ message
_MANY_COUNT = 128  # control messages in one M message, at most
_MANY_BYTES = 256 * 1024  # a sender closes an M message once it holds this much
_BATCH = 512
_OWN_SOCKETS = 64  # a context's sockets beside the peers' (router, monitor, ZAP, inproc)
_FORGET_LINGER_MS = 500  # a forgotten peer's socket still sends what was queued, this long
_READ_TURN = 0.02  # seconds one progress() reads the router at most (a burst of writes)
_FEW_RANGES = 16  # a batch of at most this many ranges is handled without NumPy columns
_INCARNATION = "X-Kvpoll-Incarnation"  # handshake metadata: which instance connects
_TARGETS = 4096  # destination descriptors whose shared memory is kept resolved
_MAX_INCOMING = 4096  # writes whose pieces are arriving with an error noted, at most
_PART_BYTES = 2 << 20  # a range is split over the copy threads in parts of at least this
_COPY_TIMEOUT = 60.0  # seconds a copy thread may take for its part (it never should)
# No ZMTP heartbeats: libzmq 4.3.5 aborts the process (``Assertion failed: !_io_error``,
# stream_engine_base.cpp) when a connection whose input is throttled (its queue at
# the high-water mark) is reset and its heartbeat timer then fires; any peer could
# do that on purpose (zeromq/libzmq #3937, #4364, #4767). Dead peers are found by
# kvpoll's own heartbeats (kvpoll.protocol.liveness); dead connections by the
# kernel's TCP keepalive.
_KEEPALIVE = ((zmq.TCP_KEEPALIVE, 1), (zmq.TCP_KEEPALIVE_IDLE, 10), (zmq.TCP_KEEPALIVE_INTVL, 5))
_LOOPBACK = ("127.", "localhost", "::1")
_warned_open = False
_warned_descriptors = False
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


@dataclass
class _Pending:
    peer: str
    deadline: float


class ZmqTransport(Transport):
    """ZMQ control channel with a shared-memory or TCP data path.

    Args:
        host: interface to bind (default loopback).
        port: TCP port (0: any free one).
        advertise: the host name peers should use, when it differs from ``host``.
        shm: use shared memory for peers on this host (off: always TCP).
        max_frame: largest TCP message of a write, in bytes (2 MiB: the
            destination copies one message into place while the next arrives;
            16 MiB rooms moved 1.4-1.8 GiB/s with 16 MiB messages, 2.0-2.3 with
            2 MiB, alternated in one run).
        write_timeout: seconds before an unacknowledged write fails.
        max_idle_pool_bytes: idle pooled segments kept for reuse.
        max_attached: peers' shared-memory segments kept mapped at once (the
            least recently used is dropped past it).
        max_peers: sockets to peers kept open at once (the least recently used
            is closed past it; reopened on need).
        max_queued: messages queued per peer, each way; past it a message to
            that peer is dropped (counted in ``send_dropped``) and ZMQ stops
            reading from a peer that sends faster than it is served.
        max_message_bytes: the largest frame a peer may send (default:
            the larger of ``max_frame`` and 16 MiB, + 4 MiB: a peer with
            another ``max_frame`` up to 16 MiB is still read); a larger one
            closes its connection.
        copy_threads: threads that copy one large range into a peer's shared
            memory together (a range of 4 MiB or more is cut into parts of at
            least 2 MiB); 1 copies on the calling thread alone. The helper
            threads start on the first such copy and stop at close().
        secret_file: a file holding the cluster secret: every connection is
            then CURVE-encrypted and only peers with the same secret are
            admitted (see docs/security.md). Default: none (the endpoint
            warns once when it binds to more than loopback without one).
    """

    name: ClassVar[str] = "zmq"
    capabilities: ClassVar[Capabilities] = Capabilities(
        zero_copy=True, same_host_only=False, device_memory=False, notices=True
    )
    """Notices: after the copy into shared memory, on the control channel; over
    TCP, in the write's last message, handed over by the destination once every
    piece is in its region."""
    in_flight: ClassVar[Limits] = Limits(
        peer_ranges=1 << 20, peer_bytes=64 << 20, ranges=1 << 22, bytes=256 << 20
    )
    """Writes handed to the network at once (:mod:`kvpoll.transports.inflight`).
    A peer's share (64 MiB, at most 1,024 + 32 messages of pieces) stays far
    below its send queue (``max_queued`` = 10,000 messages by default), and a
    heartbeat sent behind it waits for 64 MiB at most (tens of ms here).
    Shared-memory writes are copies made at once: nothing is in flight."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise: str | None = None,
        shm: bool = True,
        max_frame: int = 2 << 20,
        write_timeout: float = 30.0,
        max_idle_pool_bytes: int = 4 << 30,
        max_attached: int = 256,
        max_peers: int = 1024,
        max_queued: int = 10_000,
        max_message_bytes: int | None = None,
        secret_file: str | None = None,
        copy_threads: int = 2,
    ) -> None:
        if isinstance(copy_threads, bool) or not isinstance(copy_threads, int) or copy_threads < 1:
            raise TransportError(f"copy_threads must be an int of at least 1, not {copy_threads!r}")
        if max_peers < 1:
            raise TransportError(f"max_peers must be at least 1, not {max_peers}")
        if max_queued < 1:
            raise TransportError(f"max_queued must be at least 1, not {max_queued}")
        if max_frame < 4096:
            raise TransportError(f"max_frame must be at least 4096 bytes, not {max_frame}")
        if host in ("0.0.0.0", "*", "::", "") and not advertise:
            raise TransportError(
                f"binding {host!r} listens on every interface, but peers need one address "
                "to reach this endpoint: pass advertise='<an address peers can reach>'"
            )
        if max_message_bytes is None:
            max_message_bytes = max(max_frame, 16 << 20) + (4 << 20)
        if max_message_bytes < max_frame:
            raise TransportError(
                f"max_message_bytes ({max_message_bytes}) must be at least max_frame ({max_frame})"
            )
        self._keys = ClusterKeys.from_file(secret_file) if secret_file else None
        self._ctx = zmq.Context(io_threads=1)
        # ZMQ's own limit (1,023 sockets a context by default) must sit above ours,
        # with room for sockets closed but not yet reaped (a forgotten peer's lingers)
        sockets = 2 * max_peers + _OWN_SOCKETS
        self._ctx.set(zmq.MAX_SOCKETS, max(sockets, self._ctx.get(zmq.MAX_SOCKETS)))
        _ensure_descriptors(max_peers)
        self._gate = ZapGate(self._ctx, self._keys) if self._keys is not None else None
        self._router = self._ctx.socket(zmq.ROUTER)
        self._max_queued = max_queued
        for opt, value in (
            (zmq.LINGER, 0),
            (zmq.RCVHWM, max_queued),
            (zmq.SNDHWM, max_queued),
            (zmq.MAXMSGSIZE, max_message_bytes),
            # a second connection claiming a connected peer's identity is held unread
            # until the first goes: nobody takes over a live peer's connection
            (zmq.ROUTER_HANDOVER, 0),
            *_KEEPALIVE,
        ):
            self._router.setsockopt(opt, value)
        if self._keys is not None:
            self._keys.serve(self._router)
        try:
            if port == 0:
                port = self._router.bind_to_random_port(f"tcp://{host}")
            else:
                self._router.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as exc:
            self._router.close(0)
            if self._gate is not None:
                self._gate.close()
            self._ctx.term()
            raise TransportError(f"cannot bind tcp://{host}:{port}: {exc}") from exc
        self._address = f"tcp://{advertise or host}:{port}"
        if self._keys is None:
            _warn_if_open(host)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        if self._gate is not None:
            self._poller.register(self._gate.socket, zmq.POLLIN)
        # connections whose handshake failed (no secret, another secret, not ZMTP): counted
        self._monitor = self._router.get_monitor_socket(_HANDSHAKE_FAILED)
        self._poller.register(self._monitor, zmq.POLLIN)
        # one socket per peer written to, least recently used first; at most max_peers
        # (a flood of made-up identities cannot exhaust file descriptors)
        self._dealers: OrderedDict[str, zmq.Socket[bytes]] = OrderedDict()
        self._max_peers = max_peers
        self._shm = shm
        self._boot = boot_id()
        # Receive buffers come from this pool on both paths: reused, pre-touched memory.
        # Only with shm on are they advertised for peers on this host to map.
        self._pool = SegmentPool(max_idle_bytes=max_idle_pool_bytes)
        self._attachments = Attachments(max_attached)
        # peer -> the keys of its segments mapped here: unmapped when it is forgotten
        self._peer_segments: dict[str, set[tuple[int, int, int]]] = {}
        # id(descriptor) -> (the descriptor, its segment, the region's offset there,
        # stamped); a hit must be the very descriptor object (held here, so its id is
        # not reused) on a segment still open. No view of the memory is held: a
        # segment the attachments drop is unmapped as soon as they close it.
        self._targets: OrderedDict[int, tuple[RegionDescriptor, Segment, int, bool]] = OrderedDict()
        self._regions: dict[int, Region] = {}
        self._segments: dict[int, Segment] = {}
        self._pending: dict[int, _Pending] = {}
        self._notices: dict[int, tuple[str, bytes]] = {}  # write id -> (peer, notice)
        self._incoming_errors: dict[tuple[str, int], str] = {}
        self._closed_peers: OrderedDict[str, None] = OrderedDict()  # bounded like _dealers
        # Each transport instance is an incarnation, announced in its connections'
        # handshake metadata: a peer address answered by another process (the old
        # one died and its port was taken again) is a peer closed, never the same peer.
        self._incarnation = secrets.token_hex(8)
        self._incarnations: OrderedDict[str, str] = OrderedDict()  # peer -> its incarnation
        self._events: list[TransportEvent] = []
        # peers heard this turn through frames other than control messages (PeerActive),
        # counted only from a connection that proved the peer's incarnation
        self._heard: set[str] = set()
        self._trusted = False
        # (peer, write id, notice) of shared-memory writes done: the notices go out
        # together at the start of the next progress(), then the writes are reported
        self._landed: list[tuple[str, int, bytes]] = []
        # (peer, write id, error) of writes into this endpoint's regions, answered at
        # the start of the next progress(): after the owner took the turn's events, so
        # a notice that came with a write is not kept waiting behind the answer's send
        self._acks: list[tuple[str, int, str | None]] = []
        self._write_ids = itertools.count(1)
        self._writes_in_flight = InFlight(self.in_flight, stall=write_timeout)
        self._copy_threads = copy_threads
        self._copier: ThreadPoolExecutor | None = None  # made on the first large copy
        self._max_frame = max_frame
        self._write_timeout = write_timeout
        self._closed = False
        self._warn = LogThrottle(log)  # a flood of bad frames logs a summary
        self.stats = {
            "malformed": 0,
            "rejected_writes": 0,
            "shm_writes": 0,
            "tcp_writes": 0,
            "attached_segments": 0,
            "peers_dropped": 0,
            "send_dropped": 0,
            "control_batches": 0,  # M messages sent (many control messages in one)
            "handshakes_refused": 0,
            "peers_replaced": 0,
        }

    # -- regions -------------------------------------------------------------
    @property
    def address(self) -> str:
        return self._address

    def paths(self) -> list[str]:
        return [f"{self.name}/shm", f"{self.name}/tcp"] if self._shm else [f"{self.name}/tcp"]

    def memory_kind(self) -> str:
        return "shm" if self._shm else "host"

    def _shm_extra(self, segment: Segment, offset: int, stamped: bool) -> dict[str, Any]:
        if not self._shm:
            return {}
        return {
            **segment.info.as_dict(),
            "shm_offset": offset,
            "shm_stamped": stamped,
            "boot_id": self._boot,
        }

    def register(self, tensor: torch.Tensor) -> Region:
        self._check_open()
        if tensor.device.type != "cpu":
            raise TransportError(
                f"the zmq transport registers CPU memory only, not {tensor.device.type}: "
                "use a transport with device memory (kvpoll[ucx])"
            )
        data = as_bytes(tensor)
        extra: dict[str, Any] = {}
        shared = find_shared(int(data.data_ptr()), data.numel()) if data.numel() else None
        if shared is not None and self._shm:  # pool memory: peers here write it directly
            self._claim(shared[0])
            extra = self._shm_extra(shared[0], shared[1], False)
        return self._add_region(data, extra)

    def _claim(self, segment: Segment) -> None:
        """Record this endpoint as one that may offer ``segment`` (see memory.shm)."""
        try:
            segment.claim(self._address)
        except SegmentError as exc:
            raise TransportError(f"cannot offer this shared memory: {exc}") from exc

    def allocate(self, nbytes: int) -> Region:
        self._check_open()
        if nbytes < 0:
            raise TransportError(f"cannot allocate {nbytes} bytes")
        try:
            segment = self._pool.acquire(nbytes)
        except SegmentError as exc:
            raise TransportError(f"cannot allocate {nbytes} bytes: {exc}") from exc
        if self._shm:
            self._claim(segment)
        region = self._add_region(
            segment.data[HEADER : HEADER + nbytes], self._shm_extra(segment, HEADER, True)
        )
        region.pooled = True
        self._segments[region.descriptor.region_id] = segment
        stamp(segment, region.descriptor.region_id, nbytes)
        return region

    def _add_region(self, data: torch.Tensor, extra: dict[str, Any]) -> Region:
        descriptor = RegionDescriptor(
            transport=self.name,
            endpoint=self._address,
            region_id=new_region_id(),
            nbytes=data.numel(),
            extra=extra,
        )
        region = Region(descriptor, data)
        self._regions[descriptor.region_id] = region
        return region

    def release(self, region: Region, *, reuse: bool = True) -> None:
        rid = region.descriptor.region_id
        self._regions.pop(rid, None)
        segment = self._segments.pop(rid, None)
        if segment is not None:
            self._pool.release(segment, reuse=reuse)

    # -- writes ---------------------------------------------------------------
    def write_batch(self, spans: Sequence[Span], notice: bytes | None = None) -> int:
        self._check_open()
        if notice is not None and not self.capabilities.notices:
            raise TransportError(f"the {self.name} transport delivers no notices")
        peer = check_batch(spans)
        write_id = next(self._write_ids)
        if peer in self._closed_peers:
            self._events.append(WriteDone(write_id, f"peer {peer} is closed"))
        elif not (spans.total if isinstance(spans, SpanBatch) else any(s.nbytes for s in spans)):
            self._landed_here(peer, write_id, notice)
        elif not self._write_shm(write_id, spans, notice):
            if isinstance(spans, SpanBatch):
                ranges, nbytes = len(spans), spans.total
            else:
                ranges, nbytes = len(spans), sum(span.nbytes for span in spans)
            self._writes_in_flight.add(
                write_id,
                peer,
                ranges,
                nbytes,
                lambda: self._write_remote(write_id, spans, notice),
                time.monotonic(),
            )
        return write_id

    def _send_landed(self) -> None:
        """Send the notices of writes whose bytes are at their peers already (from
        here), each peer's together (:meth:`send_many`), then report each write
        done: failed where its notice could not go."""
        if not self._landed:
            return
        landed, self._landed = self._landed, []
        notices: dict[str, list[bytes]] = {}
        for peer, _, notice in landed:
            notices.setdefault(peer, []).append(notice)
        errors = {peer: self._notify(peer, payloads) for peer, payloads in notices.items()}
        for peer, write_id, _ in landed:
            self._events.append(WriteDone(write_id, errors[peer]))

    def _notify(self, peer: str, notices: list[bytes]) -> str | None:
        """Send writes' notices to ``peer``; why they could not go (those writes
        then fail), or None. Never raises (it runs inside progress())."""
        if peer in self._closed_peers:
            return f"peer {peer} is closed"
        try:
            self.send_many(peer, notices)
        except TransportError as exc:
            return f"cannot send the write's notice: {exc}"
        return None

    def _landed_here(self, peer: str, write_id: int, notice: bytes | None) -> None:
        """A write whose bytes are at ``peer`` already (copied from here): done, once
        its notice is sent. Notices wait for the next :meth:`progress`, so the
        notices of one turn's writes leave together (the peer wakes once for
        them, not once each)."""
        if notice is None:
            self._events.append(WriteDone(write_id))
        else:
            self._landed.append((peer, write_id, notice))

    def _write_shm(self, write_id: int, spans: Sequence[Span], notice: bytes | None) -> bool:
        """Copy every range straight into the peer's shared memory, then send the
        notice; False when some destination is not in shared memory of this host.

        Each destination is resolved and checked once per batch (spans of one
        buffer share its descriptor). The ranges of a :class:`SpanBatch` whose
        destinations do not overlap are copied pair by pair as gathered rows
        (:func:`copy_batch`); other ranges are a loop of memcpys over NumPy
        views, in order.
        """
        if not self._shm:
            return False
        # Ranges were checked against their descriptors (check_batch); a descriptor is
        # checked against the segment it names here, once per batch.
        resolved: dict[int, tuple[Any, int] | str] = {}  # id(descriptor) -> target
        if isinstance(spans, SpanBatch):
            dsts = [spans.pairs[at][1] for at in spans.used]
        else:
            dsts = [span.dst for span in spans]
        for dst in dsts:
            if id(dst) not in resolved:
                extra = dst.extra
                if "shm_pid" not in extra or extra.get("boot_id") != self._boot:
                    return False
                resolved[id(dst)] = self._shm_target(dst)
        failed = next((t for t in resolved.values() if isinstance(t, str)), None)
        if failed is not None:
            self.stats["rejected_writes"] += 1
            self._events.append(WriteDone(write_id, failed))
            return True
        targets = {k: t for k, t in resolved.items() if not isinstance(t, str)}

        if not (isinstance(spans, SpanBatch) and _copy_columns(spans, targets)):
            try:
                _copy_in_order(spans, targets, self._copy)
            except TransportError as exc:  # a copy thread did not finish: this write fails
                self._events.append(WriteDone(write_id, str(exc)))
                return True
        self.stats["shm_writes"] += 1
        self._landed_here(spans[0].dst.endpoint, write_id, notice)
        return True

    def _copy(self, dst: Any, src: Any) -> None:
        """Copy one range (NumPy views of equal length): a large one in parts, one
        per copy thread, this thread taking the first (a memcpy releases the GIL;
        two threads copied 16 MiB into shared memory 1.5-1.7x as fast as one here).

        Raises:
            TransportError: a copy thread did not finish its part in time.
        """
        n = len(dst)
        parts = min(self._copy_threads, n // _PART_BYTES)
        if parts < 2 or np.may_share_memory(dst, src):  # overlapping: one memmove
            np.copyto(dst, src)
            return
        if self._copier is None:
            self._copier = ThreadPoolExecutor(
                self._copy_threads - 1, thread_name_prefix="kvpoll-copy"
            )
        step = -(-n // parts // 4096) * 4096  # parts of whole pages
        rest = [
            self._copier.submit(np.copyto, dst[at : at + step], src[at : at + step])
            for at in range(step, n, step)
        ]
        np.copyto(dst[:step], src[:step])
        try:
            for part in rest:
                part.result(_COPY_TIMEOUT)
        except FutureTimeout:
            raise TransportError(f"a copy thread took over {_COPY_TIMEOUT:g} s") from None

    def _shm_target(self, dst: RegionDescriptor) -> tuple[Any, int] | str:
        """(the segment's bytes, the region's offset there), or why it cannot be written.

        A descriptor seen lately is resolved from a cache (a peer's pool is
        written through the same descriptors room after room); only the
        region's stamp is read again.
        """
        hit = self._targets.get(id(dst))
        if hit is not None and hit[0] is dst and not hit[1].closed:
            _, segment, offset, stamped = hit
            memory = segment.data.numpy()
            if stamped:
                error = check_header(memory[:24].view(np.int64), dst.region_id, dst.nbytes)
                if error is not None:
                    return error
            return memory, offset
        self._targets.pop(id(dst), None)
        found = self._resolve(dst)
        if isinstance(found, str):
            return found
        while len(self._targets) >= _TARGETS:
            self._targets.popitem(last=False)
        segment, offset, stamped = found
        self._targets[id(dst)] = (dst, segment, offset, stamped)
        return segment.data.numpy(), offset

    def _resolve(self, dst: RegionDescriptor) -> tuple[Segment, int, bool] | str:
        """What :meth:`_shm_target` caches: the segment, the offset and whether the
        region is stamped there; or why it cannot be written."""
        extra = dst.extra
        try:
            info = SegmentInfo.from_dict(extra)
            offset = extra.get("shm_offset")
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise SegmentError(f"a shared memory offset must be an int >= 0, not {offset!r}")
            segment = self._attachments.get(info)
        except SegmentError as exc:
            return f"cannot reach the destination: {exc}"
        if not segment.claimed_by(dst.endpoint):  # a peer names only memory of its own
            return f"the shared memory named is not memory of {dst.endpoint}"
        self._peer_segments.setdefault(dst.endpoint, set()).add(info.key())
        if len(self._peer_segments) > 4 * self._max_peers:  # peers never forgotten
            self._peer_segments = {
                peer: kept
                for peer, keys in self._peer_segments.items()
                if (kept := {k for k in keys if k in self._attachments})
            }
        self.stats["attached_segments"] = len(self._attachments)
        if offset + dst.nbytes > segment.size:
            return f"the destination lies outside its segment of {segment.size} bytes"
        stamped = extra.get("shm_stamped") is True
        if stamped:  # the region living there must be this one, whole
            error = check_stamp(segment, dst.region_id, dst.nbytes)
            if error is not None:
                return error
        return segment, offset, stamped

    def _write_remote(self, write_id: int, spans: Sequence[Span], notice: bytes | None) -> None:
        """The network path: pieces over ZMQ TCP (an engine subclass replaces it).

        Ranges are cut into pieces of at most ``max_frame`` bytes and grouped
        into messages of at most ``max_frame`` bytes and :data:`_MAX_PIECES`
        pieces, each piece a zero-copy frame of the source. The notice is the
        last message's last frame.
        """
        peer = spans[0].dst.endpoint
        messages: list[list[tuple[Span, int, int]]] = [[]]
        size = 0
        for span in spans:
            sent = 0
            while sent < span.nbytes:
                n = min(self._max_frame, span.nbytes - sent)
                if messages[-1] and (
                    size + n > self._max_frame or len(messages[-1]) >= _MAX_PIECES
                ):
                    messages.append([])
                    size = 0
                messages[-1].append((span, sent, n))
                size += n
                sent += n
        views: dict[int, memoryview] = {}
        for i, pieces in enumerate(messages):
            flags = 0 if i < len(messages) - 1 else _LAST | (_NOTICE if notice is not None else 0)
            header = [_WRITE_HEAD.pack(write_id, len(pieces), flags)]
            frames: list[Any] = [_WRITE, b""]
            for span, sent, n in pieces:
                header.append(_WRITE_PIECE.pack(span.dst.region_id, span.dst_offset + sent, n))
                view = views.get(id(span.src))
                if view is None:  # a memoryview of the tensor's memory
                    view = views[id(span.src)] = span.src.data.numpy().data
                lo = span.src_offset + sent
                frames.append(view[lo : lo + n])
            if flags & _NOTICE:
                frames.append(notice)
            frames[1] = b"".join(header)
            if not self._post(peer, frames, copy=False):
                self._events.append(
                    WriteDone(
                        write_id, f"{peer} is not reading: {self._max_queued} messages queued"
                    )
                )
                return
        self.stats["tcp_writes"] += 1
        self._expect_ack(write_id, peer)

    def _expect_ack(self, write_id: int, peer: str) -> None:
        """Fail ``write_id`` unless it is finished within the write time-out."""
        self._pending[write_id] = _Pending(peer, time.monotonic() + self._write_timeout)

    def _finish(self, write_id: int, error: str | None) -> None:
        """Report a pending write done (once: a late second report is ignored); a
        notice left for the writer to send (:meth:`_notify_when_done`) goes first."""
        notice = self._notices.pop(write_id, None)
        if self._pending.pop(write_id, None) is not None:
            if notice is not None and error is None:  # sent (and reported) with the turn's others
                self._landed.append((notice[0], write_id, notice[1]))
            else:
                self._events.append(WriteDone(write_id, error))

    def _notify_when_done(self, write_id: int, peer: str, notice: bytes | None) -> None:
        """Send ``notice`` to ``peer`` once the write is reported done without an
        error (for engines whose completion at the writer means the bytes landed)."""
        if notice is not None:
            self._notices[write_id] = (peer, notice)

    # -- control ------------------------------------------------------------------
    def send(self, peer: str, payload: bytes) -> None:
        self._check_open()
        if peer in self._closed_peers:
            return
        if not self._post(peer, [_CONTROL, payload]):
            raise TransportError(
                f"{peer} is not reading: {self._max_queued} messages are queued to it"
            )

    def send_many(self, peer: str, payloads: Sequence[bytes]) -> None:
        """Up to 128 control messages (and 256 KiB) per ZMQ message; one alone
        goes as with :meth:`send`."""
        self._check_open()
        if peer in self._closed_peers:
            return
        if len(payloads) == 1:  # one room at a time: as send(), without grouping
            self.send(peer, payloads[0])
            return
        for group in _groups(payloads):
            if not self._post(peer, [_CONTROL, *group] if len(group) == 1 else [_MANY, *group]):
                raise TransportError(
                    f"{peer} is not reading: {self._max_queued} messages are queued to it"
                )
            self.stats["control_batches"] += len(group) > 1

    def _post(self, peer: str, frames: list[Any], *, copy: bool = True) -> bool:
        """Queue one message to ``peer`` without waiting; False (and counted in
        ``send_dropped``) when its queue is full: the peer is not reading.

        Raises:
            TransportError: no socket can be opened to ``peer``, or ZMQ refused.
        """
        dealer = self._dealer(peer)
        try:
            dealer.send_multipart(frames, zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            self.stats["send_dropped"] += 1
            return False
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot send to {peer}: {exc}") from exc
        return True

    def _dealer(self, peer: str) -> zmq.Socket[bytes]:
        dealer = self._dealers.get(peer)
        if dealer is not None:
            self._dealers.move_to_end(peer)
            return dealer
        if not peer.startswith("tcp://"):
            raise TransportError(f"not a zmq address: {peer!r}")
        while len(self._dealers) >= self._max_peers:  # the least recently used goes
            self.stats["peers_dropped"] += 1
            _, oldest = self._dealers.popitem(last=False)
            oldest.close(0)
        try:
            dealer = self._ctx.socket(zmq.DEALER)
        except zmq.ZMQError as exc:  # out of file descriptors or sockets
            raise TransportError(f"cannot open a socket to {peer}: {exc}") from exc
        for opt, value in (
            (zmq.LINGER, 200),
            (zmq.SNDHWM, self._max_queued),
            (zmq.RCVHWM, 1),  # a dealer only sends
            *_KEEPALIVE,
        ):
            dealer.setsockopt(opt, value)
        if self._keys is not None:
            self._keys.connect(dealer)
        dealer.setsockopt(zmq.IDENTITY, self._address.encode())
        dealer.setsockopt(zmq.METADATA, f"{_INCARNATION}:{self._incarnation}".encode())
        try:
            dealer.connect(peer)
        except zmq.ZMQError as exc:
            dealer.close(0)
            raise TransportError(f"cannot connect to {peer}: {exc}") from exc
        self._dealers[peer] = dealer
        return dealer

    def forget(self, peer: str) -> None:
        """Close the socket to ``peer`` (a peer gone or no longer shared); reopened on
        need. What was queued to it last (the aborts of its rooms) still goes out for
        :data:`_FORGET_LINGER_MS`, in ZMQ's I/O thread."""
        dealer = self._dealers.pop(peer, None)
        if dealer is not None:
            dealer.close(_FORGET_LINGER_MS)
        self._unmap(peer)

    def _unmap(self, peer: str) -> None:
        """Unmap ``peer``'s segments (it died, closed, or is no longer shared)."""
        for key in self._peer_segments.pop(peer, ()):
            self._attachments.forget(key)
        self.stats["attached_segments"] = len(self._attachments)

    # -- progress ------------------------------------------------------------------
    def progress(self, timeout: float) -> list[TransportEvent]:
        self._check_open()
        self._send_acks()
        self._send_landed()
        self._expire_writes()
        self._progress_engine()
        wait_ms = 0 if self._events or self._landed or self._acks else self._wait_ms(timeout)
        for sock, _ in self._poller.poll(wait_ms):
            if sock == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            elif self._gate is not None and sock is self._gate.socket:
                self._gate.handle()
                self.stats["auth_admitted"] = self._gate.admitted
            elif sock is self._monitor:
                self._count_handshakes()
            elif sock is self._router:
                until = time.monotonic() + _READ_TURN
                for _ in range(_BATCH):
                    try:
                        ident = self._router.recv(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    peer = ident.bytes.decode("utf-8", "replace")
                    self._trusted = self._check_incarnation(peer, ident)
                    self._handle(peer)
                    if time.monotonic() > until:  # the rest next turn (zmq_poll sees it
                        break  # waiting): the turn's events and answers go out first
        self._progress_engine()
        self._send_landed()
        events, self._events = self._events, []
        if self._writes_in_flight.busy:
            self._next_writes(events)
        if self._heard:
            events.extend(PeerActive(peer) for peer in self._heard)
            self._heard.clear()
        return events

    def _next_writes(self, events: list[TransportEvent]) -> None:
        """The writes reported done free their share of what is in flight; waiting
        writes that fit now are handed over (their own events come next turn)."""
        now = time.monotonic()
        for event in events:
            if isinstance(event, WriteDone):
                self._writes_in_flight.done(event.write_id, now)
        if self._writes_in_flight.waiting:
            for write_id, exc in self._writes_in_flight.admit_waiting(now):
                self._events.append(WriteDone(write_id, f"cannot write: {exc}"))
        self.stats.update(self._writes_in_flight.stats)

    def _count_handshakes(self) -> None:
        for _ in range(_BATCH):
            try:
                recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            except (zmq.ZMQError, ValueError):  # a truncated event: count it all the same
                pass
            self.stats["handshakes_refused"] += 1
            self._warn.warning(
                "handshake refused",
                "refused a connection to %s: its handshake failed (%s)",
                self._address,
                "no or another cluster secret" if self._keys is not None else "not kvpoll's ZMTP",
            )

    # -- hooks for engine subclasses (ucx, nixl, mooncake) -----------------------
    def _progress_engine(self) -> None:
        """Drive the data engine and turn its completions into events."""

    def _wait_ms(self, timeout: float) -> int:
        """How long the next poll of the control sockets may block, in ms."""
        return max(0, int(timeout * 1000))

    def _handle_frame(self, peer: str, kind: bytes) -> bool:
        """Handle a frame kind of a subclass's own; False: not one of them."""
        return False

    def _unstamp(self, peer: str, kind: bytes) -> bytes:
        """The kind of a frame longer than one byte, noting what follows the kind
        (a subclass's per-peer sequence number); here none is known."""
        return kind

    def _frames(self) -> list[bytes]:
        """The remaining frames of the message being handled."""
        frames = []
        while self._router.getsockopt(zmq.RCVMORE):
            frames.append(self._router.recv())
        return frames

    def _drain(self) -> None:
        while self._router.getsockopt(zmq.RCVMORE):
            self._router.recv_into(bytearray())

    def _malformed(self, peer: str, why: str) -> None:
        self.stats["malformed"] += 1
        self._warn.warning("malformed frame", "dropped a malformed frame from %s: %s", peer, why)
        self._drain()

    def _check_incarnation(self, peer: str, frame: zmq.Frame) -> bool:
        """A message from ``peer`` made by another incarnation than the one heard
        before: that one is gone (its address was taken again), so it is closed.
        True when the message proved the incarnation now known for ``peer``."""
        try:
            incarnation = frame.get(_INCARNATION)
        except (zmq.ZMQError, KeyError, UnicodeDecodeError):  # a peer without the property
            return False
        if not isinstance(incarnation, str):
            return False
        known = self._incarnations.get(peer)
        self._incarnations[peer] = incarnation
        self._incarnations.move_to_end(peer)
        while len(self._incarnations) > 4 * self._max_peers:
            self._incarnations.popitem(last=False)
        if known is not None and known != incarnation:
            self.stats["peers_replaced"] += 1
            self._peer_closed(peer, "is gone: another process answers at its address")
        return True

    def _alive(self, peer: str) -> None:
        """A well-formed frame other than a control message came from ``peer``
        (reported as :class:`PeerActive` at the end of the turn)."""
        if self._trusted:
            self._heard.add(peer)

    def _handle(self, peer: str) -> None:
        if not self._router.getsockopt(zmq.RCVMORE):
            self.stats["malformed"] += 1
            return
        kind = self._router.recv()
        if len(kind) != 1:  # a subclass's stamp rides after the kind
            kind = self._unstamp(peer, kind)
        more = self._router.getsockopt(zmq.RCVMORE)
        if kind != _BYE:
            self._closed_peers.pop(peer, None)  # it is back (a restart on the same address)
        if kind == _CONTROL and more:
            payload = self._router.recv()
            if self._router.getsockopt(zmq.RCVMORE):
                self._malformed(peer, "extra frames after a control message")
            else:
                self._events.append(MessageReceived(peer, payload, self._trusted))
        elif kind == _MANY and more:
            self._handle_many(peer)
        elif kind == _WRITE and more:
            self._handle_piece(peer)
        elif kind == _ACKNOWLEDGE and more:
            header = self._router.recv()
            error = self._router.recv() if self._router.getsockopt(zmq.RCVMORE) else b""
            self._drain()
            self._take_ack(peer, header, error)
        elif kind == _BYE:
            self._drain()
            self._peer_closed(peer)
        elif self._handle_frame(peer, kind):
            pass
        else:
            self._malformed(peer, f"unknown frame kind {kind[:8]!r}")

    def _take_ack(self, peer: str, header: bytes, error: bytes) -> None:
        """A write acknowledgement from ``peer``: its write is done (a malformed one
        is counted; one for a write not pending to ``peer`` is ignored)."""
        if len(header) != _ACK.size:
            self.stats["malformed"] += 1
            return
        write_id, ok = _ACK.unpack(header)
        pending = self._pending.get(write_id)
        if pending is None or pending.peer != peer:
            return  # a late acknowledgement of a write that already timed out
        self._alive(peer)
        self._finish(write_id, None if ok else error.decode("utf-8", "replace") or "rejected")

    def _handle_many(self, peer: str) -> None:
        """An M message: every payload is a control message, or none is (fewer
        than 2 or more than 128, or more after 256 KiB: as :func:`_groups` cuts
        them, so at most 256 KiB and one message are held here)."""
        payloads: list[bytes] = []
        size = 0
        while self._router.getsockopt(zmq.RCVMORE):
            if len(payloads) == _MANY_COUNT or size >= _MANY_BYTES:
                self._malformed(peer, "an M message longer than a sender makes")
                return
            payloads.append(self._router.recv())
            size += len(payloads[-1])
        if len(payloads) < 2:
            self._malformed(peer, "an M message of fewer than 2 control messages")
            return
        trusted = self._trusted
        self._events.extend(MessageReceived(peer, payload, trusted) for payload in payloads)

    def _handle_piece(self, peer: str) -> None:
        """A W message: check every piece against the live regions, then take each
        straight into its region (or drop it); acknowledge after the last message."""
        head = self._router.recv() if self._router.getsockopt(zmq.RCVMORE) else b""
        if len(head) < _WRITE_HEAD.size:
            self._malformed(peer, "bad write header")
            return
        write_id, count, flags = _WRITE_HEAD.unpack_from(head)
        last = flags & _LAST
        if (
            not 0 < count <= _MAX_PIECES
            or len(head) != _WRITE_HEAD.size + count * _WRITE_PIECE.size
            or flags & ~(_LAST | _NOTICE)
            or flags == _NOTICE  # a notice comes with the last message only
        ):
            self._malformed(peer, "bad write header")
            return
        self._alive(peer)
        key = (peer, write_id)
        error = self._incoming_errors.get(key)
        for i in range(count):
            if not self._router.getsockopt(zmq.RCVMORE):
                error = error or f"a write message announced {count} pieces and held {i}"
                break
            region_id, offset, length = _WRITE_PIECE.unpack_from(
                head, _WRITE_HEAD.size + i * _WRITE_PIECE.size
            )
            region, why = self._lookup(region_id, offset, length)
            if error is None and why is None:
                assert region is not None
                got = self._router.recv_into(region.data.numpy()[offset : offset + length].data)
                if got != length:
                    why = f"a piece of {got} bytes arrived where {length} were announced"
            else:
                self._router.recv_into(bytearray())
            error = error or why
        notice = None
        if flags & _NOTICE:
            if self._router.getsockopt(zmq.RCVMORE):
                notice = self._router.recv()
            else:
                error = error or "a write announced a notice and held none"
        if self._router.getsockopt(zmq.RCVMORE):
            error = error or "extra frames after a write's pieces"
        self._drain()
        if error is not None and key not in self._incoming_errors:
            self.stats["rejected_writes"] += 1
            self._incoming_errors[key] = error
            while len(self._incoming_errors) > _MAX_INCOMING:  # a peer that never ends its writes
                self._incoming_errors.pop(next(iter(self._incoming_errors)))
        if last:
            error = self._incoming_errors.pop(key, None)
            self._acknowledge(peer, write_id, error)
            if error is None and notice is not None:  # every piece is in its region
                self._events.append(MessageReceived(peer, notice, self._trusted))

    def _acknowledge(self, peer: str, write_id: int, error: str | None) -> None:
        """Tell the writer that its write ``write_id`` landed (or why not), at the
        start of the next :meth:`progress` (or at :meth:`close`): the receiving
        side's room steps on the write's notice first (an answer's send cost
        20-180 us of the receiver's critical path in a 4 KiB ucx room)."""
        self._acks.append((peer, write_id, error))

    def _send_acks(self) -> None:
        acks, self._acks = self._acks, []
        for peer, write_id, error in acks:
            with contextlib.suppress(TransportError):
                self._send_ack(peer, _ACK.pack(write_id, error is None), (error or "").encode())

    def _send_ack(self, peer: str, header: bytes, error: bytes) -> None:
        """Send one acknowledgement (an ``_ACK`` header, then the error's text).

        Raises:
            TransportError: no socket can be opened to ``peer``.
        """
        self._post(peer, [_ACKNOWLEDGE, header, error])

    def _lookup(self, region_id: int, offset: int, length: int) -> tuple[Region | None, str | None]:
        """The live region a peer's write targets, or why the write is refused."""
        region = self._regions.get(region_id)
        if region is None:
            return None, f"region {region_id} is not registered at {self._address}"
        if offset + length > region.nbytes:
            return None, (
                f"bytes {offset}..{offset + length} are outside region {region_id} "
                f"of {region.nbytes} bytes"
            )
        return region, None

    def _lookup_all(self, table: Any) -> str | None:
        """:meth:`_lookup` over a peer's ranges at once: ``table`` is rows of (region
        id, offset, length) as unsigned ints off the wire. Why the first bad range is
        refused, or None when every range lies in a live region.

        One dictionary lookup per distinct region, then one comparison over all
        ranges (per-region masks cost 4 ms for 8,192 ranges of 32 regions); a
        table of a few ranges is looked up row by row (NumPy's fixed cost per
        call made the columns ~60 us slower for one range)."""
        if len(table) <= _FEW_RANGES:
            return next(
                (why for rid, off, n in table.tolist() if (why := self._lookup(rid, off, n)[1])),
                None,
            )
        ids = table[:, 0]
        distinct, which = np.unique(ids, return_inverse=True)
        sizes = np.empty(len(distinct), dtype=np.uint64)
        for i, region_id in enumerate(distinct.tolist()):
            region = self._regions.get(region_id)
            if region is None:
                return f"region {region_id} is not registered at {self._address}"
            sizes[i] = region.nbytes
        size = sizes[which.reshape(-1)]
        offsets, lengths = table[:, 1], table[:, 2]
        bad = (lengths > size) | (offsets > size - np.minimum(lengths, size))
        if bool(bad.any()):
            at = int(np.argmax(bad))
            return self._lookup(int(ids[at]), int(offsets[at]), int(lengths[at]))[1]
        return None

    def _expire_writes(self) -> None:
        """Fail the writes past their deadline. ``_pending`` holds them in the order
        they started, so in the order of their deadlines (one write time-out each):
        the look stops at the first one still in time, not at the end of thousands.
        A write waiting for its turn fails when its peer made no progress for a
        write time-out (:class:`~kvpoll.transports.inflight.InFlight`)."""
        if self._writes_in_flight.waiting:
            for write_id, why in self._writes_in_flight.expired(time.monotonic()):
                self._events.append(WriteDone(write_id, why))
        if not self._pending:
            return
        now = time.monotonic()
        late: list[tuple[int, str]] = []
        for write_id, pending in self._pending.items():
            if now < pending.deadline:
                break
            late.append((write_id, pending.peer))
        for write_id, peer in late:
            self._finish(
                write_id, f"no acknowledgement from {peer} within {self._write_timeout:g} s"
            )

    def _peer_closed(self, peer: str, why: str = "closed its endpoint") -> None:
        self._closed_peers[peer] = None
        while len(self._closed_peers) > 4 * self._max_peers:
            self._closed_peers.popitem(last=False)
        for write_id, pending in list(self._pending.items()):
            if pending.peer == peer:
                self._finish(write_id, f"peer {peer} closed")
        for write_id in self._writes_in_flight.drop_peer(peer):
            self._events.append(WriteDone(write_id, f"peer {peer} closed"))
        dealer = self._dealers.pop(peer, None)
        if dealer is not None:
            dealer.close(0)
        self._unmap(peer)
        self._events.append(PeerClosed(peer, why))

    def wakeup(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"!")

    def close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(TransportError):  # answers and notices of the last turn
            self._send_acks()
            self._send_landed()
        self._closed = True
        for dealer in self._dealers.values():
            with contextlib.suppress(zmq.ZMQError):
                dealer.send(_BYE, zmq.NOBLOCK)
            dealer.close(200)
        self._dealers.clear()
        self._router.disable_monitor()
        self._monitor.close(0)
        self._router.close(0)
        if self._gate is not None:
            self._gate.close()
        self._ctx.term()
        self._warn.flush()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._regions.clear()
        self._segments.clear()
        self._pool.close()
        self._attachments.close()
        self._targets.clear()
        self._pending.clear()
        self._writes_in_flight.clear()
        self._notices.clear()
        self._landed.clear()
        self._events.clear()
        if self._copier is not None:
            self._copier.shutdown(wait=True)
            self._copier = None


Targets = dict[int, tuple[Any, int]]
"""id(destination descriptor) -> (its segment's bytes, the region's offset there)."""


def _groups(payloads: Sequence[bytes]) -> list[list[bytes]]:
    """``payloads`` in order, cut into M messages (at most ``_MANY_COUNT`` each, and
    closed once one holds ``_MANY_BYTES``)."""
    groups: list[list[bytes]] = []
    group: list[bytes] = []
    size = 0
    for payload in payloads:
        if len(group) == _MANY_COUNT or size >= _MANY_BYTES:
            groups.append(group)
            group, size = [], 0
        group.append(payload)
        size += len(payload)
    if group:
        groups.append(group)
    return groups


def _copy_columns(batch: SpanBatch, targets: Targets) -> bool:
    """A batch's ranges as gathered rows; False when destinations overlap."""

    def views(at: int) -> tuple[Any, Any]:
        src, dst = batch.pairs[at]
        memory, offset = targets[id(dst)]
        return memory[offset : offset + dst.nbytes], src.data.numpy()

    return copy_batch(batch, views)


def _copy_in_order(
    spans: Sequence[Span], targets: Targets, copy: Callable[[Any, Any], None]
) -> None:
    """Ranges as a loop of ``copy(destination, source)`` over NumPy views, in the
    order given."""
    sources: dict[int, Any] = {}
    for span in spans:
        memory, offset = targets[id(span.dst)]
        source = sources.get(id(span.src))
        if source is None:
            source = sources[id(span.src)] = span.src.data.numpy()
        start = offset + span.dst_offset
        copy(
            memory[start : start + span.nbytes],
            source[span.src_offset : span.src_offset + span.nbytes],
        )


def _ensure_descriptors(max_peers: int) -> None:
    """Raise this process's soft limit of open files (never above the hard limit)
    so that ``max_peers`` sockets fit: each takes a descriptor for its connection
    and one for ZMQ's mailbox, and each peer connecting to us one more. Where
    the hard limit is too low, warn once: past it sockets fail to open (a
    room's message then fails that room, never the I/O thread)."""
    global _warned_descriptors
    need = 3 * (2 * max_peers + _OWN_SOCKETS) + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(hard, need)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft < need and not _warned_descriptors:
        _warned_descriptors = True
        log.warning(
            "this process may open %d files (hard limit %s); max_peers=%d needs about %d: "
            "raise the limit (ulimit -n) or lower max_peers",
            soft,
            hard,
            max_peers,
            need,
        )


def _warn_if_open(host: str) -> None:
    """Warn once per process: an endpoint without a secret listens beyond loopback."""
    global _warned_open
    if _warned_open or host.startswith(_LOOPBACK):
        return
    _warned_open = True
    log.warning(
        "kvpoll listens on %s without a cluster secret: anyone who can reach this port can "
        "open, feed or abort rooms. Set secret_file in kvpoll.toml (or KVPOLL_SECRET_FILE) "
        "on every endpoint; see docs/security.md",
        host,
    )
