"""kvpoll's test kit: prove that an implementation follows the table.

Conformance (any implementation, through a small adapter)::

    import pytest
    from kvpoll.testing import KvpollImplementation, check_case, load_cases

    @pytest.mark.parametrize("case", load_cases(), ids=lambda c: c.id)
    def test_conformance(case):
        check_case(KvpollImplementation(), case)

Write an adapter for your own implementation by following the
:class:`Implementation` protocol; ``kvpoll conformance --implementation
mypkg.module:factory`` runs the suite against it from the command line.
"""

from kvpoll.testing.cases import Case, Expect, Step, load_cases
from kvpoll.testing.implementations import (
    KvpollImplementation,
    TransitionsReference,
    implementation_by_name,
)
from kvpoll.testing.runner import (
    CaseResult,
    Implementation,
    ManualClock,
    RegistryDriver,
    Rejected,
    TransferDriver,
    check_case,
    run_case,
    run_cases,
)
from kvpoll.testing.transport_kit import check_transport, pump, wait_for_write

__all__ = [
    "Case",
    "CaseResult",
    "Expect",
    "Implementation",
    "KvpollImplementation",
    "ManualClock",
    "RegistryDriver",
    "Rejected",
    "Step",
    "TransferDriver",
    "TransitionsReference",
    "check_case",
    "check_transport",
    "implementation_by_name",
    "load_cases",
    "pump",
    "run_case",
    "run_cases",
    "wait_for_write",
]
