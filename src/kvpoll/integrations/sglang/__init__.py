"""kvpoll as an SGLang transfer backend (``--disaggregation-transfer-backend kvpoll``).

Written against SGLang 0.5.23 (:data:`SGLANG_VERSION`): SGLang's backend
interface changes between releases, so other versions are refused unless
``KVPOLL_SGLANG_ANY_VERSION=1``. Importing this package does not import SGLang;
the classes below do, on first use:

* :class:`KvpollKVManager`: one kvpoll endpoint per scheduler rank over SGLang's
  KV pool and aux rows.
* :class:`KvpollKVSender`, :class:`KvpollKVReceiver`: one request on the prefill
  and the decode side, each a kvpoll room.
* :class:`KvpollKVBootstrapServer`: SGLang's bootstrap registry, which also hands
  out each prefill rank's kvpoll address.

:func:`kvpoll.integrations.sglang.plugin.register` (the ``sglang.srt.plugins``
entry point ``kvpoll``) makes the backend selectable by name. See docs/sglang.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvpoll.integrations.sglang.bootstrap import KvpollKVBootstrapServer
    from kvpoll.integrations.sglang.manager import KvpollKVManager, UnsupportedByKvpoll
    from kvpoll.integrations.sglang.receiver import KvpollKVReceiver
    from kvpoll.integrations.sglang.sender import KvpollKVSender

__all__ = [
    "BACKEND_NAME",
    "SGLANG_VERSION",
    "KvpollKVBootstrapServer",
    "KvpollKVManager",
    "KvpollKVReceiver",
    "KvpollKVSender",
    "UnsupportedByKvpoll",
]

SGLANG_VERSION = "0.5.23"
"""The SGLang release this backend is written and tested against."""

BACKEND_NAME = "kvpoll"
"""The name ``--disaggregation-transfer-backend`` takes."""

_LAZY = {
    "KvpollKVManager": "manager",
    "UnsupportedByKvpoll": "manager",
    "KvpollKVSender": "sender",
    "KvpollKVReceiver": "receiver",
    "KvpollKVBootstrapServer": "bootstrap",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from kvpoll.integrations.sglang.version import check_version

    check_version()
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once: the scheduler asks for a class on every request
    return value
