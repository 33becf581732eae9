"""The transition table and its enforcement. Knows nothing of transports."""

from kvpoll.statemachine.deadlines import DEFAULT_TIMEOUTS, Deadlines
from kvpoll.statemachine.registry import RegistryStats, RoomRegistry
from kvpoll.statemachine.state import TransferState, Transition
from kvpoll.statemachine.status import Event, TransferStatus
from kvpoll.statemachine.table import Table, default_table, load_table

__all__ = [
    "DEFAULT_TIMEOUTS",
    "Deadlines",
    "Event",
    "RegistryStats",
    "RoomRegistry",
    "Table",
    "TransferState",
    "TransferStatus",
    "Transition",
    "default_table",
    "load_table",
]
