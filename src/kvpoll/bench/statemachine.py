"""``kvpoll bench statemachine``: what enforcing the table costs.

Three measurements, each repeated, each against a baseline in the same run:

1. ns per validated transition (a Transferring -> Transferring chunk, the step
   a long transfer takes most): kvpoll's TransferState, a bare lookup in the
   table's ``(status, event)`` dict (no validation), and a transitions.Machine.
2. memory per room with N rooms in a RoomRegistry (tracemalloc).
3. time to add and to remove N rooms, against transitions.Machine.add_model.
   add_model is quadratic in the number of models, so it is timed at a
   smaller N (``transitions_rooms``) and compared per room at that same N,
   which understates kvpoll's advantage at the full N.
"""

from __future__ import annotations

import gc
import json
import platform
import random
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvpoll.bench.stats import Figure, figure, ratio
from kvpoll.spec_files import spec_dir
from kvpoll.statemachine.registry import RoomRegistry
from kvpoll.statemachine.state import TransferState
from kvpoll.statemachine.status import Event, TransferStatus
from kvpoll.statemachine.table import default_table

__all__ = ["StatemachineBench", "run"]

TARGETS = {
    "transitions_vs_kvpoll_walk": 20.0,
    "kvpoll_vs_dict_walk": 3.0,
    "transitions_vs_kvpoll_step": 20.0,
    "kvpoll_vs_dict_step": 3.0,
    "bytes_per_room": 512.0,
    "transitions_vs_kvpoll_add": 50.0,
}


def _spec_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((spec_dir() / "transitions.json").read_text("utf-8"))
    return doc


def _ns_kvpoll(steps: int) -> float:
    # one room stepping forever: history off, or it would hold every step (the walk
    # below measures the default settings)
    state = TransferState(1, history=False)
    state.bootstrapped()
    state.chunk_sent(sent_tokens=1, is_last=False)
    step = state.chunk_sent
    start = time.perf_counter_ns()
    for tokens in range(2, steps + 2):
        step(sent_tokens=tokens, is_last=False)
    return (time.perf_counter_ns() - start) / steps


def _ns_dict(steps: int) -> float:
    table = dict(default_table().next)
    status = TransferStatus.Transferring
    event = Event.CHUNK_SENT
    start = time.perf_counter_ns()
    for _ in range(steps):
        status = table[(status, event)]
    return (time.perf_counter_ns() - start) / steps


class _Model:
    pass


# The transfer walk, as users run it: a room bootstraps, sends a chunk, resumes,
# sends the last chunk (four steps), with each side's default settings.
def _walk_kvpoll(rooms: int) -> float:
    states = [TransferState(room) for room in range(rooms)]  # history on: the default
    start = time.perf_counter_ns()
    for state in states:
        state.bootstrapped()
        state.chunk_sent(sent_tokens=1024, is_last=False)
        state.resumed(sent_tokens=1024)
        state.chunk_sent(sent_tokens=2000, is_last=True)
    return (time.perf_counter_ns() - start) / (4 * rooms)


def _walk_dict(rooms: int) -> float:
    table = dict(default_table().next)
    walk = (Event.BOOTSTRAPPED, Event.CHUNK_SENT, Event.RESUMED, Event.LAST_CHUNK_SENT)
    start = time.perf_counter_ns()
    for _ in range(rooms):
        status = TransferStatus.Bootstrapping
        for event in walk:
            status = table[(status, event)]
    return (time.perf_counter_ns() - start) / (4 * rooms)


def _walk_transitions(rooms: int) -> float:
    doc = _spec_doc()
    models = [_Model() for _ in range(rooms)]
    for model in models:  # one machine each: add_model is quadratic
        _machine(doc, "Bootstrapping", model)
    start = time.perf_counter_ns()
    for m in models:
        m.bootstrapped()  # type: ignore[attr-defined]
        m.chunk_sent()  # type: ignore[attr-defined]
        m.resumed()  # type: ignore[attr-defined]
        m.last_chunk_sent()  # type: ignore[attr-defined]
    return (time.perf_counter_ns() - start) / (4 * rooms)


def _machine(doc: dict[str, Any], initial: str, model: object) -> Any:
    from transitions import Machine

    return Machine(
        model=model,
        states=doc["states"],
        transitions=doc["transitions"],
        initial=initial,
        auto_transitions=False,
    )


def _ns_transitions(steps: int) -> float:
    model = _Model()
    _machine(_spec_doc(), "Transferring", model)
    step: Callable[[], bool] = model.chunk_sent  # type: ignore[attr-defined]
    start = time.perf_counter_ns()
    for _ in range(steps):
        step()
    return (time.perf_counter_ns() - start) / steps


def _bytes_per_room(ids: list[int]) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        registry = RoomRegistry()
        before = tracemalloc.get_traced_memory()[0]
        for room in ids:
            registry.add(room)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / len(ids)


def _add_remove(ids: list[int]) -> tuple[float, float]:
    registry = RoomRegistry()
    start = time.perf_counter()
    for room in ids:
        registry.add(room)
    added = time.perf_counter() - start
    start = time.perf_counter()
    for room in ids:
        registry.remove(room)
    return added, time.perf_counter() - start


def _add_transitions(n: int) -> float:
    machine = _machine(_spec_doc(), "Bootstrapping", None)
    models = [_Model() for _ in range(n)]
    start = time.perf_counter()
    for model in models:
        machine.add_model(model)
    return time.perf_counter() - start


@dataclass
class StatemachineBench:
    """Results of one run (figures are medians with min-max)."""

    repeats: int
    rooms: int
    transitions_rooms: int
    figures: dict[str, Figure] = field(default_factory=dict)

    def verdicts(self) -> dict[str, bool]:
        f = self.figures
        return {
            "transitions_vs_kvpoll_walk": f["transitions_vs_kvpoll_walk"].median
            >= TARGETS["transitions_vs_kvpoll_walk"],
            "kvpoll_vs_dict_walk": f["kvpoll_vs_dict_walk"].median
            <= TARGETS["kvpoll_vs_dict_walk"],
            "transitions_vs_kvpoll_step": f["transitions_vs_kvpoll_step"].median
            >= TARGETS["transitions_vs_kvpoll_step"],
            "kvpoll_vs_dict_step": f["kvpoll_vs_dict_step"].median
            <= TARGETS["kvpoll_vs_dict_step"],
            "bytes_per_room": f["bytes_per_room"].median <= TARGETS["bytes_per_room"],
            "transitions_vs_kvpoll_add": f["transitions_vs_kvpoll_add"].median
            >= TARGETS["transitions_vs_kvpoll_add"],
        }

    def to_json(self) -> dict[str, object]:
        return {
            "benchmark": "statemachine",
            "python": platform.python_version(),
            "repeats": self.repeats,
            "rooms": self.rooms,
            "transitions_rooms": self.transitions_rooms,
            "figures": {k: v.to_json() for k, v in self.figures.items()},
            "targets": TARGETS,
            "met": self.verdicts(),
        }

    def report(self) -> str:
        f = self.figures
        met = self.verdicts()

        def mark(key: str) -> str:
            return "met" if met[key] else "MISSED"

        n, nt = self.rooms, self.transitions_rooms
        return "\n".join(
            [
                f"kvpoll bench statemachine: python {platform.python_version()}, "
                f"{self.repeats} repeats; median [min-max]",
                "",
                "the transfer walk (bootstrapped, chunk, resume, last chunk), default "
                "settings (history kept), ns per step",
                f"  bare (status, event) dict lookup  {f['dict_walk_ns'].show(' ns', 1)}",
                f"  kvpoll TransferState              {f['kvpoll_walk_ns'].show(' ns', 1)}",
                f"  transitions.Machine               {f['transitions_walk_ns'].show(' ns', 0)}",
                f"  kvpoll / dict          {f['kvpoll_vs_dict_walk'].show('x', 2)}"
                f"   target <= {TARGETS['kvpoll_vs_dict_walk']:g}x  {mark('kvpoll_vs_dict_walk')}",
                f"  transitions / kvpoll   {f['transitions_vs_kvpoll_walk'].show('x', 1)}"
                f"   target >= {TARGETS['transitions_vs_kvpoll_walk']:g}x  "
                f"{mark('transitions_vs_kvpoll_walk')}",
                "",
                "one transition in a loop (Transferring -chunk_sent-> Transferring), "
                "history off, ns per step",
                f"  bare (status, event) dict lookup  {f['dict_ns'].show(' ns', 1)}",
                f"  kvpoll TransferState              {f['kvpoll_ns'].show(' ns', 1)}",
                f"  transitions.Machine               {f['transitions_ns'].show(' ns', 0)}",
                f"  kvpoll / dict          {f['kvpoll_vs_dict_step'].show('x', 2)}"
                f"   target <= {TARGETS['kvpoll_vs_dict_step']:g}x  {mark('kvpoll_vs_dict_step')}",
                f"  transitions / kvpoll   {f['transitions_vs_kvpoll_step'].show('x', 1)}"
                f"   target >= {TARGETS['transitions_vs_kvpoll_step']:g}x  "
                f"{mark('transitions_vs_kvpoll_step')}",
                "",
                f"RoomRegistry with {n:,} rooms",
                f"  memory per room        {f['bytes_per_room'].show(' B', 0)}"
                f"   target <= {TARGETS['bytes_per_room']:g} B  {mark('bytes_per_room')}",
                f"  add {n:,} rooms        {f['kvpoll_add_s'].show(' s', 3)}",
                f"  remove {n:,} rooms     {f['kvpoll_remove_s'].show(' s', 3)}",
                "",
                f"adding rooms, per room, both at {nt:,} rooms (add_model is quadratic)",
                f"  kvpoll RoomRegistry.add            {f['kvpoll_add_us'].show(' us', 2)}",
                f"  transitions.Machine.add_model      {f['transitions_add_us'].show(' us', 1)}",
                f"  transitions / kvpoll   {f['transitions_vs_kvpoll_add'].show('x', 0)}"
                f"   target >= {TARGETS['transitions_vs_kvpoll_add']:g}x  "
                f"{mark('transitions_vs_kvpoll_add')}",
            ]
        )


def run(
    *,
    repeats: int = 5,
    steps: int = 200_000,
    rooms: int = 100_000,
    transitions_rooms: int = 20_000,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> StatemachineBench:
    """Run every measurement ``repeats`` times, baselines interleaved."""
    say = progress or (lambda _msg: None)
    rng = random.Random(seed)
    ids = [rng.getrandbits(63) for _ in range(rooms)]
    small = ids[:transitions_rooms]
    kv: list[float] = []
    bare: list[float] = []
    tr: list[float] = []
    mem: list[float] = []
    add: list[float] = []
    rem: list[float] = []
    add_small: list[float] = []
    tr_add: list[float] = []
    walk_kv: list[float] = []
    walk_dict: list[float] = []
    walk_tr: list[float] = []
    walkers = max(steps // 100, 200)
    for i in range(repeats):
        say(f"repeat {i + 1}/{repeats}: the walk")
        walk_dict.append(_walk_dict(walkers * 10))
        walk_kv.append(_walk_kvpoll(walkers * 10))
        walk_tr.append(_walk_transitions(walkers))
        say(f"repeat {i + 1}/{repeats}: transitions")
        bare.append(_ns_dict(steps))
        kv.append(_ns_kvpoll(steps))
        tr.append(_ns_transitions(max(steps // 20, 1000)))
        say(f"repeat {i + 1}/{repeats}: rooms")
        mem.append(_bytes_per_room(ids))
        a, r = _add_remove(ids)
        add.append(a)
        rem.append(r)
        add_small.append(_add_remove(small)[0] / len(small) * 1e6)
        tr_add.append(_add_transitions(transitions_rooms) / transitions_rooms * 1e6)
    result = StatemachineBench(repeats, rooms, transitions_rooms)
    result.figures = {
        "dict_walk_ns": figure(walk_dict),
        "kvpoll_walk_ns": figure(walk_kv),
        "transitions_walk_ns": figure(walk_tr),
        "kvpoll_vs_dict_walk": ratio(walk_kv, walk_dict),
        "transitions_vs_kvpoll_walk": ratio(walk_tr, walk_kv),
        "dict_ns": figure(bare),
        "kvpoll_ns": figure(kv),
        "transitions_ns": figure(tr),
        "kvpoll_vs_dict_step": ratio(kv, bare),
        "transitions_vs_kvpoll_step": ratio(tr, kv),
        "bytes_per_room": figure(mem),
        "kvpoll_add_s": figure(add),
        "kvpoll_remove_s": figure(rem),
        "kvpoll_add_us": figure(add_small),
        "transitions_add_us": figure(tr_add),
        "transitions_vs_kvpoll_add": ratio(tr_add, add_small),
    }
    return result
