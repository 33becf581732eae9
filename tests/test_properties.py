"""Property tests over random event sequences, and every (state, event) pair."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from kvpoll import IllegalTransition, TransferState
from kvpoll import TransferStatus as S

PROGRESS = [S.Bootstrapping, S.WaitingForInput, S.Transferring, S.Success]

events: st.SearchStrategy[tuple[str, dict[str, object]]] = st.one_of(
    st.just(("bootstrapped", {})),
    st.builds(
        lambda n, last: ("chunk_sent", {"sent_tokens": n, "is_last": last}),
        st.integers(0, 5000),
        st.booleans(),
    ),
    st.builds(lambda n: ("resumed", {"sent_tokens": n}), st.integers(0, 5000)),
    st.builds(lambda r: ("failed", {"reason": r}), st.text(max_size=5)),
    # a resume with exactly the delivered tokens, so legal resumes happen often
    st.just(("resume-delivered", {})),
)


def fire(state: TransferState, name: str, args: dict[str, object]) -> None:
    if name == "resume-delivered":
        state.resumed(sent_tokens=state.sent_tokens)
    else:
        getattr(state, name)(**args)


@settings(max_examples=400, deadline=None)
@given(st.lists(events, max_size=30))
def test_status_never_moves_back_and_rejections_change_nothing(
    sequence: list[tuple[str, dict[str, object]]],
) -> None:
    state = TransferState(1)
    for name, args in sequence:
        before = (state.status, state.sent_tokens, state.history, state.reason)
        try:
            fire(state, name, args)
        except IllegalTransition as exc:
            assert (state.status, state.sent_tokens, state.history, state.reason) == before
            assert exc.status is before[0]
            assert exc.room == 1
            continue
        old, new = before[0], state.status
        if old is not S.Failed and new is not S.Failed:
            assert PROGRESS.index(new) >= PROGRESS.index(old)
        assert new is not S.Failed or old is not S.Success
        assert state.sent_tokens >= before[1]
        if name == "chunk_sent":
            assert state.sent_tokens > before[1]
            assert (new is S.Success) == bool(args["is_last"])
        if name.startswith("resume"):
            assert new is old is S.Transferring
        assert len(state.history) == len(before[2]) + 1


@settings(max_examples=200, deadline=None)
@given(st.lists(events, max_size=30))
def test_final_states_stay_final(sequence: list[tuple[str, dict[str, object]]]) -> None:
    state = TransferState(2)
    final_seen: S | None = None
    for name, args in sequence:
        with contextlib.suppress(IllegalTransition):
            fire(state, name, args)
        if final_seen is not None:
            assert state.status is final_seen
        elif state.status.is_final:
            final_seen = state.status
