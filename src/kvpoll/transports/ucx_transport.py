"""``ucx``: data, write requests and acknowledgements over UCX (through UCXX);
the protocol's control messages over ZMQ.

UCX picks the fastest path it has to each peer: shared memory or
``process_vm_writev`` (cma) on one host, TCP across hosts, RDMA where the UCX
build has it. UCXX's Python layer offers tag-matched messages (no one-sided
put), so a write is a tagged send into a receive the destination posts:

1. the writer sends a write request (``U``: write id, then region, offset,
   length and tag of every range of the batch) and at once one tagged UCX send
   per range, all in flight together. The first request to a peer goes over
   the control channel and opens a lane both ways; later ones (up to 16 KiB
   with their notice) and the acknowledgements are UCX messages on the lane
   (:mod:`kvpoll.transports.ucx_lane`: who may use one, and why a lane
   message never overtakes the ZMQ messages sent before it);
2. the destination checks every range against its live regions and posts a
   tagged receive straight into each (UCX's rendezvous then moves the bytes
   without an intermediate copy); a refused request gets receives into a small
   scratch buffer, which truncate and drop the bytes;
3. when every receive completed, the destination acknowledges; the write is done.
   A notice (``write_batch(..., notice=)``) rides in the request as its second
   frame; the destination hands it to its owner right after acknowledging, so
   a "chunk landed" message reaches the receiver one hop after the data
   instead of three.

Settings: see :data:`DEFAULT_SETTINGS`. A default applies only where the
user's environment does not set the ``UCX_*`` variable; settings passed
explicitly (``ucx={"TLS": "tcp"}``) win over both.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import secrets
import socket
import struct
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import zmq

from kvpoll.transports.base import (
    Capabilities,
    MessageReceived,
    Region,
    RegionDescriptor,
    Span,
    TransportError,
    as_bytes,
)
from kvpoll.transports.inflight import Limits
from kvpoll.transports.shm import Segment
from kvpoll.transports.spans import SpanBatch
from kvpoll.transports.ucx_lane import (
    ACK,
    ANNOUNCE,
    REQUEST,
    Held,
    LaneIn,
    LaneMessage,
    Lanes,
    fits,
    pack_announce,
    pack_lane,
    unpack_announce,
    unpack_lane,
    unstamp,
)
from kvpoll.transports.zmq_transport import _ACK, ZmqTransport

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
_SET_BEFORE = {key for key in os.environ if key.startswith("UCX_")}
try:  # the import error names the package for the "pip install kvpoll[ucx]" hint
    import ucxx._lib.libucxx as libucxx
    from ucxx._lib.arr import Array
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(str(exc), name="ucxx-cu12") from exc
# Importing UCXX writes its own defaults into os.environ (UCX_RNDV_THRESH,
# UCX_RNDV_FRAG_MEM_TYPE=cuda, ...). Every other UCX in the process reads them
# too: NIXL's bundled UCX, started later, moved 16 MiB ~10x slower with them
# (0.33 against 3.3 GiB/s, same machine). They are taken back out of the
# environment and handed to kvpoll's own UCX contexts explicitly instead.
UCXX_SETTINGS: Mapping[str, str] = {
    key.removeprefix("UCX_"): os.environ.pop(key)
    for key in [k for k in os.environ if k.startswith("UCX_") and k not in _SET_BEFORE]
}
"""What importing UCXX put in the environment (without ``UCX_``): kvpoll's UCX
contexts get them as settings, below :data:`DEFAULT_SETTINGS`."""

__all__ = [
    "DEFAULT_SETTINGS",
    "UCXX_SETTINGS",
    "UcxTransport",
    "effective_settings",
    "net_device_for",
    "rndv_scheme_for",
    "settings_with_sources",
]

log = logging.getLogger("kvpoll.transports.ucx")

DEFAULT_SETTINGS: Mapping[str, str] = {
    # tcp must be listed; sysv/posix/cma carry same-host traffic.
    "TLS": "tcp,sysv,posix,cma,self",
    # Without it UCX refuses shared memory on endpoints with error handling
    # and intra-host traffic silently goes over TCP.
    "MM_ERROR_HANDLING": "y",
}
"""UCX settings (without the ``UCX_`` prefix) this transport uses unless told
otherwise. ``NET_DEVICES`` and ``RNDV_SCHEME`` are derived from the bound host
(:func:`net_device_for`, :func:`rndv_scheme_for`)."""

_REQUEST_HEAD = struct.Struct("<QQ")  # write id, ranges
_REQUEST_RANGE = struct.Struct("<QQQQ")  # region id, offset, length, tag
_MAX_RANGES = 1 << 16
_WRITE_REQUEST = b"U"
_SCRATCH = 64
_UCS_OK = 0  # a completed request's status when it succeeded
MAX_RECEIVES = 1 << 18
"""Receives posted at once, over all peers; a request past it is refused."""
MAX_PEER_RECEIVES = 1 << 16
"""Receives posted at once for one peer's requests; a request past it is refused.
One largest request (65,536 ranges) fits; a quarter of :data:`MAX_RECEIVES`, so
no two peers (nor three) can take every receive from the others."""
MAX_NOTICE_BYTES = 2 << 20
"""The largest notice a write request may carry (a chunk message with 1 MiB of aux
bytes fits); a request with a larger one is refused."""
MAX_HELD_NOTICE_BYTES = 256 << 20
"""Notices held at once for requests whose data has not all arrived, over all
peers; a request past it is refused."""
_SIOCGIFADDR = 0x8915
_LANE_TURN = 256  # lane messages taken from one lane per turn, at most


def net_device_for(host: str) -> str:
    """The UCX ``NET_DEVICES`` value for an endpoint bound to ``host``.

    Loopback hosts give ``lo``; an address of one of this machine's interfaces
    gives that interface; anything else (a wildcard, a name) gives ``all``.
    """
    try:
        ip = ipaddress.ip_address(socket.gethostbyname(host)) if host else None
    except (OSError, ValueError):
        return "all"
    if ip is None or ip.is_unspecified:
        return "all"
    if ip.is_loopback:
        return "lo"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                answer = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue
            if socket.inet_ntoa(answer[20:24]) == str(ip):
                return name
    return "all"


def rndv_scheme_for(net_device: str) -> str:
    """The UCX ``RNDV_SCHEME`` for an endpoint whose ``NET_DEVICES`` is ``net_device``.

    Bound to loopback, every peer is on this host and UCX moves large messages
    by shared memory or cma: its own choice (``auto``) moved 16 MiB as fast as
    a rendezvous by put or faster there (raw UCXX 1.06-1.28x, rooms 0.99-1.42x,
    single writes 1.04-1.29x, in three series of alternated runs;
    docs/transports/ucx.md). Bound to a network interface, peers may be across
    TCP, where ``put_zcopy`` measured fastest.
    """
    return "auto" if net_device == "lo" else "put_zcopy"


def settings_with_sources(
    host: str, explicit: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None
) -> list[tuple[str, str, str]]:
    """(key, value, source) of every setting that matters, keys without ``UCX_``.

    Sources: ``ucxx default`` (:data:`UCXX_SETTINGS`), ``kvpoll default``,
    ``env UCX_<KEY>`` (UCX reads it itself), or ``explicit`` (the transport's
    ``ucx`` option); each wins over the ones before it.
    """
    env = os.environ if environ is None else environ
    rows: dict[str, tuple[str, str]] = {}
    defaults = [(k, v, "ucxx default") for k, v in UCXX_SETTINGS.items()]
    defaults += [(k, v, "kvpoll default") for k, v in DEFAULT_SETTINGS.items()]
    device = net_device_for(host)
    defaults.append(("NET_DEVICES", device, "kvpoll default"))
    defaults.append(("RNDV_SCHEME", rndv_scheme_for(device), "kvpoll default"))
    for key, value, source in defaults:
        variable = f"UCX_{key}"
        if variable in env:
            rows[key] = (env[variable], f"env {variable}")
        else:
            rows[key] = (value, source)
    for key, value in (explicit or {}).items():
        rows[key.removeprefix("UCX_").upper()] = (str(value), "explicit")
    return [(key, value, source) for key, (value, source) in rows.items()]


def effective_settings(
    host: str, explicit: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The settings handed to UCX: defaults the environment does not set, then
    ``explicit`` (which wins over both). Keys are given without ``UCX_``."""
    return {
        key: value
        for key, value, source in settings_with_sources(host, explicit, environ)
        if not source.startswith("env ")  # UCX reads the environment itself
    }


@dataclass
class _Incoming:
    """One batch arriving: its receives, and whether it was answered already."""

    peer: str
    write_id: int
    remaining: int
    answered: bool
    error: str | None = None
    deadline: float = 0.0
    notice: bytes | None = None  # handed over once every receive landed without an error
    after: int | None = None  # a lane request: the sender's ZMQ message it came after
    receives: list[_Receive] = field(default_factory=list)
    head: int = 0
    """Receives before it were seen completed; each is looked at until it completes,
    not on every turn (a paged write posts thousands)."""


@dataclass
class _Receive:
    batch: _Incoming
    request: Any
    region_id: int | None  # None: a scratch receive that drops a refused write
    keep: Any  # the buffer UCX writes into, alive until the receive ends
    tag: int = 0


class UcxTransport(ZmqTransport):
    """UCX data path (UCXX), ZMQ control channel.

    Args:
        host, port, advertise: where the control channel listens (as for ``zmq``).
        progress: ``"blocking"`` (sleep on UCX's event fd; the default) or
            ``"polling"`` (spin while transfers are in flight; it keeps a core
            busy and measured no faster on two cores, but may on more).
        ucx: UCX settings without the ``UCX_`` prefix, e.g. ``{"TLS": "tcp"}``;
            they win over the environment and :data:`DEFAULT_SETTINGS`.
        write_timeout: seconds before an unacknowledged write fails.
        max_peers, max_queued, secret_file: the control channel's limits and
            cluster secret (as for ``zmq``; see docs/security.md).
        max_idle_pool_bytes: idle pooled receive buffers kept for reuse.
    """

    name: ClassVar[str] = "ucx"
    capabilities: ClassVar[Capabilities] = Capabilities(
        zero_copy=True, same_host_only=False, device_memory=True, notices=True
    )
    """Device memory needs a GPU and a UCX built with CUDA (``register`` says
    which is missing); pooled buffers from ``allocate`` are host memory."""
    in_flight: ClassVar[Limits] = Limits(
        peer_ranges=MAX_PEER_RECEIVES // 2, peer_bytes=1 << 30, ranges=1 << 16, bytes=4 << 30
    )
    """A destination posts one receive per range and takes at most
    ``MAX_PEER_RECEIVES`` (65,536) from one writer and ``MAX_RECEIVES``
    (262,144) in all: a writer keeps half of the first in flight to a peer,
    so eight writers fit under the second (a write of up to 65,536 ranges,
    the most a request carries, goes alone)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise: str | None = None,
        progress: str = "blocking",
        ucx: Mapping[str, str] | None = None,
        write_timeout: float = 30.0,
        max_idle_pool_bytes: int = 4 << 30,
        max_peers: int = 1024,
        max_queued: int = 10_000,
        secret_file: str | None = None,
    ) -> None:
        if progress not in ("blocking", "polling"):
            raise TransportError(f"progress must be 'blocking' or 'polling', not {progress!r}")
        self.settings = effective_settings(host, ucx)
        try:
            self._context = libucxx.UCXContext(
                self.settings, feature_flags=(libucxx.Feature.TAG, libucxx.Feature.WAKEUP)
            )
            self._worker = libucxx.UCXWorker(self._context)
            self._worker.init_blocking_progress_mode()
        except libucxx.UCXError as exc:
            raise TransportError(f"UCX could not start with {self.settings}: {exc}") from exc
        super().__init__(
            host=host,
            port=port,
            advertise=advertise,
            shm=False,
            write_timeout=write_timeout,
            max_idle_pool_bytes=max_idle_pool_bytes,
            max_peers=max_peers,
            max_queued=max_queued,
            secret_file=secret_file,
        )
        self._polling = progress == "polling"
        self._worker_address = self._worker.address.tobytes().hex()
        self._poller.register(self._worker.epoll_file_descriptor, zmq.POLLIN)
        self._tag_prefix = secrets.randbits(31) << 32
        self._next_tag = 1  # the low 32 bits of the next send's tag (wrapping)
        self._endpoints: dict[str, Any] = {}
        self._endpoint_peers: dict[str, str] = {}  # worker -> the peer whose regions it holds
        self._sends: dict[int, list[Any]] = {}  # write id -> its UCX send requests
        self._active: list[_Incoming] = []  # batches with receives not yet seen completed
        self._waiting_count = 0  # those receives, over all batches
        self._sends_done: dict[int, int] = {}  # write id -> its sends seen completed, in order
        self._posted: dict[str, int] = {}  # peer -> receives posted for its requests
        self._incoming: deque[_Incoming] = deque()  # batches with receives posted, oldest first
        self._retiring: list[Any] = []  # the empty sends of _expire_receives in flight
        self._self_endpoint: Any = None  # retires expired receives with empty messages
        self._parked: dict[int, tuple[Segment | None, bool]] = {}  # released while receiving
        self._notice_bytes = 0  # held by batches whose receives have not all completed
        self._lanes = Lanes(max_peers)
        self._lane_sends: deque[tuple[Any, bytes]] = deque()  # lane messages in flight
        self._retired: list[tuple[Any, Any]] = []  # lane receives being retired, their buffers
        self._held_acks: set[int] = set()  # writes whose early acknowledgement waits
        self.stats.update(
            {
                "ucx_writes": 0,
                "receives_posted": 0,
                "receives_expired": 0,
                "lane_sent": 0,
                "lane_received": 0,
                "lane_held": 0,
                "lane_unheld": 0,
                "lanes_refused": 0,
            }
        )

    def paths(self) -> list[str]:
        return [self.name]  # UCX picks shared memory, cma or the network itself

    # -- regions ----------------------------------------------------------------
    def register(self, tensor: torch.Tensor) -> Region:
        if tensor.device.type == "cpu":
            return super().register(tensor)
        self._check_open()
        if tensor.device.type != "cuda":
            raise TransportError(f"the ucx transport cannot reach {tensor.device.type} memory")
        if not self._context.cuda_support:
            raise TransportError(
                "this UCX has no CUDA support, so it cannot reach GPU memory "
                "(install a CUDA build of UCX, e.g. ucxx-cu12 on a machine with a GPU)"
            )
        return self._add_region(as_bytes(tensor), {})

    def _add_region(self, data: torch.Tensor, extra: dict[str, Any]) -> Region:
        return super()._add_region(data, {**extra, "ucx_worker": self._worker_address})

    def release(self, region: Region, *, reuse: bool = True) -> None:
        rid = region.descriptor.region_id
        if any(r.region_id == rid for r in self._waiting_receives()):
            # UCX may still write here: keep the memory until the receive ends.
            self._regions.pop(rid, None)
            self._parked[rid] = (self._segments.pop(rid, None), reuse)
            return
        super().release(region, reuse=reuse)

    # -- writes ------------------------------------------------------------------
    def _endpoint(self, worker_hex: str) -> Any:
        endpoint = self._endpoints.get(worker_hex)
        if endpoint is not None and not endpoint.alive:  # its peer went away: UCX closed it
            self._close_endpoint(worker_hex)
            endpoint = None
        if endpoint is None:
            try:
                address = libucxx.UCXAddress.create_from_buffer(bytes.fromhex(worker_hex))
                endpoint = self._worker.create_endpoint_from_worker_address(address, True)
            except (ValueError, libucxx.UCXError) as exc:
                raise TransportError(
                    f"cannot reach UCX worker {worker_hex[:16]}...: {exc}"
                ) from exc
            self._endpoints[worker_hex] = endpoint
        return endpoint

    def _close_endpoint(self, worker_hex: str) -> None:
        """Drop the endpoint to a worker; closed only while UCX still has it alive.

        UCX closes an endpoint itself once its peer is gone (error handling is
        on); closing such an endpoint again crashed the process.
        """
        endpoint = self._endpoints.pop(worker_hex, None)
        if endpoint is not None and endpoint.alive:
            with contextlib.suppress(Exception):
                endpoint.close()

    def forget(self, peer: str) -> None:
        self._drop_lanes(peer)
        for worker_hex in [w for w, p in self._endpoint_peers.items() if p == peer]:
            del self._endpoint_peers[worker_hex]
            self._close_endpoint(worker_hex)
        super().forget(peer)

    def _peer_closed(self, peer: str, why: str = "closed its endpoint") -> None:
        self._drop_lanes(peer)
        super()._peer_closed(peer, why)

    def _write_remote(self, write_id: int, spans: Sequence[Span], notice: bytes | None) -> None:
        """Send the write request, then one tagged send per range.

        A list of spans (a few ranges: what the protocol makes for a room's
        buffer) is packed range by range; a :class:`SpanBatch` (a paged chunk's
        thousands) as columns. Both give the same request: NumPy's fixed cost
        per call made the columns ~0.1 ms slower for one range.
        """
        if isinstance(spans, SpanBatch):
            self._write_columns(write_id, spans, notice)
            return
        live = [span for span in spans if span.nbytes]
        first = live[0].dst
        worker_hex = self._worker_of(first, {id(span.dst): span.dst for span in live}.values())
        tags = self._tags(len(live))
        request = _REQUEST_HEAD.pack(write_id, len(live)) + b"".join(
            _REQUEST_RANGE.pack(span.dst.region_id, span.dst_offset, span.nbytes, tag)
            for span, tag in zip(live, tags, strict=True)
        )
        pieces = [
            (_sliceable(s.src.data)[s.src_offset : s.src_offset + s.nbytes], tag)
            for s, tag in zip(live, tags, strict=True)
        ]
        self._request(write_id, first, worker_hex, request, notice, pieces)

    def _write_columns(self, write_id: int, spans: SpanBatch, notice: bytes | None) -> None:
        batch = spans.nonempty()
        count = len(batch)
        first = batch[0].dst
        worker_hex = self._worker_of(first, (batch.pairs[at][1] for at in batch.used))
        tag0 = self._next_tag
        self._next_tag += count
        tags = np.uint64(self._tag_prefix) | (
            np.arange(tag0, tag0 + count, dtype=np.uint64) & np.uint64(0xFFFFFFFF)
        )
        table = np.stack(
            [
                batch.dst_column(lambda d: d.region_id).astype(np.uint64),
                batch.dst_offset.astype(np.uint64),
                batch.nbytes.astype(np.uint64),
                tags,
            ],
            axis=1,
        )
        request = _REQUEST_HEAD.pack(write_id, count) + table.astype("<u8").tobytes()
        sources = {at: _sliceable(batch.pairs[at][0].data) for at in batch.used}
        pieces = [
            (sources[p][so : so + n], tag)
            for p, so, n, tag in zip(
                batch.pair.tolist(),
                batch.src_offset.tolist(),
                batch.nbytes.tolist(),
                tags.tolist(),
                strict=True,
            )
        ]
        self._request(write_id, first, worker_hex, request, notice, pieces)

    def _worker_of(self, first: RegionDescriptor, dsts: Iterable[RegionDescriptor]) -> str:
        """The UCX worker every destination lives on.

        Raises:
            TransportError: a destination that is not a ucx region, or two workers.
        """
        worker_hex = first.extra.get("ucx_worker")
        if not isinstance(worker_hex, str) or any(
            dst.extra.get("ucx_worker") != worker_hex for dst in dsts
        ):
            raise TransportError(f"{first!r} is not a ucx region of one worker")
        return worker_hex

    def _tags(self, count: int) -> list[int]:
        """Tags for ``count`` sends: this transport's prefix and a wrapping counter."""
        tag0 = self._next_tag
        self._next_tag += count
        return [self._tag_prefix | ((tag0 + i) & 0xFFFFFFFF) for i in range(count)]

    def _request(
        self,
        write_id: int,
        first: RegionDescriptor,
        worker_hex: str,
        request: bytes,
        notice: bytes | None,
        pieces: list[tuple[Any, int]],
    ) -> None:
        """Send a write's request to its destination, then its data: one tagged
        send of each (source slice, tag) of ``pieces``.

        Raises:
            TransportError: the worker cannot be reached, or the peer is not reading.
        """
        count = (len(request) - _REQUEST_HEAD.size) // _REQUEST_RANGE.size
        if count > _MAX_RANGES:
            raise TransportError(f"a batch of {count} ranges; at most {_MAX_RANGES}")
        endpoint = self._endpoint(worker_hex)
        peer = first.endpoint
        self._endpoint_peers[worker_hex] = peer
        if notice == b"" or not self._lane_send(peer, REQUEST, request, notice or b""):
            frames = [_WRITE_REQUEST, request] + ([] if notice is None else [notice])
            if not self._post(peer, frames):
                raise TransportError(f"{peer} is not reading: its queue is full")
            if peer not in self._lanes.asked:
                self._open_lane(peer, reply=True)  # later requests go on the lane
        self._sends[write_id] = [
            endpoint.tag_send(Array(view), libucxx.UCXXTag(tag)) for view, tag in pieces
        ]
        self._expect_ack(write_id, first.endpoint)
        self.stats["ucx_writes"] += 1

    def _handle_frame(self, peer: str, kind: bytes) -> bool:
        if kind == ANNOUNCE:
            self._take_announce(peer, self._frames())
            return True
        if kind != _WRITE_REQUEST:
            return False
        frames = self._frames()
        if len(frames) not in (1, 2):
            self._malformed(peer, "bad ucx write request")
            return True
        self._take_request(peer, frames[0], frames[1] if len(frames) == 2 else None, None)
        return True

    def _take_request(
        self, peer: str, request: bytes, notice: bytes | None, after: int | None
    ) -> None:
        """A write request from ``peer`` (over ZMQ, or over its lane after its ZMQ
        message ``after``): check every range, post a receive for each."""
        if len(request) < _REQUEST_HEAD.size:
            self._malformed(peer, "bad ucx write request")
            return
        write_id, count = _REQUEST_HEAD.unpack_from(request)
        if not 0 < count <= _MAX_RANGES or len(request) != (
            _REQUEST_HEAD.size + count * _REQUEST_RANGE.size
        ):
            self._malformed(peer, "bad ucx write request")
            return
        self._alive(peer)
        table = np.frombuffer(request, dtype="<u8", offset=_REQUEST_HEAD.size)
        table = table.reshape(count, 4)  # region id, offset, length, tag of each range
        error = self._lookup_all(table[:, :3])  # a few ranges: row by row, without NumPy
        rows = table.tolist()
        if any(row[3] >> 63 for row in rows):  # the lanes' tags: never a data receive's
            self._malformed(peer, "a ucx write request with a lane's tag")
            return
        over = self._receive_budget(peer, count)
        if error is None and notice is not None:
            if len(notice) > MAX_NOTICE_BYTES:
                error = f"a notice of {len(notice)} bytes; at most {MAX_NOTICE_BYTES}"
            elif self._notice_bytes + len(notice) > MAX_HELD_NOTICE_BYTES:
                error = f"{MAX_HELD_NOTICE_BYTES} bytes of notices are held here already"
        if over is not None:  # no receive at all past the limits, not even a scratch one
            self.stats["rejected_writes"] += 1
            self._warn.warning("rejected write", "rejected a write from %s: %s", peer, over)
            self._acknowledge(peer, write_id, over)
            return
        batch = _Incoming(
            peer,
            write_id,
            count,
            answered=error is not None,
            error=error,
            deadline=time.monotonic() + self._write_timeout,
            notice=notice if error is None else None,
            after=after,
        )
        if batch.notice is not None:
            self._notice_bytes += len(batch.notice)
        if error is not None:
            self.stats["rejected_writes"] += 1
            self._warn.warning("rejected write", "rejected a write from %s: %s", peer, error)
            self._acknowledge(peer, write_id, error)
        targets: dict[int, Any] = {}  # region id -> what its slices are cut from
        for region_id, offset, length, tag in rows:
            target = targets.get(region_id)
            if target is None and error is None:
                region = self._regions.get(region_id)
                if region is not None:
                    target = targets[region_id] = _sliceable(region.data)
            if target is not None:
                keep: Any = target[offset : offset + length]
            else:
                keep = np.empty(_SCRATCH, dtype=np.uint8)  # truncates, dropping the bytes
            request = self._worker.tag_recv(Array(keep), libucxx.UCXXTag(tag))
            batch.receives.append(
                _Receive(batch, request, region_id if target is not None else None, keep, tag)
            )
        self._posted[peer] = self._posted.get(peer, 0) + count
        self._incoming.append(batch)
        self._active.append(batch)
        self._waiting_count += count
        self.stats["receives_posted"] = self._waiting_count

    def _waiting_receives(self) -> Iterator[_Receive]:
        """Every receive not yet seen completed."""
        for batch in self._active:
            yield from batch.receives[batch.head :]

    def _receive_budget(self, peer: str, count: int) -> str | None:
        """Why a request of ``count`` ranges from ``peer`` gets no receives (None: it does).

        Within the limits a refused request (an unknown region) still gets
        scratch receives, so the writer's data is dropped rather than left in
        UCX's queue; past them it gets none.
        """
        if self._posted.get(peer, 0) + count > MAX_PEER_RECEIVES:
            return f"{peer} has {MAX_PEER_RECEIVES} receives posted here already"
        if self._waiting_count + count > MAX_RECEIVES:
            return f"{MAX_RECEIVES} receives are posted here already"
        return None

    def _expire_receives(self, now: float) -> None:
        """Retire the receives of batches older than the write time-out (a writer that
        never sent, or a forged request): each gets an empty message from this worker,
        which completes it without touching the memory it was posted for."""
        self._retiring = [r for r in self._retiring if not r.completed]
        while self._incoming:
            batch = self._incoming[0]
            if batch.remaining and now < batch.deadline:
                return
            self._incoming.popleft()
            if not batch.remaining:
                continue
            for receive in batch.receives[batch.head :]:  # only those still waiting
                if not receive.request.completed:
                    self._retiring.append(self._self_send(receive.tag))
            self.stats["receives_expired"] += batch.remaining
            batch.error = batch.error or "the writer's data did not arrive in time"

    # -- the lane (kvpoll.transports.ucx_lane) --------------------------------------
    def _open_lane(self, peer: str, *, reply: bool) -> None:
        """Post receives for ``peer``'s lane messages and tell it their tag over ZMQ;
        ``reply`` asks it to open its lane back. Answering a peer that asked
        (``reply=False``), a lane it had is kept, and its numbering starts again
        (the peer asks only with its own lane state new)."""
        lane = self._lanes.ins.get(peer)
        if lane is None:
            tag = self._lanes.open_in(peer, self._post_lane_receive)
            if tag is None:
                self.stats["lanes_refused"] += 1
                return
        else:
            tag, lane.heard = lane.tag, 0
            for item in self._lanes.take_held(peer):  # they waited on the old numbering
                self._apply(peer, item)
        self._lanes.asked.add(peer)
        worker = self._worker.address.tobytes()
        with contextlib.suppress(TransportError):
            self._post(peer, [ANNOUNCE, pack_announce(tag, reply, worker)])

    def _post_lane_receive(self, tag: int, buffer: Any) -> Any:
        return self._worker.tag_recv(Array(buffer), libucxx.UCXXTag(tag))

    def _take_announce(self, peer: str, frames: list[bytes]) -> None:
        """``peer`` tells us its lane: our requests and answers to it may use it."""
        try:
            if len(frames) != 1:
                raise ValueError("an announcement of several frames")
            tag, reply, worker = unpack_announce(frames[0])
        except ValueError as exc:  # an unusable worker address fails its lane sends later
            self.stats["malformed"] += 1
            self._warn.warning("malformed frame", "dropped a lane from %s: %s", peer, exc)
            return
        if not self._lanes.open_out(peer, tag, worker.hex()):
            self.stats["lanes_refused"] += 1
            return
        if reply:
            self._open_lane(peer, reply=False)

    def _lane_send(self, peer: str, kind: bytes, first: bytes, rest: bytes) -> bool:
        """Send ``first + rest`` on ``peer``'s lane; False when it has none (yet), or
        the message is too large for it: then it goes over ZMQ."""
        out = self._lanes.usable(peer)
        if out is None or not fits(first, rest):
            return False
        message = pack_lane(kind, out.sent, first, rest)
        try:
            endpoint = self._endpoint(out.worker)
            request = endpoint.tag_send(Array(message), libucxx.UCXXTag(out.tag))
        except (TransportError, libucxx.UCXError):  # the peer's worker is gone: ZMQ says so
            return False
        self._endpoint_peers.setdefault(out.worker, peer)
        self._lane_sends.append((request, message))
        self.stats["lane_sent"] += 1
        return True

    def _send_ack(self, peer: str, header: bytes, error: bytes) -> None:
        if not self._lane_send(peer, ACK, header, error):
            super()._send_ack(peer, header, error)

    def _post(self, peer: str, frames: list[Any], *, copy: bool = True) -> bool:
        """As the base class's; a peer with a lane to us gets the kind stamped (its
        epoch and this message's sequence number, ``ucx_lane.stamp``)."""
        if peer not in self._lanes.outs:
            return super()._post(peer, frames, copy=copy)
        kind = self._lanes.stamp_for(peer, frames[0])
        sent = False
        try:
            sent = super()._post(peer, [kind, *frames[1:]], copy=copy)
        finally:
            if not sent:
                self._lanes.unsent(peer, kind)
        return sent

    def _unstamp(self, peer: str, kind: bytes) -> bytes:
        stamped = unstamp(kind)
        if stamped is None:
            return kind  # not a stamp: the base class drops the unknown kind
        self._lanes.hear(peer, stamped[1], stamped[2])
        return stamped[0]

    def _handle(self, peer: str) -> None:
        super()._handle(peer)
        if peer in self._lanes.held:  # what waited for this message goes after it
            self._release(peer)

    def _take_lanes(self) -> None:
        """Handle the lane messages that arrived, each lane's in order, reposting
        each receive (at most a batch per lane and turn). A lane's tag was told
        over the control channel, so what comes on it proves its peer alive."""
        self._trusted = True
        for peer, lane in list(self._lanes.ins.items()):
            for _ in range(_LANE_TURN):
                request, buffer = lane.receives[0]
                if not request.completed:
                    break
                lane.receives.popleft()
                message: LaneMessage | None = None
                if request.status == _UCS_OK:
                    with contextlib.suppress(ValueError):
                        message = unpack_lane(buffer)  # copied out: the buffer is free again
                lane.receives.append((self._post_lane_receive(lane.tag, buffer), buffer))
                if message is None:
                    self.stats["malformed"] += 1
                    self._warn.warning(
                        "malformed frame", "dropped a malformed lane message from %s", peer
                    )
                    continue
                self.stats["lane_received"] += 1
                self._take_lane_message(peer, message)
                if self._lanes.ins.get(peer) is not lane:  # dropped while handling it
                    break

    def _take_lane_message(self, peer: str, message: LaneMessage) -> None:
        if message.kind == REQUEST:
            self._take_request(peer, message.first, message.rest or None, message.after)
        elif self._lanes.heard(peer, message.after):
            self._take_ack(peer, message.first, message.rest)
        else:
            self._early_ack(peer, message)

    def _early_ack(self, peer: str, message: LaneMessage) -> None:
        """An acknowledgement that came before the ZMQ messages sent ahead of it: it
        waits if it is the first for a write pending to ``peer`` (so what waits is
        bounded by the writes in flight); a repeat is dropped; anything else goes
        to :meth:`_take_ack`, which counts a malformed one and ignores the rest."""
        header = message.first
        if len(header) == _ACK.size:
            write_id = _ACK.unpack(header)[0]
            if write_id in self._held_acks:
                return
            pending = self._pending.get(write_id)
            if pending is not None and pending.peer == peer:
                self._held_acks.add(write_id)
                self._hold(peer, Held(message.after, ack=(header, message.rest)))
                return
        self._take_ack(peer, header, message.rest)

    def _hand_on(self, peer: str, notice: bytes, after: int | None) -> None:
        """Hand a landed write's notice to the owner, once every ZMQ message its
        writer sent before the lane request has been heard."""
        if after is None or self._lanes.heard(peer, after):
            self._notice_bytes -= len(notice)
            self._events.append(MessageReceived(peer, notice))
        else:
            self._hold(peer, Held(after, notice=notice))

    def _hold(self, peer: str, item: Held) -> None:
        """Keep ``item`` until its earlier ZMQ messages are heard (at most the write
        time-out); past ``MAX_HELD`` items, hand it on now (``lane_unheld``)."""
        item.deadline = time.monotonic() + self._write_timeout
        if self._lanes.hold(peer, item):
            self.stats["lane_held"] += 1
        else:
            self.stats["lane_unheld"] += 1
            self._apply(peer, item)

    def _release(self, peer: str) -> None:
        for item in self._lanes.ready(peer, time.monotonic()):
            self._apply(peer, item)

    def _apply(self, peer: str, item: Held) -> None:
        if item.notice is not None:
            self._notice_bytes -= len(item.notice)
            self._events.append(MessageReceived(peer, item.notice))
        if item.ack is not None:
            self._held_acks.discard(_ACK.unpack(item.ack[0])[0])
            self._take_ack(peer, *item.ack)

    def _drop_lanes(self, peer: str) -> None:
        """Forget ``peer``'s lanes (it is gone): retire the receives, drop what was held."""
        lane, held = self._lanes.drop(peer)
        for item in held:
            if item.notice is not None:
                self._notice_bytes -= len(item.notice)
            if item.ack is not None:
                self._held_acks.discard(_ACK.unpack(item.ack[0])[0])
        if lane is not None:
            self._retire_receives(lane)

    def _retire_receives(self, lane: LaneIn) -> None:
        """Complete a lane's posted receives with empty messages from this worker;
        their buffers stay alive until they have."""
        for request, buffer in lane.receives:
            if not request.completed:
                self._retiring.append(self._self_send(lane.tag))
            self._retired.append((request, buffer))
        lane.receives.clear()

    def _self_send(self, tag: int) -> Any:
        """An empty message from this worker to itself (it completes a receive)."""
        if self._self_endpoint is None:
            self._self_endpoint = self._worker.create_endpoint_from_worker_address(
                self._worker.address, True
            )
        return self._self_endpoint.tag_send(Array(_EMPTY), libucxx.UCXXTag(tag))

    # -- progress ----------------------------------------------------------------
    def _transfers_running(self) -> bool:
        return bool(self._sends or self._active)

    def _wait_ms(self, timeout: float) -> int:
        if self._polling and self._transfers_running():
            return 0
        # Sleep on UCX's event fd only when the worker says nothing is pending.
        return max(0, int(timeout * 1000)) if self._worker.arm() else 0

    def _progress_engine(self) -> None:
        worker = self._worker
        while worker.progress_once():
            pass
        if self._lanes.ins:
            self._take_lanes()
        self._collect()
        if self._incoming:
            self._expire_receives(time.monotonic())
        if self._lanes.held:
            for peer, item in self._lanes.expired(time.monotonic()):
                self._apply(peer, item)  # its earlier ZMQ messages are taken as lost
        sends = self._lane_sends
        while sends and sends[0][0].completed:  # they complete about in order: kept till then
            sends.popleft()
        if self._retired:
            self._retired = [(r, b) for r, b in self._retired if not r.completed]
            self._retiring = [r for r in self._retiring if not r.completed]

    def _collect(self) -> None:
        """Take the sends and receives completed since the last look: a write whose
        sends all completed is done; a batch whose receives all did is answered."""
        for write_id, requests in list(self._sends.items()):
            # from the first send not seen completed on: each send is looked at until it
            # completes, not on every turn (a paged write has thousands)
            done = self._sends_done.get(write_id, 0)
            while done < len(requests) and requests[done].completed:
                done += 1
            if done < len(requests):
                self._sends_done[write_id] = done
                continue
            del self._sends[write_id]
            self._sends_done.pop(write_id, None)
            failed = next((r for r in requests if r.status != _UCS_OK), None)
            if failed is not None:
                why = _request_error(failed) or f"status {failed.status}"
                self._finish(write_id, f"UCX send failed: {why}")
        if self._active:
            for batch in list(self._active):
                self._take_completed(batch)
            self._active = [b for b in self._active if b.head < len(b.receives)]
            self.stats["receives_posted"] = self._waiting_count

    def _take_completed(self, batch: _Incoming) -> None:
        """Count the batch's receives completed since the last look, in order; answer
        the writer once all are."""
        receives = batch.receives
        start = head = batch.head
        while head < len(receives) and receives[head].request.completed:
            head += 1
        if head == start:
            return
        taken = receives[start:head]
        batch.head = head
        count = head - start
        self._waiting_count -= count
        batch.remaining -= count
        left = self._posted.get(batch.peer, 0) - count
        if left > 0:
            self._posted[batch.peer] = left
        else:
            self._posted.pop(batch.peer, None)
        if batch.error is None:  # a scratch receive (no region) truncates: not an error
            failed = next(
                (r for r in taken if r.region_id is not None and r.request.status != _UCS_OK),
                None,
            )
            if failed is not None:
                batch.error = _request_error(failed.request) or f"status {failed.request.status}"
        if self._parked:
            for region_id in {r.region_id for r in taken if r.region_id is not None}:
                self._unpark(region_id)
        if batch.remaining == 0 and not batch.answered:
            batch.answered = True
            self._acknowledge(batch.peer, batch.write_id, batch.error)
            if batch.notice is not None:
                if batch.error is None:
                    self._hand_on(batch.peer, batch.notice, batch.after)
                else:
                    self._notice_bytes -= len(batch.notice)
                batch.notice = None
        if batch.head == len(receives):
            batch.receives = []  # every buffer UCX wrote into is done with

    def _unpark(self, region_id: int) -> None:
        if region_id in self._parked and not any(
            r.region_id == region_id and not r.request.completed for r in self._waiting_receives()
        ):
            segment, reuse = self._parked.pop(region_id)
            if segment is not None:
                self._pool.release(segment, reuse=reuse)

    def close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(Exception):
            self._worker.cancel_inflight_requests(0, 1)
        deadline = time.monotonic() + 1.0
        while self._transfers_running() and time.monotonic() < deadline:
            self._worker.progress_once()
            self._collect()
        for worker_hex in list(self._endpoints):
            self._close_endpoint(worker_hex)
        self._endpoint_peers.clear()
        if self._self_endpoint is not None:
            with contextlib.suppress(Exception):
                self._self_endpoint.close()
            self._self_endpoint = None
        self._incoming.clear()
        self._posted.clear()
        for peer in list(self._lanes.ins) + list(self._lanes.outs):
            self._lanes.drop(peer)
        self._lane_sends.clear()
        self._retired.clear()
        self._held_acks.clear()
        self._notice_bytes = 0
        with contextlib.suppress(Exception):
            self._poller.unregister(self._worker.epoll_file_descriptor)
        for segment, _ in self._parked.values():
            if segment is not None:
                self._pool.release(segment, reuse=False)
        self._parked.clear()
        self._sends.clear()
        self._sends_done.clear()
        self._active.clear()
        super().close()


_EMPTY = np.empty(0, dtype=np.uint8)


def _sliceable(data: torch.Tensor) -> Any:
    """What slices of ``data`` that UCXX's Array takes are cut from: a NumPy view of
    host memory (slicing it is cheap), the tensor itself for device memory (its
    slices have ``__cuda_array_interface__``)."""
    return data.numpy() if data.device.type == "cpu" else data


def _request_error(request: Any) -> str | None:
    try:
        request.check_error()
    except Exception as exc:  # UCXX raises its own exception classes
        return f"{type(exc).__name__}: {exc}"
    return None
