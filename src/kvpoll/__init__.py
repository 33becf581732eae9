"""kvpoll: move tensors between disaggregated LLM workers, with a status that only moves forward.

The public API:

* :class:`TransferStatus`, :class:`TransferState`, :class:`RoomRegistry`: the
  declared transition table and its enforcement (:mod:`kvpoll.statemachine`).
* :class:`KvpollError` and its subclasses: every error kvpoll raises on purpose.
* :mod:`kvpoll.compat.sglang`: SGLang's status codes.
* :class:`Sender`, :class:`Receiver`: real transfers over a transport
  (:mod:`kvpoll.protocol`, :mod:`kvpoll.transports`).
* :class:`PagedPool`: page-indexed memory registered once, as serving engines
  hold it (:mod:`kvpoll.memory`).
* :class:`Config`, :func:`load_config`: which transport a cluster uses (a TOML
  file and ``KVPOLL_*`` variables; :mod:`kvpoll.config`).
* :mod:`kvpoll.testing`: the conformance suite runner and the transport test kit.
"""

from typing import TYPE_CHECKING

from kvpoll.config import Config, ConfigError, load_config
from kvpoll.errors import (
    DuplicateRoom,
    IllegalTransition,
    InvalidArgument,
    KvpollError,
    ResourceExhausted,
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

if TYPE_CHECKING:  # type checkers see the transfer API; at run time it loads lazily
    from kvpoll.memory import PagedPool
    from kvpoll.protocol import (
        EndpointClosed,
        Received,
        Receiver,
        RoomInfo,
        RoomMetrics,
        Sender,
        StatusChange,
        TransferIncomplete,
    )

__version__ = "0.1.0"

# The transfer API pulls in torch, pyzmq and pydantic: imported on first use.
_LAZY = {
    "Sender": "kvpoll.protocol",
    "Receiver": "kvpoll.protocol",
    "Received": "kvpoll.protocol",
    "StatusChange": "kvpoll.protocol",
    "TransferIncomplete": "kvpoll.protocol",
    "EndpointClosed": "kvpoll.protocol",
    "RoomInfo": "kvpoll.protocol",
    "RoomMetrics": "kvpoll.protocol",
    "PagedPool": "kvpoll.memory",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvpoll' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [  # noqa: RUF022 - grouped: the state machine, then the transfer API
    "Config",
    "ConfigError",
    "load_config",
    "DuplicateRoom",
    "Event",
    "IllegalTransition",
    "InvalidArgument",
    "KvpollError",
    "ResourceExhausted",
    "RoomRegistry",
    "SpecError",
    "TransferState",
    "TransferStatus",
    "Transition",
    "UnknownRoom",
    "__version__",
    "EndpointClosed",
    "PagedPool",
    "Received",
    "Receiver",
    "RoomInfo",
    "RoomMetrics",
    "Sender",
    "StatusChange",
    "TransferIncomplete",
]
