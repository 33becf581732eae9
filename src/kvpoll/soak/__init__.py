"""``kvpoll soak``: rooms between real processes for minutes, while peers are
killed and restarted and hostile traffic is injected; then what was lost and
what leaked.

One sender process and several receiver processes run rooms of two chunks
(each receiver resumes once). Receiver 0 is never killed; the others are
killed with SIGKILL in turn and started again. A thread sends malformed frames,
forged bootstraps and forged aborts to every endpoint all along.

Each room ends in one of three ways:

* **delivered**: Success on both sides, the data equal bit for bit;
* **interrupted**: its receiver was killed; the sender must fail it (within
  the heartbeat window, or by its bootstrap time-out of 5 s when the receiver
  died before it bootstrapped) or have finished it before;
* **lost**: anything else (a failure nobody caused, a wrong byte, a room
  that never ended). A healthy kvpoll loses nothing.

Leaks are measured on the processes that live through the run (the sender and
receiver 0) between the end of the warm-up and the end: file descriptors,
memfds, resident memory; and files left in /dev/shm.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from kvpoll.processes import worker_context
from kvpoll.soak.injector import Injector
from kvpoll.soak.workers import receiver_worker, sender_worker

__all__ = ["SoakReport", "run_soak"]

_FINISH_S = 60.0  # a room not final this long after it started is lost (it hung)
LEAK_FDS, LEAK_MEMFDS, LEAK_MAPPED, LEAK_RSS = 16, 16, 256 << 20, 96 << 20
"""Growth past the warm-up that counts as a leak (a pool may keep idle segments;
a sender may keep the segments of its live receivers mapped)."""


@dataclass
class _Room:
    receiver: int
    generation: int
    tokens: int
    started: float
    sender: tuple[str, str | None] | None = None  # (status, reason)
    receiver_end: tuple[str, str | None, bool] | None = None  # (status, reason, data ok)
    killed_at: float | None = None


@dataclass
class SoakReport:
    """What a soak did, lost and leaked."""

    seconds: float
    transport: str
    delivered: int = 0
    interrupted: int = 0
    lost: list[str] = field(default_factory=list)
    kills: int = 0
    fail_after_kill_s: list[float] = field(default_factory=list)
    injected: dict[str, int] = field(default_factory=dict)
    growth: dict[str, dict[str, int]] = field(default_factory=dict)
    shm_left: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.lost and not self.leaks


class _Worker:
    """A worker process and its pipe; it is ready once it sent its address."""

    def __init__(self, ctx: Any, target: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        child.close()
        self.started = time.monotonic()
        self.address = ""
        self.backlog: list[Any] = []

    def ready(self, timeout: float = 0.0) -> bool:
        """Whether the worker is up (its address known); waits up to ``timeout``."""
        if not self.address and self.parent.poll(timeout):
            _, self.address = self.parent.recv()
        if not self.address and time.monotonic() - self.started > 120:
            self.proc.kill()
            raise RuntimeError("a soak worker did not start within 120 s")
        return bool(self.address)

    def send(self, command: Any) -> None:
        self.parent.send(command)

    def messages(self) -> list[Any]:
        out = []
        try:
            while self.parent.poll(0):
                out.append(self.parent.recv())
        except (EOFError, OSError):
            pass
        return out

    def probe(self) -> dict[str, int]:
        self.parent.send(("probe",))
        deadline = time.monotonic() + 30
        pending: list[Any] = []
        while time.monotonic() < deadline and self.parent.poll(deadline - time.monotonic()):
            message = self.parent.recv()
            if message[0] == "probe":
                self.backlog = pending
                return dict(message[1])
            pending.append(message)
        raise RuntimeError("a soak worker did not answer a probe")

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.parent.send(None)
        self.proc.join(20)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(10)
        self.parent.close()


def _shm_files() -> set[str]:
    """This user's files in /dev/shm, less multiprocessing's own semaphores
    (``sem.mp-*``: any Python process using multiprocessing makes them, kvpoll none)."""
    uid = os.getuid()
    out = set()
    for name in os.listdir("/dev/shm"):
        if name.startswith("sem.mp-"):
            continue
        try:
            if os.stat(f"/dev/shm/{name}").st_uid == uid:
                out.add(name)
        except OSError:
            continue
    return out


def run_soak(
    minutes: float,
    *,
    transport: str = "zmq",
    options: dict[str, Any] | None = None,
    receivers: int = 3,
    in_flight: int = 6,
    tokens: int = 256,
    kill_every: float = 4.0,
    heartbeat: float = 0.5,
    log: TextIO | None = None,
) -> SoakReport:
    """Run the soak for ``minutes``; see the module docstring."""
    ctx = worker_context("kvpoll.soak.workers")
    options = dict(options or {})
    args = (transport, options, heartbeat)
    shm_before = _shm_files()
    report = SoakReport(seconds=0.0, transport=transport)
    sender = _Worker(ctx, sender_worker, args)
    workers = [_Worker(ctx, receiver_worker, args) for _ in range(receivers)]
    for worker in (sender, *workers):
        while not worker.ready(1.0):
            pass
    # the run (and its warm-up) starts once every worker is up: start-up is not soak
    # time, and a warm-up probe taken before the first room would count the
    # receivers' first arena (64 MiB) as growth
    start = time.monotonic()
    end = start + minutes * 60
    generations = [0] * receivers
    injector = Injector([sender.address, *(w.address for w in workers)], sender.address)
    injector.start()
    rooms: dict[int, _Room] = {}
    next_room = 1
    next_kill = start + kill_every
    victim = 0
    warm_probe: dict[str, dict[str, int]] = {}
    warm_at = start + min(10.0, (end - start) * 0.25)

    def say(text: str) -> None:
        if log is not None:
            print(text, file=log, flush=True)

    def collect(worker: _Worker, index: int | None) -> None:
        for message in [*worker.backlog, *worker.messages()]:
            if message[0] != "final":
                continue
            _, room_id, status, reason, ok = message
            room = rooms.get(room_id)
            if room is None:
                continue
            if index is None:
                room.sender = (status, reason)
            elif room.generation == generations[index]:
                room.receiver_end = (status, reason, ok)
        worker.backlog = []

    try:
        while True:
            now = time.monotonic()
            running = now < end
            collect(sender, None)
            for i, worker in enumerate(workers):
                if worker.address:
                    collect(worker, i)
            _settle(rooms, report, now)
            if not running and not rooms:
                break
            if not running and now > end + _FINISH_S:
                for room_id, room in rooms.items():
                    report.lost.append(f"room {room_id} never ended ({_describe(room)})")
                break
            if not warm_probe and now >= warm_at:
                warm_probe = {"sender": sender.probe(), "receiver 0": workers[0].probe()}
            if running and receivers > 1 and now >= next_kill:  # kill one, start it again
                victim = victim % (receivers - 1) + 1
                workers[victim].kill()
                generations[victim] += 1
                report.kills += 1
                for room in rooms.values():
                    if room.receiver == victim and room.receiver_end is None:
                        room.killed_at = now
                say(f"soak: killed receiver {victim} (kill {report.kills}); starting it again")
                workers[victim] = _Worker(ctx, receiver_worker, args)  # ready a little later
                next_kill = time.monotonic() + kill_every
            for i, worker in enumerate(workers):
                if not worker.address:
                    if not worker.ready():
                        continue
                    injector.targets[i + 1] = worker.address
                mine = sum(1 for r in rooms.values() if r.receiver == i and r.receiver_end is None)
                while running and mine < in_flight:
                    room_id, next_room = next_room, next_room + 1
                    rooms[room_id] = _Room(i, generations[i], tokens, time.monotonic())
                    token = secrets.token_hex(8)  # what the forged bootstraps cannot show
                    sender.send(("add", room_id, tokens, token))
                    worker.send(("open", room_id, tokens, token, sender.address))
                    mine += 1
            time.sleep(0.005)
        end_probe = {"sender": sender.probe(), "receiver 0": workers[0].probe()}
        collect(sender, None)
    finally:
        injector.stop()
        sender.stop()
        for worker in workers:
            worker.stop()
    report.seconds = time.monotonic() - start
    report.injected = dict(injector.counts)
    for name, after in end_probe.items():
        before = warm_probe.get(name, after)
        report.growth[name] = {k: after[k] - before[k] for k in after}
        grown = report.growth[name]
        for key, limit in (
            ("fds", LEAK_FDS),
            ("memfds", LEAK_MEMFDS),
            ("mapped", LEAK_MAPPED),
            ("rss", LEAK_RSS),
        ):
            if grown[key] > limit:
                report.leaks.append(f"{name}: {key} grew by {grown[key]}")
    report.shm_left = sorted(_shm_files() - shm_before)
    if report.shm_left:
        report.leaks.append(f"/dev/shm: {', '.join(report.shm_left)} left behind")
    return report


def _describe(room: _Room) -> str:
    return (
        f"sender {room.sender}, receiver {room.receiver_end}, killed {room.killed_at is not None}"
    )


def _settle(rooms: dict[int, _Room], report: SoakReport, now: float) -> None:
    """Classify every room whose ends are known; drop it from ``rooms``."""
    for room_id, room in list(rooms.items()):
        if room.sender is None:
            if now - room.started > _FINISH_S:
                report.lost.append(f"room {room_id} never ended at the sender ({_describe(room)})")
                del rooms[room_id]
            continue
        if room.killed_at is not None:  # its receiver was killed: it may fail, it must end
            report.interrupted += 1
            if room.sender[0] == "Failed":
                report.fail_after_kill_s.append(now - room.killed_at)
            del rooms[room_id]
            continue
        if room.receiver_end is None:
            if now - room.started > _FINISH_S:
                report.lost.append(
                    f"room {room_id} never ended at the receiver ({_describe(room)})"
                )
                del rooms[room_id]
            continue
        status, _, ok = room.receiver_end
        if room.sender[0] == "Success" and status == "Success" and ok:
            report.delivered += 1
        else:
            report.lost.append(f"room {room_id}: {_describe(room)}")
        del rooms[room_id]


def format_report(report: SoakReport) -> str:
    """The report as the command prints it."""
    lines = [
        f"kvpoll soak: {report.seconds:.0f} s over {report.transport}, "
        f"{report.kills} receiver kills (SIGKILL), each restarted",
        f"rooms: {report.delivered} delivered bit for bit, {report.interrupted} interrupted "
        f"by a kill, {len(report.lost)} lost",
    ]
    if report.fail_after_kill_s:
        times = sorted(report.fail_after_kill_s)
        lines.append(
            f"  interrupted rooms failed at the sender {times[len(times) // 2]:.2f} s after "
            f"the kill (median; at most {times[-1]:.2f} s)"
        )
    lines += [f"  lost: {line}" for line in report.lost[:20]]
    injected = ", ".join(f"{n} {what}" for what, n in sorted(report.injected.items()))
    lines.append(f"injected: {injected or 'nothing'}")
    for name, grown in report.growth.items():
        lines.append(
            f"growth after warm-up, {name}: fds {grown['fds']:+d}, memfds {grown['memfds']:+d}, "
            f"shared memory mapped {grown.get('mapped', 0) / (1 << 20):+.1f} MiB, "
            f"rss {grown['rss'] / (1 << 20):+.1f} MiB"
        )
    lines.append(f"/dev/shm: {', '.join(report.shm_left) or 'nothing left'}")
    lines += [f"  leak: {line}" for line in report.leaks]
    lost = "nothing lost" if not report.lost else f"{len(report.lost)} rooms lost"
    leaked = "nothing leaked" if not report.leaks else f"{len(report.leaks)} leaks"
    lines.append(f"result: {lost}, {leaked}")
    return "\n".join(lines)
