"""Play conformance cases against an implementation through a small adapter.

An implementation under test provides an :class:`Implementation`: it makes a
:class:`TransferDriver` (one transfer) and, if it has one, a
:class:`RegistryDriver` (many rooms). A driver performs the case's actions and
raises :class:`Rejected` naming the error kind when the implementation refuses
a step. The runner checks the expectations after every step, including that
a rejected step left the status as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kvpoll.testing.cases import Case

__all__ = [
    "CaseResult",
    "Implementation",
    "ManualClock",
    "RegistryDriver",
    "Rejected",
    "TransferDriver",
    "check_case",
    "run_case",
    "run_cases",
]


class Rejected(Exception):
    """Raised by a driver when the implementation refuses a step.

    Args:
        kind: one of ``IllegalTransition``, ``DuplicateRoom``, ``UnknownRoom``,
            ``InvalidArgument``.
    """

    def __init__(self, kind: str, message: str = "") -> None:
        self.kind = kind
        super().__init__(f"{kind}: {message}" if message else kind)


class ManualClock:
    """A clock the runner moves by hand (``advance`` steps), in seconds."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class TransferDriver(Protocol):
    """One transfer of the implementation under test."""

    def do(self, action: str, args: Mapping[str, Any]) -> object:
        """Perform ``bootstrapped``, ``chunk_sent``, ``resumed`` or ``failed``."""

    def status(self) -> str:
        """The current status's name."""

    def sent_tokens(self) -> int:
        """Tokens delivered so far."""


class RegistryDriver(Protocol):
    """A registry of the implementation under test, on the runner's clock."""

    def do(self, action: str, args: Mapping[str, Any]) -> object:
        """Perform ``add``, ``update_status``, ``check_status``, ``remove`` or ``expire``."""

    def status(self, room: int) -> str:
        """The room's status's name (raise :class:`Rejected` for an unknown room)."""


class Implementation(Protocol):
    """What the runner needs from an implementation."""

    name: str
    targets: frozenset[str]
    """Which case targets it supports: ``"transfer"``, ``"registry"``."""

    def new_transfer(self, room: int) -> TransferDriver: ...

    def new_registry(self, timeouts: Mapping[str, float], clock: ManualClock) -> RegistryDriver: ...


@dataclass(frozen=True)
class CaseResult:
    """The outcome of one case on one implementation."""

    case_id: str
    implementation: str
    outcome: str
    """``passed``, ``failed`` or ``unsupported``."""
    message: str = ""

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


class _Mismatch(Exception):
    """An expectation of a case did not hold."""


def _run_transfer(impl: Implementation, case: Case) -> None:
    driver = impl.new_transfer(int(case.setup.get("room", 1)))
    for i, step in enumerate(case.steps, start=1):
        where = f"step {i} ({step.do} {dict(step.args)})"
        before = driver.status(), driver.sent_tokens()
        error = None
        try:
            driver.do(step.do, step.args)
        except Rejected as exc:
            error = exc.kind
        exp = step.expect
        if error != exp.error:
            raise _Mismatch(f"{where}: expected {exp.error or 'success'}, got {error or 'success'}")
        now = driver.status(), driver.sent_tokens()
        if error is not None and now != before:
            raise _Mismatch(f"{where}: a rejected step changed the state {before} -> {now}")
        if exp.status is not None and now[0] != exp.status:
            raise _Mismatch(f"{where}: expected status {exp.status}, got {now[0]}")
        if exp.sent_tokens is not None and now[1] != exp.sent_tokens:
            raise _Mismatch(f"{where}: expected sent_tokens {exp.sent_tokens}, got {now[1]}")


def _run_registry(impl: Implementation, case: Case) -> None:
    clock = ManualClock()
    driver = impl.new_registry(dict(case.setup.get("timeouts", {})), clock)
    for i, step in enumerate(case.steps, start=1):
        where = f"step {i} ({step.do} {dict(step.args)})"
        if step.do == "advance":
            clock.advance(float(step.args["seconds"]))
            continue
        room = step.args.get("room")
        error = None
        result: object = None
        try:
            result = driver.do(step.do, step.args)
        except Rejected as exc:
            error = exc.kind
        exp = step.expect
        if error != exp.error:
            raise _Mismatch(f"{where}: expected {exp.error or 'success'}, got {error or 'success'}")
        if exp.returns is not None and result != exp.returns:
            raise _Mismatch(f"{where}: expected it to return {exp.returns!r}, got {result!r}")
        if exp.status is not None:
            if room is None:
                raise _Mismatch(f"{where}: the case expects a status but names no room")
            try:
                got = driver.status(int(room))
            except Rejected as exc:
                got = exc.kind
            if got != exp.status:
                raise _Mismatch(f"{where}: expected room {room} {exp.status}, got {got}")


def run_case(impl: Implementation, case: Case) -> CaseResult:
    """Play one case; never raises for a mismatch (see :func:`check_case`)."""
    if case.target not in impl.targets:
        return CaseResult(
            case.id, impl.name, "unsupported", f"{impl.name} has no {case.target} implementation"
        )
    try:
        if case.target == "transfer":
            _run_transfer(impl, case)
        else:
            _run_registry(impl, case)
    except _Mismatch as exc:
        return CaseResult(case.id, impl.name, "failed", f"{case.id}: {exc} [rule: {case.rule}]")
    except Exception as exc:
        return CaseResult(
            case.id,
            impl.name,
            "failed",
            f"{case.id}: the implementation raised {exc!r} [rule: {case.rule}]",
        )
    return CaseResult(case.id, impl.name, "passed")


def check_case(impl: Implementation, case: Case) -> None:
    """Play one case from a test; raise AssertionError on a mismatch.

    An unsupported target is reported through ``pytest.skip`` when pytest runs.
    """
    result = run_case(impl, case)
    if result.outcome == "unsupported":
        import pytest

        pytest.skip(result.message)
    if not result.passed:
        raise AssertionError(result.message)


def run_cases(impl: Implementation, cases: Iterable[Case]) -> list[CaseResult]:
    """Play every case."""
    return [run_case(impl, case) for case in cases]
