"""The five statuses of a transfer and the events that move it.

The numbering of :class:`TransferStatus` is kvpoll's (order of progress,
Failed last). Other systems number them differently: see
:mod:`kvpoll.compat.sglang`. Never compare statuses with ``<`` or ``max()``
to decide a step: the table in :mod:`kvpoll.statemachine.table` decides.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

from kvpoll.errors import InvalidArgument

__all__ = ["Event", "TransferStatus", "parse_status"]


class TransferStatus(IntEnum):
    """Status of one transfer (room)."""

    Bootstrapping = 0
    WaitingForInput = 1
    Transferring = 2
    Success = 3
    Failed = 4

    @property
    def is_final(self) -> bool:
        """True for Success and Failed, which nothing leaves."""
        return self is TransferStatus.Success or self is TransferStatus.Failed

    def __str__(self) -> str:
        return self.name

    def __format__(self, spec: str) -> str:
        return format(self.name, spec)


class Event(StrEnum):
    """A trigger of the transition table.

    The public API maps onto these: ``chunk_sent(is_last=True)`` fires
    :attr:`LAST_CHUNK_SENT`, ``chunk_sent(is_last=False)`` fires
    :attr:`CHUNK_SENT`.
    """

    BOOTSTRAPPED = "bootstrapped"
    CHUNK_SENT = "chunk_sent"
    LAST_CHUNK_SENT = "last_chunk_sent"
    RESUMED = "resumed"
    FAILED = "failed"

    @property
    def api_name(self) -> str:
        """The name of the public method that fires this trigger."""
        return "chunk_sent" if self is Event.LAST_CHUNK_SENT else self.value


def parse_status(value: object) -> TransferStatus:
    """A :class:`TransferStatus`, given one or its name.

    Raises:
        InvalidArgument: anything else. A bare integer is refused as ambiguous:
            kvpoll's and SGLang's codes differ.
    """
    if isinstance(value, TransferStatus):
        return value
    if isinstance(value, str) and value in TransferStatus.__members__:
        return TransferStatus[value]
    if isinstance(value, int) and not isinstance(value, bool):
        raise InvalidArgument(
            f"a bare integer status ({value}) is ambiguous: kvpoll's and SGLang's codes "
            "differ; pass TransferStatus(code) or kvpoll.compat.sglang.from_sglang(code)"
        )
    raise InvalidArgument(f"not a TransferStatus: {value!r}")
