"""What is in flight (kvpoll.transports.inflight): bounds, order, waiting without failing."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvpoll.transports.inflight import InFlight, Limits

LIMITS = Limits(peer_ranges=10, peer_bytes=1000, ranges=15, bytes=10_000)


class Engine:
    """Records which writes were handed over, in order."""

    def __init__(self) -> None:
        self.started: list[int] = []

    def start(self, write_id: int) -> Callable[[], None]:
        return lambda: self.started.append(write_id)


def test_writes_that_fit_start_at_once_and_the_rest_wait_in_order() -> None:
    engine, flight = Engine(), InFlight(LIMITS, stall=30.0)
    assert flight.add(1, "a", 6, 100, engine.start(1), now=0.0)
    assert not flight.add(2, "a", 6, 100, engine.start(2), now=0.0)  # a's ranges: 12 > 10
    assert flight.add(3, "b", 6, 100, engine.start(3), now=0.0)  # b has room of its own
    assert not flight.add(4, "b", 6, 100, engine.start(4), now=0.0)  # 18 > 15 in all
    assert not flight.add(5, "c", 1, 1, engine.start(5), now=0.0)  # nobody passes 4
    assert engine.started == [1, 3]
    assert flight.waiting == 3
    flight.done(1, now=1.0)
    assert list(flight.admit_waiting(now=1.0)) == []
    assert engine.started == [1, 3, 2]  # a's next; 4 still waits for the total
    flight.done(3, now=2.0)
    list(flight.admit_waiting(now=2.0))
    assert engine.started == [1, 3, 2, 4, 5]
    assert flight.waiting == 0


def test_a_write_larger_than_a_limit_goes_alone() -> None:
    engine, flight = Engine(), InFlight(LIMITS, stall=30.0)
    assert flight.add(1, "a", 2, 10, engine.start(1), now=0.0)
    assert not flight.add(2, "a", 500, 5000, engine.start(2), now=0.0)
    flight.done(1, now=1.0)
    list(flight.admit_waiting(now=1.0))
    assert engine.started == [1, 2]
    assert not flight.add(3, "a", 1, 1, engine.start(3), now=1.0)  # behind the big one
    flight.done(2, now=2.0)
    list(flight.admit_waiting(now=2.0))
    assert engine.started == [1, 2, 3]


def test_a_waiting_write_fails_only_when_its_peer_makes_no_progress() -> None:
    engine, flight = Engine(), InFlight(LIMITS, stall=5.0)
    flight.add(1, "a", 10, 10, engine.start(1), now=0.0)
    flight.add(2, "a", 10, 10, engine.start(2), now=0.0)
    flight.add(3, "a", 10, 10, engine.start(3), now=0.0)
    assert flight.expired(4.0) == []
    flight.done(1, now=4.0)  # progress: 2 goes in, 3 waits on
    list(flight.admit_waiting(now=4.0))
    assert flight.expired(8.0) == []  # 4 s since a's last progress
    late = flight.expired(9.5)
    assert [write_id for write_id, _ in late] == [3]
    assert "no write to a finished" in late[0][1]
    assert flight.waiting == 0
    assert engine.started == [1, 2]


def test_a_closed_peers_waiting_writes_are_dropped_and_a_failing_start_frees_its_share() -> None:
    engine, flight = Engine(), InFlight(LIMITS, stall=30.0)
    flight.add(1, "a", 10, 10, engine.start(1), now=0.0)
    flight.add(2, "a", 10, 10, engine.start(2), now=0.0)
    assert flight.drop_peer("a") == [2]
    assert flight.done(1, now=1.0)
    assert not flight.done(1, now=1.0)  # once
    assert not flight.busy

    def refuse() -> None:
        raise RuntimeError("the engine said no")

    with pytest.raises(RuntimeError):
        flight.add(3, "b", 1, 1, refuse, now=2.0)
    assert not flight.busy  # nothing held for it
    flight.add(4, "b", 10, 10, engine.start(4), now=2.0)
    flight.add(5, "b", 1, 1, refuse, now=2.0)
    flight.done(4, now=3.0)
    failed = list(flight.admit_waiting(now=3.0))
    assert [(write_id, str(exc)) for write_id, exc in failed] == [(5, "the engine said no")]
    assert not flight.busy


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Limits(peer_ranges=0, peer_bytes=1, ranges=1, bytes=1)
