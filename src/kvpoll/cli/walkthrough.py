"""``kvpoll walkthrough``: the three transfer scenarios, step by step, on the table.

A small transfer that fits the receive buffer, a large one that needs a
resume, a larger one that needs several, then a failure, then the two bugs
the table exists to stop: a reset to 0 on resume, and a "last" chunk that
brings no new data.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TextIO

from kvpoll.errors import IllegalTransition
from kvpoll.statemachine.state import TransferState

__all__ = ["describe_chunks", "walkthrough"]

DEFAULT_TOKENS = (500, 2000, 5000)


def describe_chunks(total: int, capacity: int) -> str:
    """How ``total`` tokens move through buffers of ``capacity``, in words."""
    chunks = -(-total // capacity)
    if chunks == 1:
        return "one chunk"
    if chunks == 2:
        return "a chunk, a resume, the rest"
    return f"{chunks} chunks, {chunks - 1} resumes"


def _chunks(total: int, capacity: int) -> list[tuple[int, bool]]:
    sent, out = 0, []
    while sent < total:
        sent = min(total, sent + capacity)
        out.append((sent, sent == total))
    return out


def walkthrough(
    out: TextIO, *, capacity: int = 1024, tokens: tuple[int, ...] = DEFAULT_TOKENS
) -> int:
    """Print every transition of the scenarios (one per entry of ``tokens``); return
    an exit code."""

    def show(state: TransferState, call: str, step: Callable[[], object]) -> None:
        before = state.status
        step()
        out.write(
            f"  room {state.room}: {call:<46} {before} -> {state.status}"
            f"  (sent_tokens={state.sent_tokens})\n"
        )

    ok = True
    rooms = [1, 2, *range(4, 4 + max(0, len(tokens) - 2))]  # room 3 is the failure
    for room, total in zip(rooms, tokens, strict=False):
        title = f"{room}: {total} tokens, {describe_chunks(total, capacity)}"
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
    out.write("scenario 3: a failure, from any unfinished status -> Failed\n")
    state = TransferState(3)
    show(state, "bootstrapped()", state.bootstrapped)
    show(
        state,
        f"chunk_sent(sent_tokens={capacity}, is_last=False)",
        lambda: state.chunk_sent(sent_tokens=capacity, is_last=False),
    )
    show(state, "failed('encoder died')", lambda: state.failed("encoder died"))
    out.write("the old bugs, now rejected:\n")
    state = TransferState(max(rooms) + 1)
    state.bootstrapped()
    state.chunk_sent(sent_tokens=capacity, is_last=False)
    bugs: list[tuple[str, Callable[[], object]]] = [
        ("resumed(sent_tokens=0)  [reset on resume]", lambda: state.resumed(sent_tokens=0)),
        (
            f"chunk_sent(sent_tokens={capacity}, is_last=True)  [no new data]",
            lambda: state.chunk_sent(sent_tokens=capacity, is_last=True),
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
