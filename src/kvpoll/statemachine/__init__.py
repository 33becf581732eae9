"""The transition table and its enforcement. Knows nothing of transports."""

from kvpoll.statemachine.registry import DEFAULT_TIMEOUTS, RegistryStats, RoomRegistry
from kvpoll.statemachine.state import TransferState, Transition
from kvpoll.statemachine.status import Event, TransferStatus
from kvpoll.statemachine.table import Table, default_table, load_table

__all__ = [
    "DEFAULT_TIMEOUTS",
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
