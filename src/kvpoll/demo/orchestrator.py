"""``kvpoll demo``: the transfer scenarios between real processes.

A sender process ("encoder") and one receiver process per destination
("language model" ranks) move random data through the chosen transport:

With ``paged``, the same scenarios on registered pools as engines hold them:
the sender streams each room's pages in pieces; each receiver offers
``capacity`` tokens of pages at a time and offers them again when full.

1. ``tokens[0]`` (500) into a ``capacity`` (1024) buffer: one chunk;
2. ``tokens[1]`` (2000): a chunk, a resume, the rest;
3. ``tokens[2]`` (5000): several resumes;
4. a failure: the sender process is killed mid-transfer; every receiver's room
   must reach Failed within the heartbeat window.

Every status step of both sides is printed as it happens; each receiver checks
its data bit for bit; each side's sequence of statuses is audited against the
table. The exit status is 0 only if everything held.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from kvpoll.cli.walkthrough import describe_chunks
from kvpoll.demo.workers import (
    AUX,
    DTYPES,
    POSITIONS,
    RoomSpec,
    Settings,
    receiver_main,
    sender_main,
)
from kvpoll.processes import worker_context
from kvpoll.statemachine.trace import TraceChecker
from kvpoll.transports import TransportError, resolve

__all__ = ["DemoError", "run_demo"]

SLACK = 2.0
"""Seconds allowed beyond the heartbeat window to notice a dead sender."""


class DemoError(Exception):
    """The demo could not run (a process failed to start, a bad option)."""


@dataclass
class _Side:
    statuses: list[str] = field(default_factory=lambda: ["Bootstrapping"])
    events: list[str] = field(default_factory=list)
    reason: str | None = None
    bytes: int = 0
    seconds: float | None = None
    matched: bool | None = None
    chunks: int | None = None
    done_at: float | None = None


@dataclass
class _Room:
    spec: RoomSpec
    scenario: str
    expected: str
    sides: dict[str, _Side] = field(default_factory=dict)
    sending_at: float | None = None
    killed_at: float | None = None


class _Demo:
    def __init__(self, settings: Settings, out: TextIO) -> None:
        self.settings = settings
        self.out = out
        self.ctx = worker_context("kvpoll.demo.workers")
        self.events: Any = self.ctx.Queue()
        self.rooms: dict[int, _Room] = {}
        self.ready: dict[str, str] = {}
        self.procs: dict[str, Any] = {}
        self.commands: dict[str, Any] = {}
        self.receivers = [f"lm rank {r}" for r in range(settings.destinations)]

    # -- events -----------------------------------------------------------------
    def say(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def handle(self, event: dict[str, Any]) -> None:
        kind, who = event["kind"], event["who"]
        if kind == "ready":
            self.ready[who] = event["address"]
            return
        room = self.rooms.get(event["room"])
        if room is None:
            return
        side = room.sides.setdefault(who, _Side())
        if kind == "sending":
            room.sending_at = event["at"]
        elif kind == "status":
            side.statuses.append(event["dest"])
            side.events.append(event["event"])
            if event["dest"] in ("Success", "Failed"):
                side.done_at = event["at"]
                side.reason = event["reason"]
            why = f"  ({event['reason']})" if event["reason"] else ""
            self.say(
                f"  {who:<10} room {event['room']}: {event['source']:>15} -> "
                f"{event['dest']:<16} {event['event']:<12} "
                f"sent_tokens={event['sent_tokens']}{why}"
            )
        elif kind == "done":
            side.bytes, side.seconds = event["bytes"], event["seconds"]
            side.matched, side.chunks = event["matched"], event["chunks"]
            side.reason = side.reason or event["reason"]
            if side.done_at is None:
                side.done_at = event["at"]

    def pump(self, until: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {timeout:g} s waiting for {what}")
            for name, proc in self.procs.items():
                if not proc.is_alive() and not (name == "encoder" and self.killed):
                    raise DemoError(f"the {name} process exited with code {proc.exitcode}")
            try:
                self.handle(self.events.get(timeout=0.1))
            except queue.Empty:
                continue

    @property
    def killed(self) -> bool:
        """Whether the failure scenario has killed the encoder."""
        return any(r.killed_at for r in self.rooms.values())

    # -- processes ---------------------------------------------------------------
    def start(self) -> None:
        """Start every process at once (each spends seconds importing torch); the
        language-model ranks learn the encoder's address once it is up."""
        self.commands["encoder"] = self.ctx.Queue()
        self.procs["encoder"] = self.ctx.Process(
            target=sender_main,
            args=(self.settings, self.commands["encoder"], self.events),
            name="kvpoll-demo-encoder",
        )
        self.procs["encoder"].start()
        for rank, who in enumerate(self.receivers):
            self.commands[who] = self.ctx.Queue()
            self.procs[who] = self.ctx.Process(
                target=receiver_main,
                args=(self.settings, rank, self.commands[who], self.events),
                name=f"kvpoll-demo-lm-{rank}",
            )
            self.procs[who].start()
        self.pump(lambda: "encoder" in self.ready, 120, "the encoder to start")
        sender = self.ready["encoder"]
        for who in self.receivers:
            self.commands[who].put(("sender", sender))
        self.pump(
            lambda: all(w in self.ready for w in self.receivers),
            120,
            "the language-model processes to start",
        )
        self.say(
            f"encoder at {sender}; {len(self.receivers)} language-model rank(s); "
            f"transport {self.settings.transport}"
        )

    def stop(self) -> None:
        for name, commands in self.commands.items():
            if self.procs[name].is_alive():
                commands.put(("exit",))
        for proc in self.procs.values():
            proc.join(15)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        self.events.close()
        for commands in self.commands.values():
            commands.close()

    # -- scenarios -----------------------------------------------------------------
    def scenario(self, spec: RoomSpec, scenario: str, expected: str, limit: float) -> _Room:
        room = self.rooms[spec.room] = _Room(spec, scenario, expected)
        memory = (
            f"pages of {self.settings.page_size} for {self.settings.capacity} tokens at a time, "
            "streamed in pieces"
            if self.settings.paged
            else f"buffers of {self.settings.capacity}"
        )
        self.say(f"room {spec.room}: {scenario} ({spec.tokens} tokens, {memory})")
        self.commands["encoder"].put(("room", spec))
        for who in self.receivers:
            self.commands[who].put(("room", spec, limit))
        return room

    def finished(self, room: _Room, who: str) -> bool:
        side = room.sides.get(who)
        if who == "encoder":
            return side is not None and side.statuses[-1] in ("Success", "Failed")
        return side is not None and side.seconds is not None

    def run_normal(self, spec: RoomSpec, scenario: str) -> None:
        room = self.scenario(spec, scenario, "Success", 60.0)
        self.pump(
            lambda: all(self.finished(room, w) for w in ("encoder", *self.receivers)),
            120,
            f"room {spec.room}",
        )

    def run_failure(self, spec: RoomSpec) -> float:
        window = self.settings.heartbeat * self.settings.misses
        room = self.scenario(spec, "the encoder dies mid-transfer", "Failed", window + 60)

        def mid_transfer() -> bool:
            return all(
                "Transferring" in room.sides.get(w, _Side()).statuses for w in self.receivers
            )

        self.pump(mid_transfer, 60, f"room {spec.room} to be Transferring")
        self.procs["encoder"].kill()
        room.killed_at = time.time()
        self.say(
            f"  killed the encoder process (pid {self.procs['encoder'].pid}); the "
            f"heartbeat window is {window:g} s"
        )
        self.pump(
            lambda: all(self.finished(room, w) for w in self.receivers),
            window + 60,
            f"room {spec.room} to fail",
        )
        room.sides.setdefault("encoder", _Side()).reason = "process killed (SIGKILL)"
        return max((room.sides[w].done_at or 0) - room.killed_at for w in self.receivers)


def _audit(room: _Room, who: str, side: _Side) -> list[str]:
    checker = TraceChecker()
    problems = []
    for i, status in enumerate(side.statuses, start=1):
        problems += [
            str(f) for f in checker.feed(i, json.dumps({"room": room.spec.room, "status": status}))
        ]
    return [f"{who}: {p}" for p in problems]


def run_demo(
    *,
    tokens: list[int],
    capacity: int,
    hidden: int,
    dtype: str,
    transport: str,
    options: dict[str, Any],
    destinations: int,
    heartbeat: float,
    misses: int,
    failure: bool,
    seed: int,
    json_out: bool,
    out: TextIO,
    log: TextIO,
    paged: bool = False,
    page_size: int = 16,
) -> int:
    """Run the demo; return 0 when every room behaved, 1 otherwise.

    Raises:
        DemoError: the demo could not run.
    """
    if dtype not in DTYPES:
        raise DemoError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    try:
        cls = resolve(transport)
    except TransportError as exc:
        raise DemoError(str(exc)) from exc
    if not getattr(cls, "capabilities", None) or not cls.capabilities.cross_process:  # type: ignore[attr-defined]
        raise DemoError(
            f"the {transport!r} transport works within one process; the demo "
            "runs a sender and receivers in separate processes"
        )
    if paged and (page_size < 1 or capacity < page_size):
        raise DemoError(f"--capacity ({capacity}) must hold at least one page of {page_size}")
    settings = Settings(
        transport,
        options,
        hidden,
        dtype,
        capacity,
        destinations,
        heartbeat,
        misses,
        seed,
        paged=paged,
        page_size=page_size,
        max_tokens=max([*tokens, 3 * capacity]),
    )
    demo = _Demo(settings, log if json_out else out)
    detected: float | None = None
    problems: list[str] = []
    try:
        demo.start()
        for i, count in enumerate(tokens):
            demo.run_normal(RoomSpec(i + 1, count), describe_chunks(count, capacity))
        if failure:
            spec = RoomSpec(len(tokens) + 1, 2 * capacity + capacity // 2 + 1, auto_resume=False)
            detected = demo.run_failure(spec)
            window = heartbeat * misses
            if detected > window + SLACK:
                problems.append(
                    f"the dead encoder was noticed after {detected:.2f} s, beyond "
                    f"the {window:g} s heartbeat window (+{SLACK:g} s)"
                )
    except DemoError as exc:
        problems.append(str(exc))
    finally:
        demo.stop()
    return _report(demo, settings, detected, problems, json_out, out)


def _report(
    demo: _Demo,
    settings: Settings,
    detected: float | None,
    problems: list[str],
    json_out: bool,
    out: TextIO,
) -> int:
    rooms_json: list[dict[str, Any]] = []
    row_bytes = settings.hidden * DTYPES[settings.dtype].itemsize
    aux_bytes = 0
    if settings.paged:  # the second buffer (positions) and the aux row travel too
        row_bytes += POSITIONS * 4
        aux_bytes = AUX * 8
    for number, room in demo.rooms.items():
        room_problems = []
        for who, side in room.sides.items():
            room_problems += _audit(room, who, side)
            final = side.statuses[-1]
            if who == "encoder":
                if room.sending_at and side.done_at:
                    side.seconds = side.done_at - room.sending_at
                if final == "Success":
                    side.bytes = (room.spec.tokens * row_bytes + aux_bytes) * settings.destinations
                if room.killed_at is None and final != room.expected:
                    room_problems.append(f"encoder ended {final}, expected {room.expected}")
            elif final != room.expected:
                room_problems.append(
                    f"{who} ended {final}, expected {room.expected}"
                    + (f" ({side.reason})" if side.reason else "")
                )
            elif room.expected == "Success" and not side.matched:
                room_problems.append(f"{who}: the data did not match")
        for who in ("encoder", *demo.receivers):
            if who not in room.sides:
                room_problems.append(f"{who} reported nothing for room {number}")
        problems += [f"room {number}: {p}" for p in room_problems]
        order = [w for w in ("encoder", *demo.receivers) if w in room.sides]
        rooms_json.append(
            {
                "room": number,
                "scenario": room.scenario,
                "tokens": room.spec.tokens,
                "expected": room.expected,
                "ok": not room_problems,
                "problems": room_problems,
                "sides": {
                    who: {
                        "statuses": s.statuses,
                        "final": "killed"
                        if who == "encoder" and room.killed_at
                        else s.statuses[-1],
                        "events": s.events,
                        "bytes": s.bytes,
                        "seconds": s.seconds,
                        "data_matched": s.matched,
                        "chunks": s.chunks,
                        "reason": s.reason,
                    }
                    for who, s in ((w, room.sides[w]) for w in order)
                },
            }
        )
    ok = not problems
    summary = {
        "ok": ok,
        "settings": asdict(settings),
        "rooms": rooms_json,
        "failure_detected_after_s": detected,
        "problems": problems,
    }
    if json_out:
        out.write(json.dumps(summary, indent=2) + "\n")
    else:
        out.write(
            "\nroom  scenario                        tokens  side        final    data   seconds\n"
        )
        for entry in rooms_json:
            for who, side in entry["sides"].items():
                data = {True: "match", False: "WRONG", None: "-"}[side["data_matched"]]
                secs = f"{side['seconds']:.3f}" if side["seconds"] is not None else "-"
                out.write(
                    f"{entry['room']:<5} {entry['scenario'][:30]:<31} "
                    f"{entry['tokens']:>6}  {who:<11} {side['final']:<8} {data:<6} "
                    f"{secs:>7}\n"
                )
        if detected is not None:
            out.write(
                f"\nthe dead encoder was noticed after {detected:.2f} s (heartbeat "
                f"window {settings.heartbeat * settings.misses:g} s)\n"
            )
        for problem in problems:
            out.write(f"PROBLEM: {problem}\n")
        out.write(
            "demo passed: every step followed the table and every byte matched\n"
            if ok
            else "demo FAILED\n"
        )
    return 0 if ok else 1
