"""The conformance cases: their model, and loading them from ``spec/cases``.

The format is described for humans in ``spec/README.md`` and for machines in
``spec/case-schema.json``; the pydantic models here are its Python reading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvpoll.errors import SpecError
from kvpoll.spec_files import spec_dir

__all__ = ["Case", "Expect", "Step", "load_cases"]

ErrorName = Literal["IllegalTransition", "DuplicateRoom", "UnknownRoom", "InvalidArgument"]
TransferAction = Literal["bootstrapped", "chunk_sent", "resumed", "failed"]
RegistryAction = Literal["add", "update_status", "check_status", "remove", "advance", "expire"]


class Expect(BaseModel):
    """What must hold after a step."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    status: str | None = None
    sent_tokens: int | None = None
    error: ErrorName | None = None
    returns: Any = None


class Step(BaseModel):
    """One action and what must hold after it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    do: TransferAction | RegistryAction
    args: dict[str, Any] = Field(default_factory=dict)
    expect: Expect = Field(default_factory=Expect)


class Case(BaseModel):
    """One conformance case."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    description: str
    rule: str
    target: Literal["transfer", "registry"]
    setup: dict[str, Any] = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1)
    file: str = ""


def load_cases(directory: Path | None = None) -> list[Case]:
    """Read every ``*.json`` case file (default: kvpoll's ``spec/cases``).

    Raises:
        SpecError: a file is unreadable or malformed, or two cases share an id.
    """
    directory = directory if directory is not None else spec_dir() / "cases"
    cases: list[Case] = []
    seen: dict[str, str] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            batch = [Case.model_validate({**raw, "file": path.name}) for raw in doc["cases"]]
        except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
            raise SpecError(f"{path}: {exc}") from exc
        for case in batch:
            if case.id in seen:
                raise SpecError(f"case id {case.id!r} is in both {seen[case.id]} and {path.name}")
            seen[case.id] = path.name
        cases.extend(batch)
    if not cases:
        raise SpecError(f"no conformance cases found in {directory}")
    return cases
