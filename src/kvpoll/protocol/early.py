"""Bootstraps that came before their room was added at the sender (open before add).

A receiver may bootstrap before the sender's ``add()``: its bootstrap waits
here until the room is added (then it is taken), or until the Bootstrapping
time-out has passed since **it** arrived (then it is refused). Anyone who can
reach the sender can send these, so the table is bounded every way:

* rooms waited on (``PENDING_ROOMS``), their cost (``PENDING_COST``: page runs
  and the bytes of an inline region's description), bootstraps for one room
  (``PENDING_PER_ROOM``) and from one peer for one room
  (``PENDING_PER_ROOM_PEER``);
* past a limit, the peer holding the most gives way: if the asker would hold
  as much, the asker is refused (so a flood of peers that each hold little
  never evicts one that came earlier); else that peer's **newest** entry is
  dropped (and refused). A flood never crowds out an earlier bootstrap.

Not thread-safe: the sender's I/O thread is the only caller.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from kvpoll.protocol.messages import Bootstrap

__all__ = [
    "PENDING_COST",
    "PENDING_PER_ROOM",
    "PENDING_PER_ROOM_PEER",
    "PENDING_ROOMS",
    "EarlyBootstraps",
    "cost",
]

PENDING_ROOMS = 10_000
"""Rooms with bootstraps waiting for :meth:`Sender.add`, at most (over all peers)."""
PENDING_COST = 1 << 19
"""What the waiting bootstraps may hold in all: one unit per page run, and one
per 64 bytes of an inline region's description (about 50 MB)."""
PENDING_PER_ROOM = 256
"""Bootstraps waiting for one room (one per rank), at most."""
PENDING_PER_ROOM_PEER = 64
"""Bootstraps one peer may have waiting for one room (its ranks), at most."""
_DESCRIPTION_UNIT = 64


def cost(message: Bootstrap) -> int:
    """What a waiting bootstrap holds, in units (see :data:`PENDING_COST`)."""
    units = 1 + len(message.pages or ())
    if message.region is not None and message.region.extra:
        units += len(json.dumps(message.region.extra)) // _DESCRIPTION_UNIT
    return units


@dataclass(eq=False)
class _Early:
    peer: str
    message: Bootstrap
    at: float
    cost: int
    waiting: bool = True


class EarlyBootstraps:
    """The bootstraps waiting for their rooms, and the rules that bound them."""

    def __init__(
        self,
        *,
        max_rooms: int = PENDING_ROOMS,
        max_cost: int = PENDING_COST,
        per_room: int = PENDING_PER_ROOM,
        per_room_peer: int = PENDING_PER_ROOM_PEER,
    ) -> None:
        self.max_rooms, self.max_cost = max_rooms, max_cost
        self.per_room, self.per_room_peer = per_room, per_room_peer
        self._rooms: dict[int, list[_Early]] = {}
        self._peers: dict[str, list[int]] = {}  # peer -> [rooms it waits on, cost it holds]
        self._cost = 0
        self._order: deque[_Early] = deque()  # by arrival (expiry), entries taken stay
        self._live = 0

    def __len__(self) -> int:
        """Rooms waited on."""
        return len(self._rooms)

    @property
    def cost(self) -> int:
        """What the waiting bootstraps hold, in units."""
        return self._cost

    def add(
        self, peer: str, message: Bootstrap, now: float
    ) -> tuple[str | None, list[tuple[str, Bootstrap]]]:
        """Keep ``message`` until its room is added. Returns (why it is refused, or
        None; the bootstraps dropped to make room for it, to be refused)."""
        room, units = message.room, cost(message)
        entries = self._rooms.get(room, [])
        dropped: list[tuple[str, Bootstrap]] = []
        if sum(e.peer == peer for e in entries) >= self.per_room_peer:
            return f"{self.per_room_peer} bootstraps from {peer} already wait for room {room}", []
        if len(entries) >= self.per_room:
            counts: dict[str, int] = {}
            for e in entries:
                counts[e.peer] = counts.get(e.peer, 0) + 1
            victim = _victim(counts, counts.get(peer, 0) + 1, reversed(entries))
            if victim is None:
                return f"{self.per_room} bootstraps already wait for room {room}", []
            dropped.append(self._drop(victim))
            entries = self._rooms.get(room, [])
        while (room not in self._rooms and len(self._rooms) >= self.max_rooms) or (
            self._cost + units > self.max_cost
        ):
            by_rooms = self._cost + units <= self.max_cost
            at = 0 if by_rooms else 1
            held = self._peers.get(peer, [0, 0])
            mine = held[1] + units if at else held[0] + all(e.peer != peer for e in entries)
            weights = {p: h[at] for p, h in self._peers.items()}
            victim = _victim(weights, mine, reversed(self._order))
            if victim is None:
                return (
                    f"too many bootstraps wait for rooms not added yet ({self.max_rooms} rooms "
                    f"or {self.max_cost} units), and {peer} holds as many as anyone"
                ), dropped
            dropped.append(self._drop(victim))
            entries = self._rooms.get(room, [])
        early = _Early(peer, message, now, units)
        held = self._peers.setdefault(peer, [0, 0])
        held[0] += all(e.peer != peer for e in entries)
        held[1] += units
        self._cost += units
        self._rooms.setdefault(room, []).append(early)
        self._order.append(early)
        self._live += 1
        return None, dropped

    def take(self, room: int) -> list[tuple[str, Bootstrap]]:
        """The room's waiting bootstraps, in the order they came; the room leaves."""
        entries = self._rooms.get(room, [])
        return [self._drop(e) for e in list(entries)]

    def expire(self, now: float, limit: float) -> list[tuple[str, Bootstrap]]:
        """Bootstraps that waited ``limit`` seconds since each came, taken off."""
        late = []
        while self._order and (not self._order[0].waiting or now - self._order[0].at >= limit):
            early = self._order.popleft()
            if early.waiting:
                late.append(self._drop(early))
        return late

    # -- inside ----------------------------------------------------------------------
    def _drop(self, early: _Early) -> tuple[str, Bootstrap]:
        """Take an entry off the table (``_order`` forgets it lazily)."""
        room = early.message.room
        entries = self._rooms[room]
        entries.remove(early)
        early.waiting = False
        self._live -= 1
        self._cost -= early.cost
        held = self._peers[early.peer]
        held[1] -= early.cost
        if all(e.peer != early.peer for e in entries):
            held[0] -= 1
        if held[0] <= 0:
            del self._peers[early.peer]
        if not entries:
            del self._rooms[room]
        if len(self._order) > 2 * self._live + 1024:  # a flood's taken entries
            self._order = deque(e for e in self._order if e.waiting)
        return early.peer, early.message


def _victim(weights: dict[str, int], mine: int, newest_first: Iterable[_Early]) -> _Early | None:
    """The newest waiting entry of a peer holding the most (by ``weights``), if it
    holds more than the asker would (``mine``); None: the asker gives way."""
    top = max(weights.values(), default=0)
    if top <= mine:
        return None
    heavy = {p for p, w in weights.items() if w == top}
    return next((e for e in newest_first if e.waiting and e.peer in heavy), None)
