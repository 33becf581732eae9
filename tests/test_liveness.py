"""The liveness rule (kvpoll.protocol.liveness), step by step with a fake clock."""

from __future__ import annotations

from kvpoll.protocol.liveness import Liveness


def _always(room: int) -> bool:
    return True


def test_a_silent_peer_is_lost_after_the_window_with_every_heartbeat_unanswered() -> None:
    live = Liveness(interval=1.0, misses=3)
    assert not live.due(0.0)  # the first look starts the clock
    live.watch("p", 7, now=0.0)
    verdicts = []
    for t in (1.0, 2.0, 3.0, 4.0):
        assert live.due(t)
        ping, lost = live.beat(t, _always)
        verdicts.append((t, ping, [v.peer for v in lost]))
    assert verdicts[:3] == [(1.0, ["p"], []), (2.0, ["p"], []), (3.0, ["p"], [])]
    assert verdicts[3] == (4.0, [], ["p"])
    assert not live.watched("p")


def test_anything_heard_resets_the_count() -> None:
    live = Liveness(interval=1.0, misses=3)
    live.watch("p", 7, now=0.0)
    for t in (1.0, 2.0, 3.0):
        live.beat(t, _always)
    live.heard("p", 3.5)  # a data piece, a write's answer, any decoded message
    for t in (4.0, 5.0, 6.0):
        assert live.beat(t, _always)[1] == []
    assert [v.peer for v in live.beat(7.0, _always)[1]] == ["p"]


def test_time_spent_busy_here_never_counts_against_a_peer() -> None:
    """The endpoint sent no heartbeat for 10 s (its loop was held): on waking the
    peer is not lost until it has left ``misses`` heartbeats unanswered."""
    live = Liveness(interval=1.0, misses=3)
    live.watch("p", 7, now=0.0)
    assert live.beat(1.0, _always) == (["p"], [])
    # nothing for 10 s, then the loop runs again
    assert live.beat(11.0, _always) == (["p"], [])
    assert live.beat(12.0, _always) == (["p"], [])
    ping, lost = live.beat(13.0, _always)
    assert ping == []
    assert [v.peer for v in lost] == ["p"]
    assert lost[0].rooms == frozenset({7})
    assert "3 heartbeats of 1 s unanswered" in lost[0].why


def test_a_peer_without_unfinished_rooms_is_dropped_and_a_stranger_ignored() -> None:
    live = Liveness(interval=1.0, misses=1)
    live.watch("p", 7, now=0.0)
    live.watch("q", 8, now=0.0)
    live.heard("stranger", 0.5)  # not watched: nothing happens
    ping, lost = live.beat(1.0, lambda room: room == 8)
    assert ping == ["q"]
    assert lost == []
    assert not live.watched("p")
    assert not live.watched("stranger")
    live.unwatch(["q"], 8)
    assert live.beat(2.0, _always) == ([], [])
    assert live.forget("q") == frozenset()


def test_due_and_the_wait_until_the_next_round() -> None:
    live = Liveness(interval=0.5, misses=2)
    assert live.window == 1.0
    assert not live.due(10.0)  # the first look starts the clock
    assert abs(live.until_due(10.2) - 0.3) < 1e-9
    assert live.due(10.5)
    live.beat(10.5, _always)
    assert not live.due(10.9)


def test_a_peer_without_rooms_for_long_is_released_once() -> None:
    from kvpoll.protocol.liveness import IDLE_ROUNDS

    live = Liveness(interval=1.0, misses=3)
    live.watch("p", 7, now=0.0)
    live.beat(1.0, lambda room: False)  # its last room ended: not watched, idle from now
    assert live.idle(1.0 + IDLE_ROUNDS - 1) == []
    assert live.idle(1.0 + IDLE_ROUNDS) == ["p"]
    assert live.idle(1.0 + 2 * IDLE_ROUNDS) == []  # once
    live.watch("q", 8, now=0.0)
    live.beat(1.0, lambda room: False)
    live.watch("q", 9, now=2.0)  # back before the grace ran out: not idle
    assert live.idle(1.0 + IDLE_ROUNDS) == []
