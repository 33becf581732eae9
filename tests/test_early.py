"""The table of bootstraps waiting for add() (kvpoll.protocol.early), rule by rule."""

from __future__ import annotations

from kvpoll.protocol.early import EarlyBootstraps, cost
from kvpoll.protocol.messages import Bootstrap
from kvpoll.transports.base import RegionDescriptor


def _boot(room: int, session: int = 1, extra: dict[str, str] | None = None) -> Bootstrap:
    region = RegionDescriptor(
        transport="zmq", endpoint="x", region_id=1, nbytes=48, extra=extra or {}
    )
    return Bootstrap(
        room=room,
        session=session,
        region=region,
        allocated_tokens=3,
        row_bytes=16,
        dtype="float32",
        row_shape=[4],
    )


def test_ties_refuse_the_newcomer_and_the_earliest_stays() -> None:
    early = EarlyBootstraps(max_rooms=3)
    assert early.add("legit", _boot(1), 0.0) == (None, [])
    assert early.add("a", _boot(2), 1.0) == (None, [])
    assert early.add("b", _boot(3), 2.0) == (None, [])
    refused, dropped = early.add("c", _boot(4), 3.0)  # everyone holds one: c gives way
    assert refused is not None
    assert "holds as many as anyone" in refused
    assert dropped == []
    assert [p for p, _ in early.take(1)] == ["legit"]


def test_the_heaviest_peer_gives_way_with_its_newest_entry() -> None:
    early = EarlyBootstraps(max_rooms=3)
    early.add("legit", _boot(1), 0.0)
    early.add("flood", _boot(2), 1.0)
    early.add("flood", _boot(3), 2.0)
    refused, dropped = early.add("other", _boot(4), 3.0)
    assert refused is None
    assert [(p, m.room) for p, m in dropped] == [("flood", 3)]
    assert [p for p, _ in early.take(2)] == ["flood"]


def test_each_entry_expires_by_its_own_age() -> None:
    early = EarlyBootstraps()
    early.add("forger", _boot(5, session=1), 0.0)
    early.add("legit", _boot(5, session=2), 4.0)
    late = early.expire(5.0, limit=5.0)
    assert [p for p, _ in late] == ["forger"]
    assert [p for p, _ in early.take(5)] == ["legit"]
    assert early.expire(100.0, limit=5.0) == []


def test_a_room_holds_at_most_so_many_from_one_peer_and_in_all() -> None:
    early = EarlyBootstraps(per_room=4, per_room_peer=2)
    assert early.add("a", _boot(1, 1), 0.0)[0] is None
    assert early.add("a", _boot(1, 2), 0.0)[0] is None
    refused, _ = early.add("a", _boot(1, 3), 0.0)
    assert refused is not None
    assert "from a already wait" in refused
    early.add("b", _boot(1, 4), 0.0)
    early.add("b", _boot(1, 5), 0.0)
    refused, dropped = early.add("legit", _boot(1, 6), 0.0)  # full: a and b hold two each
    assert refused is None
    assert len(dropped) == 1
    assert [p for p, _ in early.take(1)].count("legit") == 1


def test_cost_counts_runs_and_description_bytes() -> None:
    assert cost(_boot(1)) == 1
    assert cost(_boot(1, extra={"k": "v" * 640})) == 1 + len('{"k": "' + "v" * 640 + '"}') // 64
    early = EarlyBootstraps(max_cost=30)
    assert early.add("a", _boot(1, extra={"k": "v" * 1200}), 0.0)[0] is None  # 19 units
    refused, _ = early.add("a", _boot(2, extra={"k": "v" * 1200}), 0.0)
    assert refused is not None
    assert early.cost == cost(_boot(1, extra={"k": "v" * 1200}))
