"""The conformance suite: valid data, and kvpoll and the reference both pass it."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from kvpoll import SpecError
from kvpoll.spec_files import spec_dir
from kvpoll.testing import (
    Case,
    KvpollImplementation,
    ManualClock,
    Rejected,
    TransitionsReference,
    check_case,
    implementation_by_name,
    load_cases,
    run_case,
)

CASES = load_cases()
SCHEMA = json.loads((spec_dir() / "case-schema.json").read_text())


@pytest.mark.parametrize(
    "path", sorted((spec_dir() / "cases").glob("*.json")), ids=lambda p: p.name
)
def test_case_files_match_the_schema(path: Path) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.validate(json.loads(path.read_text()), SCHEMA, cls=jsonschema.Draft202012Validator)


def test_ids_are_unique_and_the_suite_is_big_enough() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 40


def test_every_required_topic_has_cases() -> None:
    ids = {c.id for c in CASES}
    for required in (
        "seed-small-one-chunk",
        "seed-large-one-resume",
        "chunks-five-with-resumes",
        "resume-reset-rejected",
        "resume-rewind-rejected",
        "registry-duplicate-room",
        "registry-late-failure-after-removal",
        "registry-fan-in-one-fails",
        "timeout-bootstrapping",
        "timeout-waiting",
        "timeout-transferring",
    ):
        assert required in ids
    states = ("bootstrapping", "waiting", "transferring", "success", "failed")
    events = ("bootstrapped", "chunk", "last-chunk", "resumed", "failed")
    illegal = {i for i in ids if i.startswith("illegal-")}
    assert len(illegal) == 16  # 25 (state, event) pairs, 9 legal
    assert illegal <= {f"illegal-{s}-{e}" for s in states for e in events}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kvpoll_conforms(case: Case) -> None:
    check_case(KvpollImplementation(), case)


@pytest.mark.parametrize("case", [c for c in CASES if c.target == "transfer"], ids=lambda c: c.id)
def test_transitions_reference_conforms(case: Case) -> None:
    check_case(TransitionsReference(), case)


class _LenientTransfer:
    """A broken implementation: the old max()-style rules."""

    order = ("Bootstrapping", "WaitingForInput", "Transferring", "Success")

    def __init__(self) -> None:
        self.state = "Bootstrapping"
        self.tokens = 0

    def do(self, action: str, args: Mapping[str, Any]) -> object:
        new = {
            "bootstrapped": "WaitingForInput",
            "resumed": "WaitingForInput",
            "failed": "Failed",
        }.get(action, "Success")  # ignores is_last
        if self.state != "Failed" and (
            new == "Failed" or self.order.index(new) >= self.order.index(self.state)
        ):
            self.state = new
        self.tokens = int(args.get("sent_tokens", self.tokens))  # crashes on bad input
        return None

    def status(self) -> str:
        return self.state

    def sent_tokens(self) -> int:
        return self.tokens


class LenientImplementation:
    name = "lenient"
    targets = frozenset({"transfer"})

    def new_transfer(self, room: int) -> _LenientTransfer:
        return _LenientTransfer()

    def new_registry(self, timeouts: Mapping[str, float], clock: ManualClock) -> Any:
        raise NotImplementedError


def test_the_runner_catches_the_seed_bugs() -> None:
    impl = LenientImplementation()
    by_id = {c.id: c for c in CASES}
    for bug in (
        "chunks-partial-first-is-not-success",
        "resume-reset-rejected",
        "seed-large-one-resume",
    ):
        result = run_case(impl, by_id[bug])
        assert result.outcome == "failed", bug
        assert bug in result.message
    outcomes = Counter(run_case(impl, c).outcome for c in CASES)
    assert outcomes["unsupported"] == sum(c.target == "registry" for c in CASES)
    assert outcomes["failed"] > 20


def test_check_case_raises_assertion_error_on_mismatch() -> None:
    case = next(c for c in CASES if c.id == "resume-reset-rejected")
    with pytest.raises(AssertionError, match="resume-reset-rejected"):
        check_case(LenientImplementation(), case)


def test_load_cases_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(
        json.dumps(
            {
                "description": "x",
                "cases": [
                    {
                        "id": "dup",
                        "description": "d",
                        "rule": "r",
                        "target": "transfer",
                        "steps": [{"do": "bootstrapped"}],
                    }
                ],
            }
        )
    )
    (tmp_path / "b.json").write_text((tmp_path / "a.json").read_text())
    with pytest.raises(SpecError, match="'dup' is in both"):
        load_cases(tmp_path)
    (tmp_path / "b.json").write_text('{"cases": [{"id": "x"}]}')
    with pytest.raises(SpecError, match=r"b\.json"):
        load_cases(tmp_path)
    with pytest.raises(SpecError, match="no conformance cases"):
        load_cases(tmp_path / "empty")


def test_implementation_by_name() -> None:
    assert implementation_by_name("kvpoll").name == "kvpoll"
    assert implementation_by_name("transitions").name == "transitions"
    loaded = implementation_by_name("kvpoll.testing:KvpollImplementation")
    assert loaded.name == "kvpoll"
    with pytest.raises(Exception, match="unknown implementation"):
        implementation_by_name("nope")
    with pytest.raises(Exception, match="cannot load"):
        implementation_by_name("no.such.module:thing")


def test_rejected_carries_its_kind() -> None:
    assert Rejected("IllegalTransition", "why").kind == "IllegalTransition"
