from __future__ import annotations

import pytest

from kvpoll import InvalidArgument, KvpollError, TransferStatus
from kvpoll.compat.sglang import from_sglang, to_sglang


def test_codes_match_sglang() -> None:
    assert to_sglang(TransferStatus.Failed) == 0
    assert to_sglang(TransferStatus.Bootstrapping) == 1
    assert to_sglang(TransferStatus.WaitingForInput) == 2
    assert to_sglang(TransferStatus.Transferring) == 3
    assert to_sglang(TransferStatus.Success) == 4


def test_round_trip() -> None:
    for status in TransferStatus:
        assert from_sglang(to_sglang(status)) is status
    for code in range(5):
        assert to_sglang(from_sglang(code)) == code


def test_min_across_ranks_means_failed_in_sglang_order() -> None:
    codes = [to_sglang(TransferStatus.Success), to_sglang(TransferStatus.Failed)]
    assert from_sglang(min(codes)) is TransferStatus.Failed


@pytest.mark.parametrize("code", [-1, 5, 99, True, "1", 1.0, None])
def test_unknown_code_is_a_clear_error(code: object) -> None:
    with pytest.raises(InvalidArgument, match="unknown SGLang status code") as info:
        from_sglang(code)  # type: ignore[arg-type]
    assert isinstance(info.value, KvpollError)


def test_to_sglang_rejects_a_plain_int() -> None:
    with pytest.raises(InvalidArgument):
        to_sglang(3)  # type: ignore[arg-type]
