"""The SGLang plugin: ``--disaggregation-transfer-backend kvpoll`` without touching SGLang.

SGLang runs every entry point of the group ``sglang.srt.plugins`` early in
each of its processes (``sglang.srt.plugins.load_plugins``), then applies the
hooks they registered. kvpoll's entry point, ``kvpoll``, is :func:`register`:

* ``kvpoll`` joins the CLI's ``--disaggregation-transfer-backend`` choices;
* ``TransferBackend`` is replaced by the same enum plus ``KVPOLL = "kvpoll"``
  (SGLang's hook registry rebinds every module that imported it);
* ``get_kv_class`` is wrapped: for ``kvpoll`` it returns this package's
  classes, for every other backend SGLang's own answer.

``SGLANG_PLUGINS`` (a comma-separated allow-list) can leave it out, as any plugin.
"""

from __future__ import annotations

import enum
from typing import Any

from kvpoll.integrations.sglang import BACKEND_NAME

__all__ = ["kvpoll_transfer_backend", "register"]

_GET_KV_CLASS = "sglang.srt.disaggregation.utils.get_kv_class"
_TRANSFER_BACKEND = "sglang.srt.disaggregation.utils.TransferBackend"
_registered = False


def kvpoll_transfer_backend(original: type[enum.Enum]) -> type[enum.Enum]:
    """``original`` (SGLang's ``TransferBackend``) with a ``KVPOLL`` member added."""
    if any(member.value == BACKEND_NAME for member in original):
        return original
    members = {member.name: member.value for member in original}
    members["KVPOLL"] = BACKEND_NAME
    make: Any = enum.Enum  # the functional API, with a name known only at run time
    extended: type[enum.Enum] = make(
        original.__name__, members, module=original.__module__, qualname=original.__qualname__
    )
    return extended


def _get_kv_class(original: Any, transfer_backend: Any, class_type: Any) -> Any:
    value = getattr(transfer_backend, "value", transfer_backend)
    if value != BACKEND_NAME:
        return original(transfer_backend, class_type)
    from sglang.srt.disaggregation.base.conn import KVArgs

    from kvpoll.integrations import sglang as backend

    classes = {
        "kvargs": KVArgs,
        "manager": backend.KvpollKVManager,
        "sender": backend.KvpollKVSender,
        "receiver": backend.KvpollKVReceiver,
        "bootstrap_server": backend.KvpollKVBootstrapServer,
    }
    return classes.get(getattr(class_type, "value", class_type))


def register() -> None:
    """Make ``kvpoll`` a transfer backend of this process's SGLang (idempotent)."""
    global _registered
    from sglang.srt.arg_groups.choices import (
        DISAGG_TRANSFER_BACKEND_CHOICES,
        add_disagg_transfer_backend_choices,
    )
    from sglang.srt.disaggregation import utils
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if BACKEND_NAME not in DISAGG_TRANSFER_BACKEND_CHOICES:
        add_disagg_transfer_backend_choices([BACKEND_NAME])
    if not _registered and not any(m.value == BACKEND_NAME for m in utils.TransferBackend):
        _registered = True
        HookRegistry.register(
            _TRANSFER_BACKEND, kvpoll_transfer_backend(utils.TransferBackend), HookType.REPLACE
        )
        HookRegistry.register(_GET_KV_CLASS, _get_kv_class, HookType.AROUND)
