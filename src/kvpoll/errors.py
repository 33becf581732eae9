"""Errors shared by every part of kvpoll.

Every error kvpoll raises on purpose is a :class:`KvpollError`. Errors about a
room carry the room id and the status it was in as attributes, not only in the
message, so callers can act on them without parsing text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvpoll.statemachine.status import Event, TransferStatus

__all__ = [
    "DuplicateRoom",
    "IllegalTransition",
    "InvalidArgument",
    "KvpollError",
    "ResourceExhausted",
    "SpecError",
    "UnknownRoom",
]


class KvpollError(Exception):
    """Base class of every error kvpoll raises on purpose."""


class InvalidArgument(KvpollError, ValueError):
    """An argument has the wrong type or value; nothing was changed."""


class ResourceExhausted(KvpollError):
    """The process ran out of file descriptors, mappings or memory; nothing was changed."""


class SpecError(KvpollError):
    """The transition table or a conformance case file is malformed."""


class IllegalTransition(KvpollError):
    """A step the transition table (or one of its data guards) does not allow.

    Attributes:
        room: the room (transfer id) the step was tried on.
        status: the room's status, unchanged by the rejected step.
        event: what was tried, named as the public API names it
            (``"bootstrapped"``, ``"chunk_sent"``, ``"resumed"``, ``"failed"``,
            or ``"update_status"`` for :meth:`kvpoll.RoomRegistry.update_status`).
        trigger: the table's trigger the call maps to (``None`` when the call
            named a target status instead of an event).
        detail: why it was rejected, in words.
    """

    def __init__(
        self,
        room: int,
        status: TransferStatus,
        event: str,
        detail: str,
        *,
        trigger: Event | None = None,
        call: str | None = None,
    ) -> None:
        self.room = room
        self.status = status
        self.event = event
        self.trigger = trigger
        self.detail = detail
        shown = call if call is not None else event
        super().__init__(
            f"room {room}: cannot handle event {shown} in state {status.name}: {detail}"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_illegal,
            (self.room, self.status, self.event, self.detail, self.trigger, str(self)),
        )


def _rebuild_illegal(
    room: int,
    status: TransferStatus,
    event: str,
    detail: str,
    trigger: Event | None,
    message: str,
) -> IllegalTransition:
    err = IllegalTransition(room, status, event, detail, trigger=trigger)
    err.args = (message,)
    return err


class DuplicateRoom(KvpollError):
    """A room id that is already registered was added again.

    Attributes:
        room: the duplicate id.
    """

    def __init__(self, room: int) -> None:
        self.room = room
        super().__init__(f"room {room} is already registered")


class UnknownRoom(KvpollError, KeyError):
    """A room that is not registered (never added, or already removed).

    Attributes:
        room: the unknown id.
    """

    def __init__(self, room: int) -> None:
        self.room = room
        super().__init__(room)

    def __str__(self) -> str:
        return f"room {self.room} is not registered"
