"""RoomRegistry: the SGLang-shaped, thread-safe view of many rooms."""

from __future__ import annotations

import gc
import logging
import random
import threading
import time
import tracemalloc

import pytest

from kvpoll import (
    DuplicateRoom,
    IllegalTransition,
    InvalidArgument,
    KvpollError,
    RoomRegistry,
    UnknownRoom,
)
from kvpoll import TransferStatus as S
from kvpoll.testing import ManualClock


def walk(reg: RoomRegistry, room: int, *statuses: S) -> None:
    for status in statuses:
        assert reg.update_status(room, status) is True


def test_add_starts_in_bootstrapping() -> None:
    reg = RoomRegistry()
    reg.add(1)
    assert reg.check_status(1) is S.Bootstrapping
    assert 1 in reg
    assert len(reg) == 1
    assert list(reg) == [1]


def test_legal_walk_and_history() -> None:
    reg = RoomRegistry(history=True)
    reg.add(1)
    walk(reg, 1, S.WaitingForInput, S.Transferring, S.Transferring, S.Success)
    assert reg.check_status(1) is S.Success
    assert [(t.source, t.dest) for t in reg.history(1)] == [
        (S.Bootstrapping, S.WaitingForInput),
        (S.WaitingForInput, S.Transferring),
        (S.Transferring, S.Transferring),
        (S.Transferring, S.Success),
    ]


def test_reset_on_resume_raises_and_changes_nothing() -> None:
    reg = RoomRegistry(history=True)
    reg.add(1)
    walk(reg, 1, S.WaitingForInput, S.Transferring)
    before = reg.history(1)
    with pytest.raises(IllegalTransition) as info:
        reg.update_status(1, S.WaitingForInput)
    assert (info.value.room, info.value.status, info.value.event) == (
        1,
        S.Transferring,
        "update_status",
    )
    assert "WaitingForInput" in str(info.value)
    assert reg.check_status(1) is S.Transferring
    assert reg.history(1) == before
    assert reg.stats.illegal_updates == 1


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ((), S.Success),
        ((), S.Transferring),
        ((S.WaitingForInput,), S.WaitingForInput),
        ((S.WaitingForInput, S.Success), S.Failed),
        ((S.Failed,), S.Success),
        ((S.WaitingForInput, S.Transferring), S.Bootstrapping),
    ],
)
def test_pairs_no_event_produces_are_rejected(path: tuple[S, ...], bad: S) -> None:
    reg = RoomRegistry()
    reg.add(1)
    walk(reg, 1, *path)
    status = reg.check_status(1)
    with pytest.raises(IllegalTransition):
        reg.update_status(1, bad)
    assert reg.check_status(1) is status


def test_duplicate_room_is_refused_and_the_first_kept() -> None:
    reg = RoomRegistry()
    reg.add(7, required_destinations=2)
    with pytest.raises(DuplicateRoom) as info:
        reg.add(7)
    assert info.value.room == 7
    assert reg.destinations(7) == (S.Bootstrapping, S.Bootstrapping)


def test_unknown_room_is_a_key_error_too() -> None:
    reg = RoomRegistry()
    with pytest.raises(UnknownRoom) as info:
        reg.check_status(3)
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, KvpollError)
    assert str(info.value) == "room 3 is not registered"
    with pytest.raises(UnknownRoom):
        reg.remove(3)
    assert reg.discard(3) is False


def test_late_update_after_removal_never_recreates(caplog: pytest.LogCaptureFixture) -> None:
    reg = RoomRegistry()
    reg.add(5)
    walk(reg, 5, S.WaitingForInput, S.Success)
    reg.remove(5)
    with caplog.at_level(logging.DEBUG, logger="kvpoll.registry"):
        assert reg.update_status(5, S.Failed) is False
        assert reg.fail(5, "late") is False
    assert 5 not in reg
    assert len(reg) == 0
    assert reg.stats.unknown_updates == 2
    assert "unknown room 5" in caplog.text
    reg.add(5)  # the id can be reused and starts fresh
    assert reg.check_status(5) is S.Bootstrapping


def test_fan_in_counts_anonymous_reports() -> None:
    reg = RoomRegistry()
    reg.add(1, required_destinations=3)
    for expected in (S.Bootstrapping, S.Bootstrapping, S.WaitingForInput):
        reg.update_status(1, S.WaitingForInput)
        assert reg.check_status(1) is expected
    for expected in (S.WaitingForInput, S.WaitingForInput, S.Success):
        reg.update_status(1, S.Success)
        assert reg.check_status(1) is expected


def test_fan_in_named_destination_cannot_count_twice() -> None:
    reg = RoomRegistry()
    reg.add(1, required_destinations=2)
    reg.update_status(1, S.WaitingForInput, destination=0)
    with pytest.raises(IllegalTransition, match="destination 0"):
        reg.update_status(1, S.WaitingForInput, destination=0)
    assert reg.check_status(1) is S.Bootstrapping
    reg.update_status(1, S.WaitingForInput, destination=1)
    reg.update_status(1, S.Transferring, destination=0)
    reg.update_status(1, S.Success, destination=0)
    assert reg.check_status(1) is S.WaitingForInput  # destination 1 has not sent yet
    reg.update_status(1, S.Success, destination=1)
    assert reg.check_status(1) is S.Success


def test_fan_in_any_failure_fails_the_room() -> None:
    reg = RoomRegistry()
    reg.add(1, required_destinations=4)
    reg.update_status(1, S.WaitingForInput, destination=2)
    reg.update_status(1, S.Failed, destination=3, reason="rank 3 lost")
    assert reg.check_status(1) is S.Failed
    assert reg.reason(1) == "rank 3 lost"
    assert set(reg.destinations(1)) == {S.Failed}
    with pytest.raises(IllegalTransition):
        reg.update_status(1, S.WaitingForInput, destination=0)


def test_bad_arguments_are_typed_and_change_nothing() -> None:
    reg = RoomRegistry()
    reg.add(1, required_destinations=2)
    for bad_status in ("Nope", 9, 1, None, 1.0):
        with pytest.raises(InvalidArgument):
            reg.update_status(1, bad_status)  # type: ignore[arg-type]
    for destination in (2, -1, "0"):
        with pytest.raises(InvalidArgument):
            reg.update_status(1, S.WaitingForInput, destination=destination)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        reg.add(2, required_destinations=0)
    with pytest.raises(InvalidArgument):
        reg.add("2")  # type: ignore[arg-type]
    assert reg.destinations(1) == (S.Bootstrapping, S.Bootstrapping)
    assert 2 not in reg
    with pytest.raises(InvalidArgument, match="ambiguous"):
        reg.update_status(1, 1)  # type: ignore[arg-type]
    assert reg.update_status(1, "WaitingForInput") is True  # a name works
    assert reg.update_status(1, S.WaitingForInput) is True
    assert reg.check_status(1) is S.WaitingForInput


def test_fail_is_idempotent_for_final_rooms() -> None:
    reg = RoomRegistry()
    reg.add(1)
    walk(reg, 1, S.WaitingForInput, S.Success)
    assert reg.fail(1, "abort") is True
    assert reg.check_status(1) is S.Success
    reg.add(2)
    assert reg.fail(2, "abort") is True
    assert (reg.check_status(2), reg.reason(2)) == (S.Failed, "abort")


# -- time-outs -----------------------------------------------------------------


@pytest.mark.parametrize("status", [S.Bootstrapping, S.WaitingForInput, S.Transferring])
def test_every_non_final_state_times_out(status: S) -> None:
    clock = ManualClock()
    reg = RoomRegistry(
        timeouts={S.Bootstrapping: 10, S.WaitingForInput: 20, S.Transferring: 30}, clock=clock
    )
    reg.add(1)
    path = [S.WaitingForInput, S.Transferring]
    walk(reg, 1, *path[: [S.Bootstrapping, S.WaitingForInput, S.Transferring].index(status)])
    limit = reg.timeouts[status]
    clock.advance(limit - 0.5)
    assert reg.check_status(1) is status
    clock.advance(1)
    assert reg.check_status(1) is S.Failed
    assert reg.reason(1) == f"timed out in {status.name} after {limit:g} s"
    assert reg.stats.timeouts == 1


def test_expire_sweeps_in_deadline_order_and_skips_finished_rooms() -> None:
    clock = ManualClock()
    reg = RoomRegistry(timeouts={S.Bootstrapping: 10}, clock=clock)
    for room in (1, 2, 3):
        reg.add(room)
        clock.advance(1)
    walk(reg, 2, S.WaitingForInput, S.Success)
    clock.advance(8.5)  # room 1 entered at t=0, room 3 at t=2
    assert reg.expire() == [1]
    clock.advance(2)
    assert reg.expire() == [3]
    assert [reg.check_status(r) for r in (1, 2, 3)] == [S.Failed, S.Success, S.Failed]


def test_progress_in_transferring_restarts_the_clock() -> None:
    clock = ManualClock()
    reg = RoomRegistry(timeouts={S.Transferring: 30}, clock=clock)
    reg.add(1)
    walk(reg, 1, S.WaitingForInput, S.Transferring)
    for _ in range(5):
        clock.advance(25)
        walk(reg, 1, S.Transferring)
    assert reg.expire() == []
    clock.advance(30)
    assert reg.expire() == [1]


def test_time_outs_with_the_real_clock() -> None:
    reg = RoomRegistry(timeouts={S.Bootstrapping: 0.05})
    reg.add(1)
    assert reg.check_status(1) is S.Bootstrapping
    deadline = time.monotonic() + 5
    while reg.check_status(1) is S.Bootstrapping and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reg.check_status(1) is S.Failed


def test_time_out_settings_are_validated() -> None:
    with pytest.raises(InvalidArgument, match="final"):
        RoomRegistry(timeouts={S.Success: 5})
    with pytest.raises(InvalidArgument, match=">= 0"):
        RoomRegistry(timeouts={S.Transferring: -1})
    reg = RoomRegistry(timeouts={S.Transferring: None, S.WaitingForInput: 0})  # no limit
    assert S.Transferring not in reg.timeouts
    assert S.WaitingForInput not in reg.timeouts
    assert reg.timeouts[S.Bootstrapping] == 300.0


# -- memory and threads ----------------------------------------------------------


def test_removed_rooms_leave_no_memory_behind() -> None:
    reg = RoomRegistry(history=True)
    ids = [random.getrandbits(63) for _ in range(20_000)]
    gc.collect()
    tracemalloc.start()
    try:
        # one warm-up round so dicts have reached their working size
        for room in ids:
            reg.add(room, required_destinations=2)
        for room in ids:
            reg.remove(room)
        gc.collect()
        baseline = tracemalloc.get_traced_memory()[0]
        for room in ids:
            reg.add(room, required_destinations=2)
            reg.update_status(room, S.WaitingForInput)
            reg.update_status(room, S.Failed, reason="x")
        grown = tracemalloc.get_traced_memory()[0]
        for room in ids:
            reg.remove(room)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert grown - baseline > 100 * len(ids)  # the rooms did cost memory
    assert after - baseline < 2 * len(ids)  # and removing them gave it back


def test_threads_lose_no_update() -> None:
    reg = RoomRegistry()
    rooms_per_pair, pairs = 500, 4
    for room in range(rooms_per_pair * pairs):
        reg.add(room, required_destinations=2)
    errors: list[BaseException] = []

    def destination(first: int) -> None:
        try:
            for status in (S.WaitingForInput, S.Transferring, S.Success):
                for room in range(first, first + rooms_per_pair):
                    assert reg.update_status(room, status) is True
        except BaseException as exc:
            errors.append(exc)

    # two threads (the two destinations) report on each range of rooms, racing
    workers = [
        threading.Thread(target=destination, args=((i // 2) * rooms_per_pair,))
        for i in range(pairs * 2)
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in workers)
    assert errors == []
    assert len(reg) == pairs * rooms_per_pair
    assert all(reg.destinations(r) == (S.Success, S.Success) for r in reg)
    assert all(reg.check_status(r) is S.Success for r in reg)


def test_threads_racing_on_shared_rooms_keep_fan_in_exact() -> None:
    reg = RoomRegistry()
    rooms = range(2000)
    for room in rooms:
        reg.add(room, required_destinations=4)
    barrier = threading.Barrier(4)

    def destination(index: int) -> None:
        barrier.wait(timeout=10)
        for room in rooms:
            reg.update_status(room, S.WaitingForInput, destination=index)

    workers = [threading.Thread(target=destination, args=(i,)) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert all(reg.destinations(r) == (S.WaitingForInput,) * 4 for r in rooms)
    assert all(reg.check_status(r) is S.WaitingForInput for r in rooms)


@pytest.mark.parametrize("final", [S.Success, S.Failed])
def test_a_repeated_final_status_is_a_poll(final: S) -> None:
    reg = RoomRegistry()
    reg.add(1)
    walk(reg, 1, S.WaitingForInput)
    reg.update_status(1, final, reason="first")
    before = reg.history(1)
    assert reg.update_status(1, final, reason="second") is True  # as SGLang's: idempotent
    assert reg.check_status(1) is final
    assert reg.history(1) == before
    assert reg.reason(1) == ("first" if final is S.Failed else None)
    assert reg.stats.illegal_updates == 0


def test_destinations_are_named_in_messages_and_reasons() -> None:
    reg = RoomRegistry()
    reg.add(3, required_destinations=2)
    for d in (0, 1):
        reg.update_status(3, S.WaitingForInput, destination=d)
    reg.update_status(3, S.Success, destination=1)
    assert reg.update_status(3, S.Success, destination=1) is True  # its repeat: a poll
    with pytest.raises(IllegalTransition) as info:
        reg.update_status(3, S.Transferring, destination=1)
    assert "destination 1 is Success already, which is final: it cannot become Transferring" in (
        str(info.value)
    )
    with pytest.raises(IllegalTransition, match="destination 0 is WaitingForInput: no legal"):
        reg.update_status(3, S.Bootstrapping, destination=0)
    reg.update_status(3, S.Failed, destination=0, reason="rank 0 lost its GPU")
    assert reg.check_status(3) is S.Failed
    assert reg.reason(3) == "rank 0 lost its GPU"  # kept as given
    reg.add(4, required_destinations=2)
    reg.update_status(4, S.Failed, destination=1)
    assert reg.reason(4) == "destination 1 failed"
