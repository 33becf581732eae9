"""Many rooms behind one lock: the SGLang-shaped view of transfer statuses.

A serving engine asks "what is room N's status?" from its scheduler thread
while I/O threads report progress. :class:`RoomRegistry` serves both, checks
every reported step against the table, combines the reports of several
destinations (fan-in), and fails rooms that stay too long in one status.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from kvpoll.errors import DuplicateRoom, IllegalTransition, InvalidArgument, UnknownRoom
from kvpoll.statemachine.deadlines import DEFAULT_TIMEOUTS, Deadlines, Timeouts, check_timeouts
from kvpoll.statemachine.state import Transition
from kvpoll.statemachine.status import Event, TransferStatus, parse_status
from kvpoll.statemachine.table import default_table

__all__ = ["DEFAULT_TIMEOUTS", "RegistryStats", "RoomRegistry"]

log = logging.getLogger("kvpoll.registry")

_TABLE = default_table()
_FAILED = TransferStatus.Failed
_RANK = {s: i for i, s in enumerate(_TABLE.order)}
# (source, dest) -> the first event that produces that step, derived from the table.
_PAIR: dict[tuple[TransferStatus, TransferStatus], Event] = {}
for (_src, _ev), _dst in _TABLE.next.items():
    _PAIR.setdefault((_src, _dst), _ev)


@dataclass(frozen=True)
class RegistryStats:
    """Counters of a :class:`RoomRegistry` (a snapshot)."""

    rooms: int
    """Rooms registered now."""
    unknown_updates: int
    """Updates for rooms not registered (late messages), dropped."""
    illegal_updates: int
    """Updates rejected with IllegalTransition."""
    timeouts: int
    """Rooms failed because they stayed too long in one status."""


class _Room:
    __slots__ = ("dests", "history", "reason", "status")

    def __init__(
        self,
        status: TransferStatus,
        dests: list[TransferStatus] | None,
        history: list[Transition] | None,
    ) -> None:
        self.status = status
        self.dests = dests
        self.reason: str | None = None
        self.history = history


ROOM_IDS = range(-(2**63), 2**63)
"""Room ids: 64-bit signed integers, on every side and on the wire."""


def check_room_id(room: object) -> int:
    """``room`` if it is a room id (an int in :data:`ROOM_IDS`).

    Raises:
        InvalidArgument: anything else, naming it.
    """
    if isinstance(room, bool) or not isinstance(room, int):
        raise InvalidArgument(f"room must be an int, not {type(room).__name__}")
    if room not in ROOM_IDS:
        raise InvalidArgument(f"room {room} is outside the room ids (-2**63 .. 2**63-1)")
    return room


class RoomRegistry:
    """Thread-safe statuses of many rooms, each step checked against the table.

    Args:
        timeouts: seconds a room may stay in each non-final status without a
            step (a self-step such as another chunk restarts the clock); None
            for a status means no limit. Statuses not named keep
            :data:`DEFAULT_TIMEOUTS`.
        clock: monotonic seconds; injectable so time-outs can be driven in tests.
        history: keep each room's applied steps (about 100 bytes a step).

    Time-outs are enforced lazily on every access to a room and in bulk by
    :meth:`expire`, which an I/O loop calls periodically.
    """

    def __init__(
        self,
        *,
        timeouts: Timeouts | None = None,
        clock: Callable[[], float] = time.monotonic,
        history: bool = False,
    ) -> None:
        self._deadlines: Deadlines[int] = Deadlines(check_timeouts(timeouts))
        self._clock = clock
        self._history = history
        self._rooms: dict[int, _Room] = {}
        self._lock = threading.Lock()
        self._unknown_updates = 0
        self._illegal_updates = 0
        self._timeouts_fired = 0

    # -- rooms -------------------------------------------------------------
    def add(self, room: int, required_destinations: int = 1) -> None:
        """Register a room in Bootstrapping.

        Args:
            room: the room id.
            required_destinations: how many destinations must report each step
                before the room takes it (fan-in).

        Raises:
            DuplicateRoom: the id is already registered.
            InvalidArgument: a non-int id, or fewer than one destination.
        """
        check_room_id(room)
        if (
            isinstance(required_destinations, bool)
            or not isinstance(required_destinations, int)
            or required_destinations < 1
        ):
            raise InvalidArgument(
                f"room {room}: required_destinations must be an int >= 1, "
                f"not {required_destinations!r}"
            )
        initial = _TABLE.initial
        dests = [initial] * required_destinations if required_destinations > 1 else None
        with self._lock:
            if room in self._rooms:
                raise DuplicateRoom(room)
            self._rooms[room] = _Room(initial, dests, [] if self._history else None)
            self._deadlines.enter(room, None, initial, self._clock())

    def remove(self, room: int) -> None:
        """Forget a room entirely; later updates for it are dropped.

        Raises:
            UnknownRoom: the room is not registered.
        """
        if not self.discard(room):
            raise UnknownRoom(room)

    def discard(self, room: int) -> bool:
        """Forget a room if registered; return whether it was."""
        with self._lock:
            rec = self._rooms.pop(room, None)
            if rec is None:
                return False
            self._deadlines.leave(room, rec.status)
            return True

    # -- status ------------------------------------------------------------
    def check_status(self, room: int) -> TransferStatus:
        """The room's status (a room past its time-out is failed first).

        Raises:
            UnknownRoom: the room is not registered.
        """
        with self._lock:
            rec = self._rooms.get(room)
            if rec is None:
                raise UnknownRoom(room)
            self._expire_room(room, rec, self._clock())
            return rec.status

    def update_status(
        self,
        room: int,
        status: TransferStatus | str,
        *,
        destination: int | None = None,
        reason: str | None = None,
    ) -> bool:
        """Report that a destination of ``room`` reached ``status``.

        The report is accepted only if one legal event of the table moves that
        destination from its status to ``status``; a room with one destination
        takes the step at once. A room with several moves on when every
        destination has reported the step (its status is the least advanced
        destination's), and any failed destination fails the room (with the
        reason given, else one naming the destination).

        Reporting the final status a room (or destination) is in again is a
        poll, as with SGLang's ``update_status``: accepted, nothing changes (a
        Failed room keeps its first reason).

        Args:
            room: the room id.
            status: the status reached (a TransferStatus, or its name).
            destination: which destination reports (0-based). When omitted,
                the report counts for the least advanced destination that can
                take the step, so N calls advance a room of N destinations.
            reason: why, when ``status`` is Failed.

        Returns:
            True when the report was applied; False when the room is not
            registered (never added, or removed): nothing is created, the
            update is counted in :attr:`stats` and logged at debug.

        Raises:
            IllegalTransition: no legal event produces the step (for example
                Transferring -> WaitingForInput, the reset on resume); nothing
                changes.
            InvalidArgument: ``status`` is not a TransferStatus, or
                ``destination`` is out of range.
        """
        target = parse_status(status)
        with self._lock:
            rec = self._rooms.get(room)
            if rec is None:
                self._unknown_updates += 1
                log.debug("dropped update of unknown room %s to %s", room, target.name)
                return False
            now = self._clock()
            self._expire_room(room, rec, now)
            if rec.dests is None:
                event = _PAIR.get((rec.status, target))
                if event is None:
                    if target is rec.status and target in _TABLE.final:
                        return True  # a repeat of the final status: a poll
                    raise self._illegal(room, rec.status, target, rec.status)
                self._enter(room, rec, target, event, now, reason)
                return True
            index = self._pick(room, rec, target, destination)
            if index is None:
                return True  # a destination's repeat: a poll
            if target is _FAILED and not reason:
                reason = f"destination {index} failed"
            dests = list(rec.dests)
            dests[index] = target
            new = _FAILED if _FAILED in dests else min(dests, key=_RANK.__getitem__)
            event = _PAIR.get((rec.status, new))
            if new is not rec.status and event is None:  # cannot happen with a sane table
                raise self._illegal(room, rec.status, new, rec.status)
            rec.dests = dests
            if event is not None and (new is not rec.status or target is rec.status):
                self._enter(room, rec, new, event, now, reason)
            return True

    def fail(self, room: int, reason: str) -> bool:
        """Fail ``room`` (if not final yet) with ``reason``; False if unknown.

        Unlike :meth:`update_status`, failing a room already final is not an
        error: it returns True and changes nothing, so abort paths can call it
        without checking first.
        """
        with self._lock:
            rec = self._rooms.get(room)
            if rec is None:
                self._unknown_updates += 1
                log.debug("dropped failure of unknown room %s: %s", room, reason)
                return False
            if rec.status not in _TABLE.final:
                self._fail_room(room, rec, reason, self._clock())
            return True

    def expire(self, now: float | None = None) -> list[int]:
        """Fail every room past its time-out; return their ids.

        Args:
            now: the clock's time (default: read the registry's clock).
        """
        failed: list[int] = []
        with self._lock:
            now = self._clock() if now is None else now
            for room, status, limit in list(self._deadlines.expired(now)):
                self._time_out(room, self._rooms[room], status, limit, now)
                failed.append(room)
        return failed

    # -- inspection ----------------------------------------------------------
    def reason(self, room: int) -> str | None:
        """Why the room failed (None if it has not).

        Raises:
            UnknownRoom: the room is not registered.
        """
        with self._lock:
            return self._get(room).reason

    def history(self, room: int) -> tuple[Transition, ...]:
        """The room's applied steps (empty unless the registry keeps history).

        Raises:
            UnknownRoom: the room is not registered.
        """
        with self._lock:
            hist = self._get(room).history
            return tuple(hist) if hist is not None else ()

    def destinations(self, room: int) -> tuple[TransferStatus, ...]:
        """Each destination's last reported status.

        Raises:
            UnknownRoom: the room is not registered.
        """
        with self._lock:
            rec = self._get(room)
            return tuple(rec.dests) if rec.dests is not None else (rec.status,)

    @property
    def timeouts(self) -> Mapping[TransferStatus, float]:
        """The time-out of each timed status, in seconds."""
        return dict(self._deadlines.timeouts)

    @property
    def stats(self) -> RegistryStats:
        """A snapshot of the registry's counters."""
        with self._lock:
            return RegistryStats(
                len(self._rooms),
                self._unknown_updates,
                self._illegal_updates,
                self._timeouts_fired,
            )

    def __len__(self) -> int:
        return len(self._rooms)

    def __contains__(self, room: object) -> bool:
        return room in self._rooms

    def __iter__(self) -> Iterator[int]:
        """Iterate over a snapshot of the registered room ids."""
        with self._lock:
            return iter(list(self._rooms))

    # -- internals (the lock is held) ----------------------------------------
    def _get(self, room: int) -> _Room:
        rec = self._rooms.get(room)
        if rec is None:
            raise UnknownRoom(room)
        return rec

    def _pick(
        self, room: int, rec: _Room, target: TransferStatus, destination: int | None
    ) -> int | None:
        """The destination a report moves (None: a repeat of its status, a poll)."""
        dests = rec.dests
        assert dests is not None
        if destination is not None:
            if (
                isinstance(destination, bool)
                or not isinstance(destination, int)
                or not 0 <= destination < len(dests)
            ):
                raise InvalidArgument(
                    f"room {room}: destination must be an int in 0..{len(dests) - 1}, "
                    f"not {destination!r}"
                )
            if (dests[destination], target) not in _PAIR:
                if dests[destination] is target and target in _TABLE.final:
                    return None
                raise self._illegal(room, rec.status, target, dests[destination], destination)
            return destination
        candidates = [i for i, s in enumerate(dests) if (s, target) in _PAIR]
        if not candidates:
            if target in dests and target in _TABLE.final:
                return None
            raise self._illegal(room, rec.status, target, rec.status)
        return min(candidates, key=lambda i: _RANK[dests[i]])

    def _enter(
        self,
        room: int,
        rec: _Room,
        dest: TransferStatus,
        event: Event,
        now: float,
        reason: str | None,
    ) -> None:
        source = rec.status
        rec.status = dest
        self._deadlines.enter(room, source, dest, now)
        if dest is _FAILED:
            rec.reason = reason or "reported Failed (no reason given)"
            if rec.dests is not None:
                rec.dests = [s if s in _TABLE.final else _FAILED for s in rec.dests]
        if rec.history is not None:
            rec.history.append(Transition(time.time(), source, dest, event, 0))

    def _fail_room(self, room: int, rec: _Room, reason: str, now: float) -> None:
        self._enter(room, rec, _FAILED, Event.FAILED, now, reason)

    def _time_out(
        self, room: int, rec: _Room, status: TransferStatus, limit: float, now: float
    ) -> None:
        self._timeouts_fired += 1
        log.info("room %s timed out in %s after %g s", room, status.name, limit)
        self._fail_room(room, rec, f"timed out in {status.name} after {limit:g} s", now)

    def _expire_room(self, room: int, rec: _Room, now: float) -> None:
        if self._deadlines.overdue(room, rec.status, now):
            self._time_out(room, rec, rec.status, self._deadlines.timeouts[rec.status], now)

    def _illegal(
        self,
        room: int,
        status: TransferStatus,
        target: TransferStatus,
        source: TransferStatus,
        destination: int | None = None,
    ) -> IllegalTransition:
        self._illegal_updates += 1
        if destination is not None:
            if source in _TABLE.final:
                detail = (
                    f"destination {destination} is {source.name} already, "
                    f"which is final: it cannot become {target.name}"
                )
            else:
                detail = (
                    f"destination {destination} is {source.name}: "
                    f"no legal event moves it to {target.name}"
                )
        elif source in _TABLE.final:
            detail = f"{source.name} is final and nothing leaves it"
        else:
            detail = f"no legal event moves {source.name} to {target.name}"
        return IllegalTransition(
            room,
            status,
            "update_status",
            detail,
            call=f"update_status({target.name})",
        )
