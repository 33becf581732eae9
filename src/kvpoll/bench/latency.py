"""A room's fixed cost: 4 KiB rooms one at a time, against a raw pyzmq round trip.

Both between the same two processes as the rest of ``kvpoll bench transfer``:

* ``rtt``: the receiving process sends 4 KiB on a pyzmq PUSH socket over TCP
  loopback and waits for the sending process to echo it back on another; each
  round trip timed.
* ``pipelined``: the same echo with up to ``window`` messages in flight:
  round trips per second.
* each kvpoll path: the sending process adds a room and hands it one 4 KiB row
  (untimed); the receiving process times ``open()`` to Success. A room needs
  one round trip (bootstrap out, chunk notice back) plus the copy: its floor is
  about one ``rtt``. After each room one raw round trip is timed too: a
  round trip in the same conditions as the rooms (processes that just did
  something else, not a tight loop of round trips). Here it took about twice
  the tight loop's (200-380 against 115-170 us), and more after an idle pause
  (440-450 us after 2 ms asleep, 780-910 after 20 ms, rooms slowing alike):
  what the targets compare with stays the tight loop's, the stricter figure;
  the other is reported beside it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
import zmq

from kvpoll.bench.child import ask

__all__ = ["ROW", "echo_child", "percentile", "pipelined", "room_latency", "round_trips"]

ROW = 4096


def percentile(samples: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``samples`` (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary(samples: list[float]) -> dict[str, float]:
    """Median, p99, min and max, in microseconds."""
    us = [s * 1e6 for s in samples]
    return {
        "p50_us": statistics.median(us),
        "p99_us": percentile(us, 0.99),
        "min_us": min(us),
        "max_us": max(us),
        "samples": len(us),
    }


def echo_child(requests: str, replies: str, count: int) -> None:
    """In the sending process: echo ``count`` messages from ``requests`` to ``replies``."""
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    for sock in (pull, push):
        sock.setsockopt(zmq.SNDHWM, 0)  # the window bounds what is in flight, not the queues
        sock.setsockopt(zmq.RCVHWM, 0)
    pull.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.LINGER, 10_000)  # the last replies may still be queued at close
    pull.connect(requests)
    push.connect(replies)
    try:
        for _ in range(count):
            if not pull.poll(60_000):
                raise RuntimeError("echo: nothing to echo within 60 s")
            push.send(pull.recv(copy=False), copy=False)
    finally:
        pull.close()
        push.close()
        ctx.term()


class _Echo:
    """This side of an echo: PUSH requests out, PULL the replies (TCP loopback).

    ``beside``: the sending process echoes on a thread of its own while it goes on
    taking commands (its rooms), instead of echoing until ``count`` and then
    answering.
    """

    def __init__(self, conn: Any, count: int, *, beside: bool = False) -> None:
        self.conn = conn
        self.beside = beside
        self.count, self.sent = count, 0
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.push, self.pull = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
        for sock in (self.push, self.pull):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
        out = self.push.bind_to_random_port("tcp://127.0.0.1")
        back = self.pull.bind_to_random_port("tcp://127.0.0.1")
        addresses = (f"tcp://127.0.0.1:{out}", f"tcp://127.0.0.1:{back}", count)
        if beside:
            ask(conn, ("echo-beside", *addresses))
        else:
            conn.send(("echo", *addresses))

    def round_trip(self, payload: bytes) -> float:
        """One timed round trip, in seconds."""
        start = time.perf_counter()
        self.push.send(payload, copy=False)
        self.sent += 1
        self.reply()
        return time.perf_counter() - start

    def reply(self) -> None:
        if not self.pull.poll(60_000):
            raise RuntimeError("raw pyzmq: no echo within 60 s")
        self.pull.recv(copy=False)

    def close(self) -> None:
        try:
            if self.beside:
                for _ in range(self.count - self.sent):  # cut short: let the echo end now
                    self.push.send(b"")
                self.conn.send(("echo-end",))
            if not self.conn.poll(60) or self.conn.recv() != "ok":
                raise RuntimeError("the echo did not end")
        finally:
            self.push.close()
            self.pull.close()
            self.ctx.term()


def round_trips(conn: Any, count: int) -> list[float]:
    """``count`` timed 4 KiB round trips (after as many untimed to warm up)."""
    echo = _Echo(conn, 2 * count)
    payload = bytes(ROW)
    samples = []
    try:
        for i in range(2 * count):
            took = echo.round_trip(payload)
            if i >= count:
                samples.append(took)
    finally:
        echo.close()
    return samples


def pipelined(conn: Any, count: int, window: int) -> float:
    """Round trips per second with up to ``window`` 4 KiB messages in flight."""
    echo = _Echo(conn, count)
    payload = bytes(ROW)
    sent = received = 0
    try:
        start = time.perf_counter()
        while received < count:
            while sent < count and sent - received < window:
                echo.push.send(payload, copy=False)
                sent += 1
            try:
                echo.reply()
            except RuntimeError as exc:
                raise RuntimeError(f"{exc} (sent {sent}, received {received})") from None
            received += 1
            while received < sent and echo.pull.poll(0):
                echo.pull.recv(copy=False)
                received += 1
        took = time.perf_counter() - start
    finally:
        echo.close()
    return count / took


def room_latency(
    conn: Any, rx: Any, address: str, path: str, count: int, ids: Iterator[int]
) -> tuple[list[float], list[float]]:
    """``count`` timed one-row rooms, ``open()`` to Success, one at a time, each
    followed by one timed raw round trip: (rooms' seconds, round trips' seconds)."""
    rooms, trips = [], []
    total = count + count // 5  # the first fifth warms up
    echo = _Echo(conn, total, beside=True)
    payload = bytes(ROW)
    try:
        for i in range(total):
            room = next(ids)
            ask(conn, ("rooms", path, ROW, [room]))
            start = time.perf_counter()
            rx.open(room, address, row_shape=(ROW,), dtype=torch.uint8, allocated_tokens=1)
            status = rx.wait(room, 60)
            took = time.perf_counter() - start
            if status.name != "Success":
                reason = rx.info(room).reason
                raise RuntimeError(f"{path}: room {room} ended {status.name}: {reason}")
            rx.remove(room)
            ask(conn, ("forget", path, [room]))
            trip = echo.round_trip(payload)
            if i >= count // 5:
                rooms.append(took)
                trips.append(trip)
    finally:
        echo.close()
    return rooms, trips
