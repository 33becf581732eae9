"""Peers and their liveness: what proves a peer alive, when silence is judged.

This module owns the rule; the endpoint's I/O loop only reports what it saw
and acts on the verdicts.

* A peer is *watched* while it shares an unfinished room with this endpoint.
* **Anything that arrives from it proves it alive**: every decoded control
  message (a heartbeat or its answer, a chunk, a bootstrap, ...) and whatever
  its transport reports it heard from it (pieces of a write, a write's
  answer, a grant: :class:`~kvpoll.transports.PeerActive`). A peer busy
  sending data is heard through its data.
* Every ``interval`` seconds each watched peer is sent a heartbeat.
* A peer is **silent** when nothing came from it for ``misses`` intervals
  **and** at least ``misses`` heartbeats went to it since it was last heard.
  Time this endpoint spent busy elsewhere (no heartbeat went out) never
  counts against a peer: a busy peer, or a busy self, is not a dead peer.
* Silence is judged only after the turn's input has been read (the I/O loop
  reads, handles, sends, then judges time), so a burst that arrived while
  this endpoint was busy is seen before anyone is judged.

What follows a verdict (every unfinished room the peer shares fails, and the
peer is told so it fails them too: see docs/state-machine.md, "How a room
ends on both sides") is the endpoint's.

A peer that shares no unfinished room is no longer watched; once it has shared
none for :data:`IDLE_ROUNDS` intervals it is *idle*, and the endpoint lets its
transport release what it holds for it (a socket, a peer's shared memory
mapped here): a peer that died after its last room ended is never judged, so
without this its memory would stay mapped for good.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = ["IDLE_ROUNDS", "Liveness", "Lost"]

IDLE_ROUNDS = 50
"""Intervals a peer shares no unfinished room before it is released as idle."""


@dataclass
class _Watched:
    last_heard: float
    rooms: set[int] = field(default_factory=set)
    unanswered: int = 0  # heartbeats sent since it was last heard


@dataclass(frozen=True)
class Lost:
    """A peer judged silent: the rooms it shared and why."""

    peer: str
    rooms: frozenset[int]
    why: str


class Liveness:
    """The watched peers of one endpoint, and the judgement of their silence.

    Not thread-safe: the endpoint's I/O thread (holding its lock) is the only caller.

    Args:
        interval: seconds between heartbeats to each watched peer (> 0).
        misses: heartbeats a peer may leave unanswered (>= 1); silence is
            judged over ``interval * misses`` seconds.
    """

    def __init__(self, interval: float, misses: int) -> None:
        self.interval = interval
        self.misses = misses
        self._peers: dict[str, _Watched] = {}
        self._idle: dict[str, float] = {}  # peers no longer watched -> since when
        self._next_beat: float | None = None

    @property
    def window(self) -> float:
        """Seconds of silence (with ``misses`` heartbeats unanswered) that make a peer lost."""
        return self.interval * self.misses

    def watch(self, peer: str, room: int, now: float) -> None:
        """``room`` is shared with ``peer``: watch it (a new peer counts as heard now)."""
        watched = self._peers.get(peer)
        if watched is None:
            watched = self._peers[peer] = _Watched(now)
            self._idle.pop(peer, None)
        watched.rooms.add(room)

    def unwatch(self, peers: Iterable[str], room: int) -> None:
        """``room`` is gone; its peers are no longer watched for it."""
        for peer in peers:
            watched = self._peers.get(peer)
            if watched is not None:
                watched.rooms.discard(room)

    def forget(self, peer: str) -> frozenset[int]:
        """Stop watching ``peer``; the rooms it shared (empty if it was not watched)."""
        self._idle.pop(peer, None)
        watched = self._peers.pop(peer, None)
        return frozenset(watched.rooms) if watched is not None else frozenset()

    def idle(self, now: float) -> list[str]:
        """Peers that shared no unfinished room for :data:`IDLE_ROUNDS` intervals,
        each reported once (then forgotten here)."""
        grace = IDLE_ROUNDS * self.interval
        gone = [peer for peer, since in self._idle.items() if now - since >= grace]
        for peer in gone:
            del self._idle[peer]
        return gone

    def heard(self, peer: str, now: float) -> None:
        """Something came from ``peer``: it is alive (a peer not watched is ignored)."""
        watched = self._peers.get(peer)
        if watched is not None:
            watched.last_heard = now
            watched.unanswered = 0

    def watched(self, peer: str) -> bool:
        """Whether ``peer`` shares an unfinished room (as far as this module knows)."""
        return peer in self._peers

    def due(self, now: float) -> bool:
        """Whether a round of heartbeats (and the judgement of silence) is due."""
        if self._next_beat is None:
            self._next_beat = now + self.interval
        return now >= self._next_beat

    def until_due(self, now: float) -> float:
        """Seconds until the next round (0 when due)."""
        if self._next_beat is None:
            return self.interval
        return max(0.0, self._next_beat - now)

    def beat(self, now: float, live: Callable[[int], bool]) -> tuple[list[str], list[Lost]]:
        """One round: (peers to send a heartbeat now, peers judged silent).

        ``live(room)`` says whether a room is still open and unfinished; a
        peer left with no such room is no longer watched. A peer judged
        silent is no longer watched either.
        """
        self._next_beat = now + self.interval
        ping: list[str] = []
        lost: list[Lost] = []
        for peer, watched in list(self._peers.items()):
            watched.rooms = {room for room in watched.rooms if live(room)}
            if not watched.rooms:
                del self._peers[peer]
                self._idle[peer] = now
                continue
            silent = now - watched.last_heard
            if silent > self.window and watched.unanswered >= self.misses:
                del self._peers[peer]
                why = (
                    f"was silent for {silent:.1f} s ({watched.unanswered} heartbeats of "
                    f"{self.interval:g} s unanswered)"
                )
                lost.append(Lost(peer, frozenset(watched.rooms), why))
            else:
                watched.unanswered += 1
                ping.append(peer)
        return ping, lost
