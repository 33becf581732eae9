"""Waiting for rooms to end: one, any of many, each as it ends; blocking or in asyncio.

:class:`~kvpoll.protocol.endpoint.Endpoint` builds its ``wait*`` methods on
:class:`Waiter`. A blocking wait sleeps on the endpoint's condition (notified
when a room ends or is removed: no other step wakes it); an asyncio wait
registers a *waker* that the I/O thread calls (through
``loop.call_soon_threadsafe``) whenever a room ends or is removed, so no
thread is tied up and nothing polls.

Time limits: ``timeout=None`` waits without a limit; a number is seconds
(``0``: look once and return).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TypeVar

from kvpoll.errors import InvalidArgument
from kvpoll.statemachine import TransferStatus

__all__ = ["Completion", "Waiter", "check_rooms", "check_timeout"]

T = TypeVar("T")
Poll = Callable[[int], TransferStatus]


def check_timeout(timeout: float | None) -> float | None:
    """``timeout`` checked: None (no limit) or seconds >= 0.

    Raises:
        InvalidArgument: anything else (a negative number, NaN, a string).
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0:
        raise InvalidArgument(
            f"timeout must be seconds >= 0, or None to wait without a limit; not {timeout!r}"
        )
    return None if math.isinf(timeout) else float(timeout)


def check_rooms(rooms: Iterable[int]) -> list[int]:
    """``rooms`` as a list of distinct room ids (in the order given).

    Raises:
        InvalidArgument: not an iterable of ints, or empty.
    """
    if isinstance(rooms, int | str | bytes):
        raise InvalidArgument(f"rooms must be an iterable of room ids, not {rooms!r}")
    listed = list(dict.fromkeys(rooms))
    bad = [r for r in listed if isinstance(r, bool) or not isinstance(r, int)]
    if bad:
        raise InvalidArgument(f"room ids are ints, not {bad[0]!r}")
    if not listed:
        raise InvalidArgument("no rooms to wait for")
    return listed


def _deadline(timeout: float | None) -> float | None:
    checked = check_timeout(timeout)
    return None if checked is None else time.monotonic() + checked


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Waiter:
    """Blocking and asyncio waits over one endpoint's rooms."""

    def __init__(self, poll: Poll, changed: threading.Condition) -> None:
        self._poll = poll
        self._changed = changed
        self._wakers: set[Callable[[], None]] = set()

    def wake(self) -> None:
        """Rooms ended or went away: wake every asyncio waiter (called on the I/O thread)."""
        for waker in list(self._wakers):
            waker()

    def finals(self, rooms: list[int]) -> dict[int, TransferStatus]:
        """The rooms among ``rooms`` that are final now, with their status."""
        done = {}
        for room in rooms:
            status = self._poll(room)
            if status.is_final:
                done[room] = status
        return done

    # -- blocking -------------------------------------------------------------------
    def until(self, check: Callable[[], T | None], timeout: float | None) -> T | None:
        """``check()``'s first answer that is not None, or None when time runs out."""
        deadline = _deadline(timeout)
        with self._changed:
            while True:
                answer = check()
                left = _left(deadline)
                if answer is not None or left == 0.0:
                    return answer
                self._changed.wait(left)

    # -- asyncio ------------------------------------------------------------------------
    async def until_async(self, check: Callable[[], T | None], timeout: float | None) -> T | None:
        """As :meth:`until`, awaiting instead of blocking."""
        deadline = _deadline(timeout)
        loop = asyncio.get_running_loop()
        event = asyncio.Event()

        def waker() -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(event.set)

        with self._changed:
            self._wakers.add(waker)
        try:
            while True:
                event.clear()
                answer = check()
                left = _left(deadline)
                if answer is not None or left == 0.0:
                    return answer
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), left)
        finally:
            with self._changed:
                self._wakers.discard(waker)


class Completion(Iterator[tuple[int, TransferStatus]], AsyncIterator[tuple[int, TransferStatus]]):
    """Rooms as they end: ``(room, final status)``, in the order they end.

    Iterate it (``for``, blocking) or in asyncio (``async for``). When the time
    limit passes with rooms still unfinished, the next step raises
    :class:`TimeoutError` naming them. A room removed while waited for raises
    :class:`~kvpoll.UnknownRoom`.
    """

    def __init__(self, waiter: Waiter, rooms: Iterable[int], timeout: float | None) -> None:
        self._waiter = waiter
        self._pending = check_rooms(rooms)
        self._timeout = check_timeout(timeout)
        self._deadline = _deadline(self._timeout)
        self._ready: list[tuple[int, TransferStatus]] = []

    @property
    def pending(self) -> list[int]:
        """The rooms not handed out yet."""
        return [*(room for room, _ in self._ready), *self._pending]

    def _check(self) -> list[tuple[int, TransferStatus]] | None:
        done = self._waiter.finals(self._pending)
        return list(done.items()) or None

    def _take(self, found: list[tuple[int, TransferStatus]] | None) -> tuple[int, TransferStatus]:
        if found is None:
            raise TimeoutError(
                f"{len(self._pending)} rooms not final after {self._timeout} s: {self._pending}"
            )
        for room, _ in found:
            self._pending.remove(room)
        self._ready.extend(found)
        return self._ready.pop(0)

    def __iter__(self) -> Completion:
        return self

    def __next__(self) -> tuple[int, TransferStatus]:
        if self._ready:
            return self._ready.pop(0)
        if not self._pending:
            raise StopIteration
        return self._take(self._waiter.until(self._check, _left(self._deadline)))

    def __aiter__(self) -> Completion:
        return self

    async def __anext__(self) -> tuple[int, TransferStatus]:
        if self._ready:
            return self._ready.pop(0)
        if not self._pending:
            raise StopAsyncIteration
        return self._take(await self._waiter.until_async(self._check, _left(self._deadline)))
