"""The table: data in one place, cross-checked against the transitions library."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from transitions import Machine
from transitions.core import MachineError

from kvpoll import Event, SpecError, TransferStatus
from kvpoll.spec_files import spec_dir
from kvpoll.statemachine.diagram import mermaid
from kvpoll.statemachine.table import compile_table, default_table, load_table

ROOT = Path(__file__).resolve().parent.parent
DOC: dict[str, Any] = json.loads((spec_dir() / "transitions.json").read_text())


class Model:
    state: str


@pytest.mark.parametrize("status", list(TransferStatus), ids=lambda s: s.name)
@pytest.mark.parametrize("event", list(Event), ids=lambda e: e.value)
def test_kvpoll_and_transitions_agree_on_every_pair(status: TransferStatus, event: Event) -> None:
    model = Model()
    Machine(
        model=model,
        states=DOC["states"],
        transitions=DOC["transitions"],
        initial=status.name,
        auto_transitions=False,
    )
    try:
        getattr(model, event.value)()
        reference: str | None = model.state
    except MachineError:
        reference = None
    ours = default_table().step(status, event)
    assert (ours.name if ours else None) == reference


def test_the_table_holds_exactly_the_issue_s_legal_steps() -> None:
    S, E = TransferStatus, Event
    expected = {
        (S.Bootstrapping, E.BOOTSTRAPPED): S.WaitingForInput,
        (S.WaitingForInput, E.CHUNK_SENT): S.Transferring,
        (S.WaitingForInput, E.LAST_CHUNK_SENT): S.Success,
        (S.Transferring, E.CHUNK_SENT): S.Transferring,
        (S.Transferring, E.RESUMED): S.Transferring,
        (S.Transferring, E.LAST_CHUNK_SENT): S.Success,
        (S.Bootstrapping, E.FAILED): S.Failed,
        (S.WaitingForInput, E.FAILED): S.Failed,
        (S.Transferring, E.FAILED): S.Failed,
    }
    assert dict(default_table().next) == expected


def test_the_compiled_table_is_frozen() -> None:
    table = default_table()
    with pytest.raises(TypeError):
        table.next[(TransferStatus.Success, Event.RESUMED)] = TransferStatus.Transferring  # type: ignore[index]


def test_no_step_leads_back_to_waiting_for_input_except_bootstrap() -> None:
    table = default_table()
    into_waiting = [k for k, v in table.next.items() if v is TransferStatus.WaitingForInput]
    assert into_waiting == [(TransferStatus.Bootstrapping, Event.BOOTSTRAPPED)]


def test_reachability() -> None:
    table = default_table()
    S = TransferStatus
    assert table.reachable(S.Bootstrapping, S.Success)
    assert not table.reachable(S.Transferring, S.WaitingForInput)
    assert not table.reachable(S.Success, S.Failed)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["transitions"].append(
                {"trigger": "failed", "source": "Success", "dest": "Failed"}
            ),
            "final state Success",
        ),
        (
            lambda d: d["transitions"].append(
                {"trigger": "resumed", "source": "Transferring", "dest": "WaitingForInput"}
            ),
            "declared twice",
        ),
        (
            lambda d: d["transitions"].append(
                {"trigger": "teleport", "source": "Bootstrapping", "dest": "Success"}
            ),
            "unknown trigger",
        ),
        (lambda d: d.__setitem__("initial", "Nowhere"), "unknown state"),
        (lambda d: d.pop("transitions"), "malformed"),
        (lambda d: d["states"].pop(), "exactly the five"),
    ],
)
def test_malformed_tables_are_spec_errors(mutate: Any, message: str) -> None:
    doc = copy.deepcopy(DOC)
    mutate(doc)
    with pytest.raises(SpecError, match=message):
        compile_table(doc)


def test_unreadable_table_file(tmp_path: Path) -> None:
    bad = tmp_path / "t.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match="cannot read"):
        load_table(bad)
    bad.write_text("[]")
    with pytest.raises(SpecError, match="JSON object"):
        load_table(bad)


def test_docs_diagram_matches_the_table() -> None:
    text = (ROOT / "docs" / "state-machine.md").read_text()
    found = re.search(
        r"<!-- BEGIN GENERATED DIAGRAM -->\n```mermaid\n(.*?)```\n"
        r"<!-- END GENERATED DIAGRAM -->",
        text,
        re.S,
    )
    assert found, "docs/state-machine.md lost its generated diagram block"
    assert found.group(1) == mermaid(), (
        "docs/state-machine.md drifted from the table: paste the output of `kvpoll diagram`"
    )


def test_diagram_has_one_edge_per_legal_pair() -> None:
    lines = mermaid().splitlines()
    edges = [line for line in lines if "-->" in line and "[*]" not in line]
    pairs = {(s, d) for (s, _e), d in default_table().next.items()}
    assert len(edges) == len(pairs)
    assert "    Transferring --> Transferring : chunk_sent(is_last=False), resumed" in lines
