"""The ucx transport's lane: write requests and acknowledgements as UCX messages.

A write's request (and the notice riding with it) and the destination's
acknowledgement travel as tagged UCX messages on the same UCX endpoint as the
data, instead of over the ZMQ control channel (a UCX hop measured about a third
of a ZMQ hop on one host). Two rules keep that safe:

* **Only a known peer's lane is read.** A transport posts lane receives for a
  peer only after that peer asked for a lane over the control channel (CURVE
  authenticated with a cluster secret), on a random 63-bit tag it tells the peer
  there and nobody else; the data tags of :class:`UcxTransport` never have the
  top bit set, so the two never meet. Whatever arrives on a lane is checked as a
  ZMQ request is: it can only name regions registered here.
* **Never ahead of the control messages sent before it.** A lane message must
  not overtake what its sender sent earlier over ZMQ (a chunk notice handled
  before an earlier ``bootstrap_ack`` would be an illegal step). Once a peer
  has a lane to us it stamps each ZMQ message it sends us with the lane's epoch
  and a sequence number (12 bytes after the frame's kind), and each lane message
  with the number of its last stamped ZMQ message (``after``). We hand a lane
  message's notice or acknowledgement on only once we have heard that ZMQ
  message (or a later one: a message lost with a broken connection is not
  waited for), or after the write time-out. A peer uses its lane only after it
  has stamped at least one ZMQ message, so every unstamped message it sent
  before is known to have arrived.

Frames (lane messages are ``_HEAD`` then the body; ``length`` counts the body):

* ``L tag reply worker`` over ZMQ: "send me lane messages on ``tag`` (my
  worker's address follows)"; ``reply=1`` asks the peer to open a lane back.
* ``U``: a write request, then its notice (``request_length`` says where the
  request ends), as :meth:`UcxTransport._take_request` reads it.
* ``A``: an acknowledgement (the ZMQ ``A`` header, then the error's text).
"""

from __future__ import annotations

import secrets
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "ACK",
    "ANNOUNCE",
    "LANE_BYTES",
    "LANE_RECEIVES",
    "MAX_HELD",
    "REQUEST",
    "Held",
    "LaneIn",
    "LaneMessage",
    "Lanes",
    "epoch_of",
    "fits",
    "new_tag",
    "pack_announce",
    "pack_lane",
    "stamp",
    "unpack_announce",
    "unpack_lane",
    "unstamp",
]

LANE_BYTES = 16 << 10
"""The largest lane message; a request with its notice past it goes over ZMQ."""
LANE_RECEIVES = 4
"""Receives kept posted on each lane (messages queue in UCX past them)."""
MAX_HELD = 65_536
"""Lane messages' notices and acknowledgements waiting at once, over all peers;
past it one is handed on without waiting (as if it had come over ZMQ)."""
ANNOUNCE = b"L"
REQUEST, ACK = b"U", b"A"
_HEAD = struct.Struct("<cxxxIIQ")  # kind, body length, request length (U), after
_ANNOUNCE = struct.Struct("<QB")  # tag, reply
_STAMP = struct.Struct("<IQ")  # lane epoch, sequence number
_MAX_WORKER_BYTES = 4096
_TOP = 1 << 63


def new_tag() -> int:
    """A lane tag: the top bit set (no data tag has it), 63 random bits."""
    return _TOP | secrets.randbits(63)


def epoch_of(tag: int) -> int:
    return tag & 0xFFFFFFFF


def pack_announce(tag: int, reply: bool, worker: bytes) -> bytes:
    return _ANNOUNCE.pack(tag, reply) + worker


def unpack_announce(body: bytes) -> tuple[int, bool, bytes]:
    """(tag, reply, worker address) of an ``L`` body.

    Raises:
        ValueError: a malformed body.
    """
    if not _ANNOUNCE.size < len(body) <= _ANNOUNCE.size + _MAX_WORKER_BYTES:
        raise ValueError(f"a lane announcement of {len(body)} bytes")
    tag, reply = _ANNOUNCE.unpack_from(body)
    if not tag & _TOP or reply not in (0, 1):
        raise ValueError("a lane announcement with a bad tag or flag")
    return tag, bool(reply), body[_ANNOUNCE.size :]


def fits(first: bytes, rest: bytes) -> bool:
    """Whether a lane message of ``first`` and ``rest`` fits a lane's receive."""
    return _HEAD.size + len(first) + len(rest) <= LANE_BYTES


def pack_lane(kind: bytes, after: int, first: bytes, rest: bytes = b"") -> bytes:
    """A lane message: ``first`` (a request, or an ack header) then ``rest``."""
    return _HEAD.pack(kind, len(first) + len(rest), len(first), after) + first + rest


@dataclass(frozen=True)
class LaneMessage:
    kind: bytes
    after: int
    first: bytes
    rest: bytes


def unpack_lane(buffer: Any) -> LaneMessage:
    """The message a lane receive took into ``buffer`` (a NumPy byte array).

    Raises:
        ValueError: a malformed message.
    """
    if len(buffer) < _HEAD.size:
        raise ValueError("a lane message shorter than its header")
    kind, length, first, after = _HEAD.unpack_from(buffer)
    if kind not in (REQUEST, ACK) or length > len(buffer) - _HEAD.size or first > length:
        raise ValueError("a malformed lane message")
    body = buffer[_HEAD.size : _HEAD.size + length].tobytes()
    return LaneMessage(kind, after, body[:first], body[first:])


def stamp(kind: bytes, tag: int, seq: int) -> bytes:
    """A frame kind stamped with the lane's epoch and a sequence number."""
    return kind + _STAMP.pack(epoch_of(tag), seq)


def unstamp(kind: bytes) -> tuple[bytes, int, int] | None:
    """(kind, epoch, sequence number) of a stamped kind; None if it is not one."""
    if len(kind) != 1 + _STAMP.size:
        return None
    epoch, seq = _STAMP.unpack_from(kind, 1)
    return kind[:1], epoch, seq


@dataclass
class LaneIn:
    """Lane receives posted for one peer: a ring of buffers, matched in order."""

    tag: int
    receives: deque[tuple[Any, Any]] = field(default_factory=deque)  # (request, buffer)
    heard: int = 0  # the last stamped ZMQ message heard from the peer in this epoch


@dataclass
class Held:
    """A lane message's effect waiting for the ZMQ message it came after."""

    after: int
    notice: bytes | None = None
    ack: tuple[bytes, bytes] | None = None  # (header, error) of an acknowledgement
    deadline: float = float("inf")  # set when it starts waiting


@dataclass
class _LaneOut:
    tag: int
    worker: str  # hex
    sent: int = 0  # stamped ZMQ messages sent in this epoch


class Lanes:
    """Every lane of one transport: those we read (``ins``), those we write
    (``outs``), and what waits for earlier ZMQ messages (``held``).

    Bounded: at most ``max_lanes`` each way; a peer past it keeps the control
    channel for everything.
    """

    def __init__(self, max_lanes: int) -> None:
        self._max = max_lanes
        self.ins: dict[str, LaneIn] = {}
        self.outs: dict[str, _LaneOut] = {}
        self.held: dict[str, deque[Held]] = {}
        self.asked: set[str] = set()  # peers we asked for a lane (ins made for them)
        self.held_count = 0

    # -- reading ------------------------------------------------------------------
    def open_in(self, peer: str, post: Any) -> int | None:
        """A new lane for ``peer`` to write to us; its tag, or None past the
        limit. ``post(tag, buffer)`` posts one receive."""
        if peer not in self.ins and len(self.ins) >= self._max:
            return None
        lane = LaneIn(new_tag())
        for _ in range(LANE_RECEIVES):
            buffer = np.empty(LANE_BYTES, dtype=np.uint8)
            lane.receives.append((post(lane.tag, buffer), buffer))
        self.ins[peer] = lane
        return lane.tag

    def hear(self, peer: str, epoch: int, seq: int) -> bool:
        """Note a stamped ZMQ message from ``peer``; True when something held for
        it may now go."""
        lane = self.ins.get(peer)
        if lane is None or epoch != epoch_of(lane.tag) or seq <= lane.heard:
            return False
        lane.heard = seq
        return peer in self.held

    def heard(self, peer: str, after: int) -> bool:
        """Whether every ZMQ message ``peer`` sent before ``after`` has been heard."""
        lane = self.ins.get(peer)
        return lane is not None and lane.heard >= after

    def hold(self, peer: str, item: Held) -> bool:
        """Keep ``item`` until what it came after is heard; False past :data:`MAX_HELD`."""
        if self.held_count >= MAX_HELD:
            return False
        self.held.setdefault(peer, deque()).append(item)
        self.held_count += 1
        return True

    def ready(self, peer: str, now: float) -> list[Held]:
        """Held items of ``peer`` that may go now, in order."""
        queue = self.held.get(peer)
        if not queue:
            return []
        out: list[Held] = []
        while queue and (self.heard(peer, queue[0].after) or now >= queue[0].deadline):
            out.append(queue.popleft())
        if not queue:
            del self.held[peer]
        self.held_count -= len(out)
        return out

    def take_held(self, peer: str) -> list[Held]:
        """Every item held for ``peer``, now."""
        out = list(self.held.pop(peer, ()))
        self.held_count -= len(out)
        return out

    # -- writing ------------------------------------------------------------------
    def open_out(self, peer: str, tag: int, worker: str) -> bool:
        """``peer`` told us its lane; False past the limit."""
        out = self.outs.get(peer)
        if out is not None and out.tag == tag:  # told again: the numbering goes on
            out.worker = worker
            return True
        if out is None and len(self.outs) >= self._max:
            return False
        self.outs[peer] = _LaneOut(tag, worker)
        return True

    def stamp_for(self, peer: str, kind: bytes) -> bytes:
        """``kind`` stamped for ``peer`` when it has a lane to us, else as it is."""
        out = self.outs.get(peer)
        if out is None:
            return kind
        out.sent += 1
        return stamp(kind, out.tag, out.sent)

    def unsent(self, peer: str, kind: bytes) -> None:
        """The stamped message ``kind`` was not sent after all."""
        out = self.outs.get(peer)
        if out is not None and len(kind) > 1:
            out.sent -= 1

    def usable(self, peer: str) -> _LaneOut | None:
        """The lane to write ``peer`` on, once a stamped ZMQ message preceded it."""
        out = self.outs.get(peer)
        return out if out is not None and out.sent > 0 else None

    # -- ends ---------------------------------------------------------------------
    def drop(self, peer: str) -> tuple[LaneIn | None, list[Held]]:
        """Forget ``peer``'s lanes; the lane whose receives the caller retires and
        what was held (dropped: the peer is gone)."""
        self.outs.pop(peer, None)
        self.asked.discard(peer)
        return self.ins.pop(peer, None), self.take_held(peer)

    def expired(self, now: float) -> list[tuple[str, Held]]:
        """Held items past their deadline, over all peers."""
        out: list[tuple[str, Held]] = []
        for peer in list(self.held):
            queue = self.held[peer]
            if queue and now >= queue[0].deadline:
                out.extend((peer, item) for item in self.ready(peer, now))
        return out
