"""One transfer's status, moved only by the events the table allows."""

from __future__ import annotations

import operator
import time
from typing import Any, NamedTuple

from kvpoll.errors import IllegalTransition, InvalidArgument
from kvpoll.statemachine.status import Event, TransferStatus
from kvpoll.statemachine.table import default_table

__all__ = ["TransferState", "Transition"]

_TABLE = default_table()
_CHUNK = Event.CHUNK_SENT
_LAST = Event.LAST_CHUNK_SENT
_RESUMED = Event.RESUMED
_BOOTSTRAPPED = Event.BOOTSTRAPPED
_FAILED = Event.FAILED
# The table's rows for the hot path: destination by source status (None: illegal).
_ROW = {event: _TABLE.row(event) for event in Event}
_CHUNK_ROW = _ROW[_CHUNK]
_LAST_ROW = _ROW[_LAST]
_RESUMED_ROW = _ROW[_RESUMED]
_BOOTSTRAPPED_ROW = _ROW[_BOOTSTRAPPED]


class Transition(NamedTuple):
    """One applied step, as kept in :attr:`TransferState.history`."""

    at: float
    """Wall-clock time (``time.time()``) the step was applied."""
    source: TransferStatus
    dest: TransferStatus
    event: Event
    sent_tokens: int
    """Tokens delivered once the step was applied."""


_now = time.time
_STEP = 5  # values per step in a history: at, source, dest, event, sent_tokens


def _tokens(value: object, room: int) -> int:
    if isinstance(value, bool):
        raise InvalidArgument(f"room {room}: sent_tokens must be an int, not bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgument(
            f"room {room}: sent_tokens must be an int, not {type(value).__name__}"
        ) from None


class TransferState:
    """The status of one transfer (room), checked against the table on every step.

    A new transfer is ``Bootstrapping`` with ``sent_tokens == 0``. Each event
    method either applies one legal step and returns the new status, or raises
    :class:`~kvpoll.IllegalTransition` and leaves ``status``, ``sent_tokens``
    and ``history`` exactly as they were. Not thread-safe: one owner per
    transfer, or a lock around it (:class:`~kvpoll.RoomRegistry` has one).

    Args:
        room: the transfer's id.
        history: keep a list of applied steps with timestamps. Switch off where
            memory matters (it costs about 100 bytes a step).
    """

    __slots__ = ("_history", "_reason", "_sent_tokens", "_status", "room")

    def __init__(self, room: int, *, history: bool = True) -> None:
        if isinstance(room, bool) or not isinstance(room, int):
            raise InvalidArgument(f"room must be an int, not {type(room).__name__}")
        self.room = room
        self._status = _TABLE.initial
        self._sent_tokens = 0
        self._reason: str | None = None
        # steps flat in one list, five values each: no object made per step for the
        # garbage collector to track (a tuple per step cost several times the step
        # itself once many rooms were alive); :attr:`history` hands out Transitions
        self._history: list[Any] | None = [] if history else None

    # -- read-only views -------------------------------------------------
    @property
    def status(self) -> TransferStatus:
        """The current status."""
        return self._status

    @property
    def sent_tokens(self) -> int:
        """Cumulative tokens delivered so far (0 at start)."""
        return self._sent_tokens

    @property
    def reason(self) -> str | None:
        """Why the transfer failed (None unless ``status`` is Failed)."""
        return self._reason

    @property
    def history(self) -> tuple[Transition, ...]:
        """Applied steps, oldest first (empty when history is switched off)."""
        h = self._history
        if h is None:
            return ()
        return tuple(Transition._make(h[i : i + _STEP]) for i in range(0, len(h), _STEP))

    @property
    def is_final(self) -> bool:
        """True once the transfer is Success or Failed."""
        return self._status in _TABLE.final

    def __repr__(self) -> str:
        return (
            f"TransferState(room={self.room}, status={self._status.name}, "
            f"sent_tokens={self._sent_tokens})"
        )

    # -- events ------------------------------------------------------------
    def bootstrapped(self) -> TransferStatus:
        """Every destination has told the sender where to write.

        Raises:
            IllegalTransition: not in Bootstrapping.
        """
        source = self._status
        dest = _BOOTSTRAPPED_ROW[source]
        if dest is None:
            raise self._illegal(_BOOTSTRAPPED, "bootstrapped()", None)
        self._status = dest
        if self._history is not None:
            self._history += (_now(), source, dest, _BOOTSTRAPPED, self._sent_tokens)
        return dest

    def chunk_sent(self, *, sent_tokens: int, is_last: bool) -> TransferStatus:
        """A chunk reached every destination.

        Args:
            sent_tokens: cumulative tokens delivered once this chunk is in;
                must be strictly greater than :attr:`sent_tokens`.
            is_last: this chunk completes the data (-> Success); otherwise the
                transfer is (or stays) Transferring.

        Raises:
            IllegalTransition: the table does not allow the step, or
                ``sent_tokens`` does not increase.
            InvalidArgument: ``sent_tokens`` is not an integer.
        """
        source = self._status
        dest = (_LAST_ROW if is_last else _CHUNK_ROW)[source]
        if dest is None or type(sent_tokens) is not int or sent_tokens <= self._sent_tokens:
            return self._chunk_slow_path(sent_tokens, is_last)
        self._status = dest
        self._sent_tokens = sent_tokens
        if self._history is not None:
            self._history += (_now(), source, dest, _LAST if is_last else _CHUNK, sent_tokens)
        return dest

    def resumed(self, *, sent_tokens: int) -> TransferStatus:
        """The receiver resumed with a new buffer; the status does not change.

        Args:
            sent_tokens: what the receiver says was delivered; must equal
                :attr:`sent_tokens` (0 would be a reset, fewer a rewind).

        Raises:
            IllegalTransition: not in Transferring, or ``sent_tokens`` differs.
            InvalidArgument: ``sent_tokens`` is not an integer.
        """
        source = self._status
        dest = _RESUMED_ROW[source]
        if dest is None or type(sent_tokens) is not int or sent_tokens != self._sent_tokens:
            tokens = _tokens(sent_tokens, self.room)
            if dest is not None and tokens == self._sent_tokens:
                return self.resumed(sent_tokens=tokens)
            detail = None
            if dest is not None:
                kind = (
                    "a reset"
                    if tokens == 0
                    else ("a rewind" if tokens < self._sent_tokens else "ahead of the data")
                )
                detail = (
                    f"a resume must carry sent_tokens={self._sent_tokens} (the tokens "
                    f"delivered); {tokens} is {kind}"
                )
            raise self._illegal(_RESUMED, f"resumed(sent_tokens={tokens})", detail)
        if self._history is not None:
            self._history += (_now(), source, dest, _RESUMED, sent_tokens)
        return dest

    def failed(self, reason: str = "") -> TransferStatus:
        """The transfer failed; ``reason`` says why (kept in :attr:`reason`).

        Raises:
            IllegalTransition: already Success or Failed.
        """
        status = self._apply(_FAILED, self._sent_tokens, f"failed({reason!r})")
        self._reason = str(reason)
        return status

    def can(self, event: Event) -> bool:
        """True when the table allows ``event`` now (data guards aside)."""
        return _ROW[event][self._status] is not None

    # -- internals ---------------------------------------------------------
    def _chunk_slow_path(self, sent_tokens: object, is_last: bool) -> TransferStatus:
        tokens = _tokens(sent_tokens, self.room)
        event = _LAST if is_last else _CHUNK
        call = f"chunk_sent(sent_tokens={tokens}, is_last={bool(is_last)})"
        if _ROW[event][self._status] is None:
            raise self._illegal(event, call, None)
        if tokens <= self._sent_tokens:
            raise self._illegal(
                event,
                call,
                f"sent_tokens must increase: {tokens} after {self._sent_tokens} already delivered",
            )
        return self.chunk_sent(sent_tokens=tokens, is_last=is_last)

    def _apply(self, event: Event, sent_tokens: int, call: str) -> TransferStatus:
        source = self._status
        dest = _ROW[event][source]
        if dest is None:
            raise self._illegal(event, call, None)
        self._status = dest
        if self._history is not None:
            self._history += (_now(), source, dest, event, sent_tokens)
        return dest

    def _illegal(self, event: Event, call: str, detail: str | None) -> IllegalTransition:
        return IllegalTransition(
            self.room,
            self._status,
            event.api_name,
            detail if detail is not None else _TABLE.why_illegal(self._status, event),
            trigger=event,
            call=call,
        )
