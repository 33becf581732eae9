"""Sender and receiver: real transfers driven by the transition table.

Imports both :mod:`kvpoll.statemachine` and :mod:`kvpoll.transports`, which
never import each other.
"""

from kvpoll.protocol.endpoint import (
    EndpointClosed,
    RoomInfo,
    RoomMetrics,
    StatusChange,
    TransferIncomplete,
)
from kvpoll.protocol.receiver import Received, Receiver
from kvpoll.protocol.sender import Sender

__all__ = [
    "EndpointClosed",
    "Received",
    "Receiver",
    "RoomInfo",
    "RoomMetrics",
    "Sender",
    "StatusChange",
    "TransferIncomplete",
]
