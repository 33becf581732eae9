"""TransferState, step by step: the whole state is checked after every step."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import pytest

from kvpoll import Event, IllegalTransition, InvalidArgument, KvpollError, TransferState
from kvpoll import TransferStatus as S


def snapshot(state: TransferState) -> tuple[S, int, tuple[object, ...], str | None]:
    return state.status, state.sent_tokens, state.history, state.reason


def test_new_transfer_is_bootstrapping_with_nothing_sent() -> None:
    state = TransferState(7)
    assert (state.room, state.status, state.sent_tokens, state.history) == (
        7,
        S.Bootstrapping,
        0,
        (),
    )
    assert not state.is_final


def test_seed_scenario_small_one_chunk() -> None:
    state = TransferState(1)
    assert state.bootstrapped() is S.WaitingForInput
    assert state.chunk_sent(sent_tokens=500, is_last=True) is S.Success
    assert (state.status, state.sent_tokens) == (S.Success, 500)
    assert state.is_final


def test_seed_scenario_large_with_resume_records_history() -> None:
    state = TransferState(2)
    state.bootstrapped()
    assert state.chunk_sent(sent_tokens=1024, is_last=False) is S.Transferring
    assert state.resumed(sent_tokens=1024) is S.Transferring
    assert state.chunk_sent(sent_tokens=2000, is_last=True) is S.Success
    steps = [(t.source, t.dest, t.event, t.sent_tokens) for t in state.history]
    assert steps == [
        (S.Bootstrapping, S.WaitingForInput, Event.BOOTSTRAPPED, 0),
        (S.WaitingForInput, S.Transferring, Event.CHUNK_SENT, 1024),
        (S.Transferring, S.Transferring, Event.RESUMED, 1024),
        (S.Transferring, S.Success, Event.LAST_CHUNK_SENT, 2000),
    ]
    times = [t.at for t in state.history]
    assert times == sorted(times)


def test_many_chunks_stay_transferring_until_the_last() -> None:
    state = TransferState(3)
    state.bootstrapped()
    for sent in range(1024, 5000, 1024):
        assert state.chunk_sent(sent_tokens=sent, is_last=False) is S.Transferring
        assert state.resumed(sent_tokens=sent) is S.Transferring
    assert state.chunk_sent(sent_tokens=5000, is_last=True) is S.Success


@pytest.mark.parametrize("prefix", [[], ["bootstrapped"], ["bootstrapped", "chunk"]])
def test_failure_from_every_unfinished_state_keeps_the_reason(prefix: list[str]) -> None:
    state = TransferState(4)
    for step in prefix:
        if step == "bootstrapped":
            state.bootstrapped()
        else:
            state.chunk_sent(sent_tokens=10, is_last=False)
    assert state.failed("peer died") is S.Failed
    assert state.reason == "peer died"


def test_reset_on_resume_is_rejected_and_changes_nothing() -> None:
    state = TransferState(5)
    state.bootstrapped()
    state.chunk_sent(sent_tokens=1024, is_last=False)
    before = snapshot(state)
    with pytest.raises(IllegalTransition) as info:
        state.resumed(sent_tokens=0)
    err = info.value
    assert (err.room, err.status, err.event) == (5, S.Transferring, "resumed")
    assert err.trigger is Event.RESUMED
    for word in ("room 5", "Transferring", "resumed", "reset"):
        assert word in str(err)
    assert snapshot(state) == before


@pytest.mark.parametrize(("tokens", "word"), [(512, "rewind"), (2048, "ahead")])
def test_resume_must_carry_the_delivered_tokens(tokens: int, word: str) -> None:
    state = TransferState(6)
    state.bootstrapped()
    state.chunk_sent(sent_tokens=1024, is_last=False)
    before = snapshot(state)
    with pytest.raises(IllegalTransition, match=word):
        state.resumed(sent_tokens=tokens)
    assert snapshot(state) == before


def test_partial_chunk_never_reports_success() -> None:
    state = TransferState(8)
    state.bootstrapped()
    assert state.chunk_sent(sent_tokens=1, is_last=False) is not S.Success


@pytest.mark.parametrize("is_last", [False, True])
@pytest.mark.parametrize("tokens", [0, 1024, 1000])
def test_chunk_tokens_must_strictly_increase(is_last: bool, tokens: int) -> None:
    state = TransferState(9)
    state.bootstrapped()
    state.chunk_sent(sent_tokens=1024, is_last=False) if tokens else None
    before = snapshot(state)
    with pytest.raises(IllegalTransition, match="must increase") as info:
        state.chunk_sent(sent_tokens=tokens, is_last=is_last)
    assert info.value.event == "chunk_sent"
    assert snapshot(state) == before


@pytest.mark.parametrize("final", ["success", "failed"])
def test_final_states_accept_nothing(final: str) -> None:
    state = TransferState(10)
    state.bootstrapped()
    if final == "success":
        state.chunk_sent(sent_tokens=5, is_last=True)
    else:
        state.failed("x")
    before = snapshot(state)
    calls: list[Callable[[], object]] = [
        state.bootstrapped,
        lambda: state.chunk_sent(sent_tokens=99, is_last=False),
        lambda: state.chunk_sent(sent_tokens=99, is_last=True),
        lambda: state.resumed(sent_tokens=5),
        lambda: state.failed("late"),
    ]
    for call in calls:
        with pytest.raises(IllegalTransition, match="is final"):
            call()
        assert snapshot(state) == before


def test_rejections_name_the_public_event() -> None:
    state = TransferState(11)
    with pytest.raises(IllegalTransition) as info:
        state.chunk_sent(sent_tokens=5, is_last=True)
    assert info.value.event == "chunk_sent"
    assert info.value.trigger is Event.LAST_CHUNK_SENT
    assert "is_last=True" in str(info.value)
    with pytest.raises(IllegalTransition) as info2:
        state.resumed(sent_tokens=0)
    assert info2.value.event == "resumed"
    state.bootstrapped()
    with pytest.raises(IllegalTransition) as info3:
        state.bootstrapped()
    assert (info3.value.event, info3.value.status) == ("bootstrapped", S.WaitingForInput)


def test_errors_are_kvpoll_errors_and_pickle() -> None:
    state = TransferState(12)
    with pytest.raises(KvpollError) as info:
        state.resumed(sent_tokens=3)
    copy = pickle.loads(pickle.dumps(info.value))
    assert isinstance(copy, IllegalTransition)
    assert (copy.room, copy.status, copy.event, str(copy)) == (
        12,
        S.Bootstrapping,
        "resumed",
        str(info.value),
    )


def test_bad_argument_types_are_typed_errors_that_change_nothing() -> None:
    state = TransferState(13)
    state.bootstrapped()
    before = snapshot(state)
    for bad in ("10", 1.5, None, True):
        with pytest.raises(InvalidArgument):
            state.chunk_sent(sent_tokens=bad, is_last=False)  # type: ignore[arg-type]
        assert snapshot(state) == before
    with pytest.raises(InvalidArgument):
        TransferState("room")  # type: ignore[arg-type]


def test_index_like_tokens_are_accepted() -> None:
    class Tokens:
        def __init__(self, n: int) -> None:
            self.n = n

        def __index__(self) -> int:
            return self.n

    state = TransferState(14)
    state.bootstrapped()
    state.chunk_sent(sent_tokens=Tokens(10), is_last=False)  # type: ignore[arg-type]
    state.resumed(sent_tokens=Tokens(10))  # type: ignore[arg-type]
    assert state.sent_tokens == 10
    assert type(state.sent_tokens) is int


def test_history_can_be_switched_off() -> None:
    state = TransferState(15, history=False)
    state.bootstrapped()
    state.chunk_sent(sent_tokens=1, is_last=True)
    assert state.history == ()
    assert state.status is S.Success


def test_can_reports_what_the_table_allows() -> None:
    state = TransferState(16)
    assert state.can(Event.BOOTSTRAPPED)
    assert state.can(Event.FAILED)
    assert not state.can(Event.RESUMED)


def test_status_names_and_codes() -> None:
    assert [s.value for s in S] == [0, 1, 2, 3, 4]
    assert [s.name for s in S] == [
        "Bootstrapping",
        "WaitingForInput",
        "Transferring",
        "Success",
        "Failed",
    ]
    assert str(S.Transferring) == "Transferring"
    assert f"{S.Success:>8}" == " Success"
    assert [s.is_final for s in S] == [False, False, False, True, True]
