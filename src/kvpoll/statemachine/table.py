"""The transition table: the one place that decides which steps are legal.

The table is data (``spec/transitions.json``, in the declarative format of the
``transitions`` library). :func:`load_table` compiles it once into a frozen
``(status, event) -> status`` mapping; everything else in kvpoll asks this
module and decides nothing on its own. The ``transitions`` library itself is
never used here: it serves as a cross-check in the test suite only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

from kvpoll.errors import SpecError
from kvpoll.spec_files import spec_dir
from kvpoll.statemachine.status import Event, TransferStatus

__all__ = ["Table", "default_table", "load_table"]


@dataclass(frozen=True)
class Table:
    """A compiled, immutable transition table.

    Attributes:
        next: ``(status, event) -> status`` for every legal step, nothing else.
        initial: the status every transfer starts in.
        final: statuses nothing leaves.
        order: the statuses in order of progress (for display and audits, never
            to decide a step).
        rules: one sentence per event saying what the rule is.
        guards: the data guards, in words, per event.
        raw: the parsed JSON document the table was compiled from.
    """

    next: Mapping[tuple[TransferStatus, Event], TransferStatus]
    initial: TransferStatus
    final: frozenset[TransferStatus]
    order: tuple[TransferStatus, ...]
    rules: Mapping[Event, str]
    guards: Mapping[Event, str]
    raw: Mapping[str, Any] = field(repr=False)

    def row(self, event: Event) -> tuple[TransferStatus | None, ...]:
        """``event``'s destinations indexed by the source status's value (None: illegal).

        The same data as :attr:`next`, laid out for the hot path.
        """
        return tuple(self.next.get((s, event)) for s in TransferStatus)

    def step(self, status: TransferStatus, event: Event) -> TransferStatus | None:
        """The status ``event`` leads to from ``status``, or None if illegal."""
        return self.next.get((status, event))

    def events_between(self, source: TransferStatus, dest: TransferStatus) -> tuple[Event, ...]:
        """Every event that moves ``source`` to ``dest`` in one step."""
        return tuple(e for (s, e), d in self.next.items() if s is source and d is dest)

    def allowed_events(self, status: TransferStatus) -> tuple[Event, ...]:
        """The events legal in ``status`` (empty for a final status)."""
        return tuple(e for (s, e) in self.next if s is status)

    def reachable(self, source: TransferStatus, dest: TransferStatus) -> bool:
        """True when ``dest`` can follow ``source`` through zero or more legal steps."""
        seen = {source}
        frontier = [source]
        while frontier:
            here = frontier.pop()
            for (s, _e), d in self.next.items():
                if s is here and d not in seen:
                    seen.add(d)
                    frontier.append(d)
        return dest in seen

    def why_illegal(self, status: TransferStatus, event: Event) -> str:
        """A sentence explaining why ``event`` is not legal in ``status``."""
        if status in self.final:
            return f"{status.name} is final and nothing leaves it"
        allowed = ", ".join(e.value for e in self.allowed_events(status))
        return f"the table allows only {allowed} in {status.name}"


def _status(name: object, where: str) -> TransferStatus:
    if not isinstance(name, str) or name not in TransferStatus.__members__:
        raise SpecError(f"{where}: unknown state {name!r}")
    return TransferStatus[name]


def _event(name: object, where: str) -> Event:
    if not isinstance(name, str) or name not in Event._value2member_map_:
        raise SpecError(f"{where}: unknown trigger {name!r}")
    return Event(name)


def compile_table(doc: Mapping[str, Any]) -> Table:
    """Compile a parsed table document; raise :class:`SpecError` if malformed."""
    try:
        states = [_status(s, "states") for s in doc["states"]]
        if set(states) != set(TransferStatus):
            raise SpecError("states must list exactly the five TransferStatus names")
        initial = _status(doc["initial"], "initial")
        final = frozenset(_status(s, "final") for s in doc["final"])
        order = tuple(_status(s, "progress_order") for s in doc["progress_order"])
        table: dict[tuple[TransferStatus, Event], TransferStatus] = {}
        for i, t in enumerate(doc["transitions"]):
            where = f"transitions[{i}]"
            event = _event(t["trigger"], where)
            dest = _status(t["dest"], where)
            sources = t["source"] if isinstance(t["source"], list) else [t["source"]]
            for src_name in sources:
                src = _status(src_name, where)
                if src in final:
                    raise SpecError(f"{where}: final state {src.name} cannot be a source")
                if (src, event) in table:
                    raise SpecError(f"{where}: ({src.name}, {event.value}) is declared twice")
                table[(src, event)] = dest
        rules = {_event(k, "rules"): str(v) for k, v in doc.get("rules", {}).items()}
        guards = {_event(k, "guards"): str(v) for k, v in doc.get("guards", {}).items()}
    except (KeyError, TypeError) as exc:
        raise SpecError(f"malformed transition table: {exc!r}") from exc
    return Table(
        next=MappingProxyType(table),
        initial=initial,
        final=final,
        order=order,
        rules=MappingProxyType(rules),
        guards=MappingProxyType(guards),
        raw=MappingProxyType(dict(doc)),
    )


def load_table(path: Path | None = None) -> Table:
    """Read and compile a table file (default: kvpoll's ``spec/transitions.json``)."""
    path = path if path is not None else spec_dir() / "transitions.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SpecError(f"cannot read transition table {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: the table must be a JSON object")
    return compile_table(doc)


@cache
def default_table() -> Table:
    """kvpoll's own table, compiled once per process."""
    return load_table()
