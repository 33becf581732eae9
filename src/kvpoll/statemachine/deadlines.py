"""Per-status time-outs for many rooms, O(1) per step.

Every room that enters a status with a time-out joins that status's FIFO with
the time it entered. Rooms enter in time order, so the oldest entry is always
the first to expire: a sweep stops at the first room still in time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping
from typing import Generic, TypeVar

from kvpoll.errors import InvalidArgument
from kvpoll.statemachine.status import TransferStatus, parse_status
from kvpoll.statemachine.table import default_table

__all__ = ["DEFAULT_TIMEOUTS", "Deadlines", "Timeouts", "check_timeouts"]

K = TypeVar("K", bound=Hashable)

Timeouts = Mapping[TransferStatus, float | None] | Mapping[str, float | None]
"""Seconds per non-final status, keyed by TransferStatus or by its name; None: no limit."""

DEFAULT_TIMEOUTS: Mapping[TransferStatus, float | None] = {
    TransferStatus.Bootstrapping: 300.0,
    TransferStatus.WaitingForInput: 300.0,
    TransferStatus.Transferring: 300.0,
}
"""Seconds a room may stay in each non-final status without a step."""


def check_timeouts(timeouts: Timeouts | None) -> dict[TransferStatus, float]:
    """Merge ``timeouts`` over :data:`DEFAULT_TIMEOUTS`; None or 0 means no limit
    (as in the configuration file and ``KVPOLL_TIMEOUT_*``).

    Raises:
        InvalidArgument: a final status, an unknown status, or a negative value.
    """
    merged = dict(DEFAULT_TIMEOUTS)
    items: list[tuple[object, float | None]] = list((timeouts or {}).items())
    for key, value in items:
        key = parse_status(key)
        if key in default_table().final:
            raise InvalidArgument(f"{key.name} is final: it takes no time-out")
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0
        ):
            raise InvalidArgument(
                f"time-out for {key.name} must be seconds >= 0 (0 or None: no limit), not {value!r}"
            )
        merged[key] = float(value) if value else None
    return {s: v for s, v in merged.items() if v is not None}


class Deadlines(Generic[K]):
    """Which rooms have stayed too long in their status. Not thread-safe."""

    def __init__(self, timeouts: Mapping[TransferStatus, float]) -> None:
        self.timeouts = dict(timeouts)
        self._queues: dict[TransferStatus, OrderedDict[K, float]] = {
            s: OrderedDict() for s in self.timeouts
        }

    def enter(self, room: K, old: TransferStatus | None, new: TransferStatus, now: float) -> None:
        """``room`` moved from ``old`` (None: it is new) to ``new`` at ``now``.

        A step to the same status restarts its clock.
        """
        if old is not None:
            self.leave(room, old)
        queue = self._queues.get(new)
        if queue is not None:
            queue[room] = now

    def leave(self, room: K, status: TransferStatus) -> None:
        """Forget ``room``, which was in ``status``."""
        queue = self._queues.get(status)
        if queue is not None:
            queue.pop(room, None)

    def overdue(self, room: K, status: TransferStatus, now: float) -> bool:
        """True when ``room`` has been in ``status`` for its time-out or longer."""
        queue = self._queues.get(status)
        if queue is None:
            return False
        entered = queue.get(room)
        return entered is not None and now - entered >= self.timeouts[status]

    def expired(self, now: float) -> Iterator[tuple[K, TransferStatus, float]]:
        """Yield ``(room, status, timeout)`` for every overdue room, oldest first per status.

        Each yielded room is forgotten; the caller moves it to Failed.
        """
        for status, queue in self._queues.items():
            limit = self.timeouts[status]
            while queue:
                room, entered = next(iter(queue.items()))
                if now - entered < limit:
                    break
                del queue[room]
                yield room, status, limit
