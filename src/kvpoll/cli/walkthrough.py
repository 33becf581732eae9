"""``kvpoll walkthrough``: the seed's three scenarios, step by step, on the table."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TextIO

from kvpoll.errors import IllegalTransition
from kvpoll.statemachine.state import TransferState

__all__ = ["walkthrough"]


def _chunks(total: int, capacity: int) -> list[tuple[int, bool]]:
    sent, out = 0, []
    while sent < total:
        sent = min(total, sent + capacity)
        out.append((sent, sent == total))
    return out


def walkthrough(out: TextIO, *, capacity: int = 1024) -> int:
    """Print every transition of the seed's scenarios; return an exit code."""

    def show(state: TransferState, call: str, step: Callable[[], object]) -> None:
        before = state.status
        step()
        out.write(
            f"  room {state.room}: {call:<46} {before} -> {state.status}"
            f"  (sent_tokens={state.sent_tokens})\n"
        )

    ok = True
    scenarios = [
        ("1, small: 500 tokens, one chunk", 1, 500),
        ("2, large: 2000 tokens, a chunk, a resume, the rest", 2, 2000),
        ("beyond the seed: 5000 tokens, several resumes", 4, 5000),
    ]
    for title, room, total in scenarios:
        out.write(f"scenario {title} (buffer {capacity} tokens)\n")
        state = TransferState(room)
        show(state, "bootstrapped()", state.bootstrapped)
        for i, (sent, last) in enumerate(_chunks(total, capacity)):
            if i:
                delivered = state.sent_tokens
                show(
                    state,
                    f"resumed(sent_tokens={delivered})",
                    partial(state.resumed, sent_tokens=delivered),
                )
            show(
                state,
                f"chunk_sent(sent_tokens={sent}, is_last={last})",
                partial(state.chunk_sent, sent_tokens=sent, is_last=last),
            )
        ok &= state.status.name == "Success"
    out.write("scenario 3, failure: any unfinished state -> Failed\n")
    state = TransferState(3)
    show(state, "bootstrapped()", state.bootstrapped)
    show(
        state,
        "chunk_sent(sent_tokens=1024, is_last=False)",
        lambda: state.chunk_sent(sent_tokens=1024, is_last=False),
    )
    show(state, "failed('encoder died')", lambda: state.failed("encoder died"))
    out.write("the old bugs, now rejected:\n")
    state = TransferState(5)
    state.bootstrapped()
    state.chunk_sent(sent_tokens=1024, is_last=False)
    bugs: list[tuple[str, Callable[[], object]]] = [
        ("resumed(sent_tokens=0)  [reset on resume]", lambda: state.resumed(sent_tokens=0)),
        (
            "chunk_sent(sent_tokens=1024, is_last=True)  [no new data]",
            lambda: state.chunk_sent(sent_tokens=1024, is_last=True),
        ),
    ]
    for call, step in bugs:
        try:
            step()
        except IllegalTransition as exc:
            out.write(f"  rejected: {exc}\n")
        else:
            out.write(f"  ACCEPTED (a bug): {call}\n")
            ok = False
    out.write("all scenarios followed the table\n" if ok else "a scenario broke the table\n")
    return 0 if ok else 1
