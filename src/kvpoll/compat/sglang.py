"""SGLang's status codes.

SGLang numbers the statuses so that a minimum across tensor-parallel ranks is
Failed when any rank failed: ``Failed=0, Bootstrapping=1, WaitingForInput=2,
Transferring=3, Success=4``. kvpoll numbers them in order of progress with
Failed last. Convert at the boundary, never compare codes across the two.
"""

from __future__ import annotations

from types import MappingProxyType

from kvpoll.errors import InvalidArgument
from kvpoll.statemachine.status import TransferStatus

__all__ = ["SGLANG_CODES", "from_sglang", "to_sglang"]

SGLANG_CODES = MappingProxyType(
    {
        TransferStatus.Failed: 0,
        TransferStatus.Bootstrapping: 1,
        TransferStatus.WaitingForInput: 2,
        TransferStatus.Transferring: 3,
        TransferStatus.Success: 4,
    }
)
"""kvpoll status -> SGLang's ``KVPoll`` code."""

_FROM = {code: status for status, code in SGLANG_CODES.items()}


def to_sglang(status: TransferStatus) -> int:
    """SGLang's code for ``status``.

    Raises:
        InvalidArgument: ``status`` is not a :class:`~kvpoll.TransferStatus`.
    """
    if not isinstance(status, TransferStatus):
        raise InvalidArgument(f"not a TransferStatus: {status!r}")
    return SGLANG_CODES[status]


def from_sglang(code: int) -> TransferStatus:
    """The status SGLang's ``code`` stands for.

    Raises:
        InvalidArgument: ``code`` is not one of SGLang's five codes (0..4).
    """
    if isinstance(code, bool) or not isinstance(code, int) or code not in _FROM:
        raise InvalidArgument(
            f"unknown SGLang status code {code!r}: expected one of 0 (Failed), "
            "1 (Bootstrapping), 2 (WaitingForInput), 3 (Transferring), 4 (Success)"
        )
    return _FROM[code]
