"""A Mermaid state diagram generated from the table (never drawn by hand)."""

from __future__ import annotations

from kvpoll.statemachine.status import Event, TransferStatus
from kvpoll.statemachine.table import Table, default_table

__all__ = ["event_label", "mermaid"]

_LABELS = {
    Event.CHUNK_SENT: "chunk_sent(is_last=False)",
    Event.LAST_CHUNK_SENT: "chunk_sent(is_last=True)",
}


def event_label(event: Event) -> str:
    """How the public API spells ``event``."""
    return _LABELS.get(event, event.value)


def mermaid(table: Table | None = None) -> str:
    """The table as a Mermaid ``stateDiagram-v2``, one edge per (source, dest) pair."""
    table = table if table is not None else default_table()
    edges: dict[tuple[TransferStatus, TransferStatus], list[str]] = {}
    for (source, event), dest in table.next.items():
        edges.setdefault((source, dest), []).append(event_label(event))
    lines = ["stateDiagram-v2", f"    [*] --> {table.initial.name}"]
    for (source, dest), labels in edges.items():
        lines.append(f"    {source.name} --> {dest.name} : {', '.join(labels)}")
    lines.extend(f"    {s.name} --> [*]" for s in table.order if s in table.final)
    return "\n".join(lines) + "\n"
