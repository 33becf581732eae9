"""Audit a log of observed statuses against the table.

Each line of the log is a JSON object ``{"room": int, "status": name-or-code,
"sent_tokens": int (optional)}``. For every room, each observation must follow
from the previous one by one legal event (or, with ``allow_skips``, by any
number of legal events, for logs sampled by polling); a room's first
observation follows from the initial status, Bootstrapping. Repeating the last
observed status is a poll, not a step. ``sent_tokens`` never goes back, and
grows with every chunk. A log with no observation at all is a finding too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from kvpoll.compat.sglang import from_sglang
from kvpoll.errors import InvalidArgument
from kvpoll.statemachine.status import Event, TransferStatus
from kvpoll.statemachine.table import Table, default_table

__all__ = ["Finding", "TraceChecker", "TraceReport", "check_trace"]

Codes = Literal["kvpoll", "sglang"]
_CHUNKS = frozenset({Event.CHUNK_SENT, Event.LAST_CHUNK_SENT})


@dataclass(frozen=True)
class Finding:
    """A violation of the table, or a line that could not be read."""

    line: int
    rule: str
    room: int | None = None
    source: TransferStatus | None = None
    dest: TransferStatus | None = None
    malformed: bool = False

    def __str__(self) -> str:
        if self.malformed:
            return f"line {self.line}: malformed: {self.rule}"
        step = f"{self.source} -> {self.dest}" if self.source is not None else f"{self.dest}"
        return f"line {self.line}: room {self.room}: {step}: {self.rule}"

    def to_json(self) -> dict[str, object]:
        return {
            "line": self.line,
            "room": self.room,
            "from": None if self.source is None else self.source.name,
            "to": None if self.dest is None else self.dest.name,
            "rule": self.rule,
            "malformed": self.malformed,
        }


@dataclass
class TraceReport:
    """What :func:`check_trace` found."""

    lines: int = 0
    rooms: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


class TraceChecker:
    """Feed it lines one by one; it remembers each room's last observation."""

    def __init__(
        self, *, codes: Codes = "kvpoll", allow_skips: bool = False, table: Table | None = None
    ) -> None:
        if codes not in ("kvpoll", "sglang"):
            raise InvalidArgument(f"codes must be 'kvpoll' or 'sglang', not {codes!r}")
        self.codes = codes
        self.allow_skips = allow_skips
        self.table = table if table is not None else default_table()
        self._last: dict[int, tuple[TransferStatus, int | None]] = {}
        self._rank = {s: i for i, s in enumerate(self.table.order)}
        self._observed = 0

    @property
    def rooms(self) -> int:
        return len(self._last)

    def feed(self, line_no: int, text: str) -> list[Finding]:
        """Check one line; return what is wrong with it (empty when fine)."""
        if not text.strip():
            return []
        try:
            room, status, tokens = self._parse(text)
        except ValueError as exc:
            return [Finding(line_no, str(exc), malformed=True)]
        self._observed += 1
        previous = self._last.get(room)
        self._last[room] = (
            status,
            tokens if tokens is not None else (previous[1] if previous else None),
        )
        if previous is None:  # a room starts where the table does
            return self._judge(line_no, room, (self.table.initial, None), status, tokens)
        return self._judge(line_no, room, previous, status, tokens)

    def finish(self, lines: int) -> list[Finding]:
        """What is wrong with the log as a whole, once every line was fed."""
        if self._observed:
            return []
        what = "the log is empty" if lines == 0 else "the log has no observation"
        return [Finding(lines, f"{what}: nothing to audit", malformed=True)]

    def _parse(self, text: str) -> tuple[int, TransferStatus, int | None]:
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise ValueError("a line must be a JSON object")
        room = obj.get("room")
        if isinstance(room, bool) or not isinstance(room, int):
            raise ValueError(f"'room' must be an integer, not {room!r}")
        raw = obj.get("status")
        status: TransferStatus
        if isinstance(raw, str) and raw in TransferStatus.__members__:
            status = TransferStatus[raw]
        elif isinstance(raw, int) and not isinstance(raw, bool):
            try:
                status = from_sglang(raw) if self.codes == "sglang" else TransferStatus(raw)
            except (ValueError, InvalidArgument):
                raise ValueError(f"unknown {self.codes} status code {raw}") from None
        else:
            raise ValueError(f"'status' must be a status name or code, not {raw!r}")
        tokens = obj.get("sent_tokens")
        if tokens is not None and (
            isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0
        ):
            raise ValueError(f"'sent_tokens' must be a non-negative integer, not {tokens!r}")
        return room, status, tokens

    def _judge(
        self,
        line_no: int,
        room: int,
        previous: tuple[TransferStatus, int | None],
        status: TransferStatus,
        tokens: int | None,
    ) -> list[Finding]:
        source, old_tokens = previous
        found: list[Finding] = []

        def bad(rule: str) -> None:
            found.append(Finding(line_no, rule, room, source, status))

        events = self.table.events_between(source, status) if source is not status else ()
        if source is status:
            pass  # a repeated observation (a poll) is not a step
        elif source in self.table.final:
            bad(f"{source.name} is final and nothing leaves it")
        elif not events and not (self.allow_skips and self.table.reachable(source, status)):
            if self._rank[status] < self._rank[source]:
                rule = "the status only moves forward"
                if source is TransferStatus.Transferring:
                    rule += f"; {self.table.rules.get(Event.RESUMED, '')}".rstrip("; ")
            else:
                rule = f"no legal event moves {source.name} to {status.name}"
                if self.allow_skips:
                    rule += " (nor any sequence of events)"
            bad(rule)
        if tokens is not None and old_tokens is not None:
            if tokens < old_tokens:
                bad(f"sent_tokens went back from {old_tokens} to {tokens} (a rewind)")
            elif events and set(events) <= _CHUNKS and tokens == old_tokens:
                bad(f"sent_tokens must increase with a chunk (stayed at {tokens})")
        return found


def check_trace(
    lines: Iterable[str], *, codes: Codes = "kvpoll", allow_skips: bool = False
) -> TraceReport:
    """Check a whole log; lines are numbered from 1."""
    checker = TraceChecker(codes=codes, allow_skips=allow_skips)
    report = TraceReport()
    for number, text in enumerate(lines, start=1):
        report.lines = number
        report.findings.extend(checker.feed(number, text))
    report.findings.extend(checker.finish(report.lines))
    report.rooms = checker.rooms
    return report
