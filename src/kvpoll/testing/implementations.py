"""The implementations the conformance suite ships adapters for.

* :class:`KvpollImplementation`: kvpoll's own :class:`~kvpoll.TransferState`
  and :class:`~kvpoll.RoomRegistry`.
* :class:`TransitionsReference`: a reference built from ``spec/transitions.json``
  with the ``transitions`` library (one machine per transfer, as that library
  intends), plus the data guards written out independently. It shares no code
  with kvpoll's enforcement, so the two cross-check each other.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from kvpoll.errors import KvpollError
from kvpoll.spec_files import spec_dir
from kvpoll.statemachine.registry import RoomRegistry
from kvpoll.statemachine.state import TransferState
from kvpoll.statemachine.status import TransferStatus
from kvpoll.testing.runner import Implementation, ManualClock, Rejected

__all__ = ["KvpollImplementation", "TransitionsReference", "implementation_by_name"]


def _rejecting(call: Any, *args: Any, **kwargs: Any) -> object:
    try:
        return call(*args, **kwargs)
    except KvpollError as exc:
        raise Rejected(type(exc).__name__, str(exc)) from exc


class _KvpollTransfer:
    def __init__(self, room: int) -> None:
        self.state = TransferState(room)

    def do(self, action: str, args: Mapping[str, Any]) -> object:
        return _rejecting(getattr(self.state, action), **args)

    def status(self) -> str:
        return self.state.status.name

    def sent_tokens(self) -> int:
        return self.state.sent_tokens


class _KvpollRegistry:
    def __init__(self, timeouts: Mapping[str, float], clock: ManualClock) -> None:
        self.registry = RoomRegistry(
            timeouts={TransferStatus[k]: v for k, v in timeouts.items()}, clock=clock
        )

    def do(self, action: str, args: Mapping[str, Any]) -> object:
        kwargs = dict(args)
        if action == "update_status":
            kwargs["status"] = TransferStatus[kwargs["status"]]
        result = _rejecting(getattr(self.registry, action), **kwargs)
        if isinstance(result, TransferStatus):
            return result.name
        return result

    def status(self, room: int) -> str:
        return str(_rejecting(self.registry.check_status, room))


class KvpollImplementation:
    """kvpoll itself."""

    name = "kvpoll"
    targets = frozenset({"transfer", "registry"})

    def new_transfer(self, room: int) -> _KvpollTransfer:
        return _KvpollTransfer(room)

    def new_registry(self, timeouts: Mapping[str, float], clock: ManualClock) -> _KvpollRegistry:
        return _KvpollRegistry(timeouts, clock)


class _ReferenceModel:
    state: str


class _ReferenceTransfer:
    def __init__(self, room: int, doc: Mapping[str, Any]) -> None:
        from transitions import Machine

        self.model = _ReferenceModel()
        self.tokens = 0
        self.machine = Machine(
            model=self.model,
            states=list(doc["states"]),
            transitions=[dict(t) for t in doc["transitions"]],
            initial=doc["initial"],
            auto_transitions=False,
            ignore_invalid_triggers=False,
        )

    def _fire(self, trigger: str) -> None:
        from transitions.core import MachineError

        try:
            self.model.trigger(trigger)  # type: ignore[attr-defined]
        except MachineError as exc:
            raise Rejected("IllegalTransition", str(exc.value)) from None
        except AttributeError:
            raise Rejected("IllegalTransition", f"no trigger {trigger}") from None

    def _may(self, trigger: str) -> bool:
        return bool(self.machine.get_transitions(trigger=trigger, source=self.model.state))

    def do(self, action: str, args: Mapping[str, Any]) -> object:
        tokens = args.get("sent_tokens", self.tokens)
        if isinstance(tokens, bool) or not isinstance(tokens, int):
            raise Rejected("InvalidArgument", f"sent_tokens={tokens!r}")
        if action == "chunk_sent":
            trigger = "last_chunk_sent" if args["is_last"] else "chunk_sent"
            if self._may(trigger) and tokens <= self.tokens:
                raise Rejected("IllegalTransition", "sent_tokens must increase")
            self._fire(trigger)
            self.tokens = tokens
        elif action == "resumed":
            if self._may("resumed") and tokens != self.tokens:
                raise Rejected("IllegalTransition", "a resume must carry the delivered tokens")
            self._fire("resumed")
        elif action in ("bootstrapped", "failed"):
            self._fire(action)
        else:
            raise ValueError(f"unknown action {action}")
        return None

    def status(self) -> str:
        return self.model.state

    def sent_tokens(self) -> int:
        return self.tokens


class TransitionsReference:
    """The spec run by the ``transitions`` library (transfers only)."""

    name = "transitions"
    targets = frozenset({"transfer"})

    def __init__(self) -> None:
        self.doc = json.loads((spec_dir() / "transitions.json").read_text(encoding="utf-8"))

    def new_transfer(self, room: int) -> _ReferenceTransfer:
        return _ReferenceTransfer(room, self.doc)

    def new_registry(self, timeouts: Mapping[str, float], clock: ManualClock) -> Any:
        raise NotImplementedError("the transitions reference has no registry")


def implementation_by_name(name: str) -> Implementation:
    """``kvpoll``, ``transitions``, or ``package.module:factory`` for a third party.

    Raises:
        KvpollError: the name cannot be resolved.
    """
    if name == "kvpoll":
        return KvpollImplementation()
    if name == "transitions":
        return TransitionsReference()
    module_name, _, attr = name.partition(":")
    if not attr:
        raise KvpollError(
            f"unknown implementation {name!r}: use kvpoll, transitions or module:factory"
        )
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules of the current directory
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise KvpollError(
            f"cannot load implementation {name!r}: {exc} (the module is imported from the "
            f"current directory {os.getcwd()} or sys.path; set PYTHONPATH for another place)"
        ) from exc
    impl: Implementation = factory()
    return impl
