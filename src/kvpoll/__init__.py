"""kvpoll: move tensors between disaggregated LLM workers, with a status that only moves forward.

The public API:

* :class:`TransferStatus`, :class:`TransferState`, :class:`RoomRegistry`: the
  declared transition table and its enforcement (:mod:`kvpoll.statemachine`).
* :class:`KvpollError` and its subclasses: every error kvpoll raises on purpose.
* :mod:`kvpoll.compat.sglang`: SGLang's status codes.
* :mod:`kvpoll.testing`: the conformance suite runner.
"""

from kvpoll.errors import (
    DuplicateRoom,
    IllegalTransition,
    InvalidArgument,
    KvpollError,
    SpecError,
    UnknownRoom,
)
from kvpoll.statemachine import (
    Event,
    RoomRegistry,
    TransferState,
    TransferStatus,
    Transition,
)

__version__ = "0.1.0"

__all__ = [
    "DuplicateRoom",
    "Event",
    "IllegalTransition",
    "InvalidArgument",
    "KvpollError",
    "RoomRegistry",
    "SpecError",
    "TransferState",
    "TransferStatus",
    "Transition",
    "UnknownRoom",
    "__version__",
]
