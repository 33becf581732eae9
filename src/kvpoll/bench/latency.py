"""A room's fixed cost: 4 KiB rooms one at a time, against a raw pyzmq round trip.

Both between the same two processes as the rest of ``kvpoll bench transfer``:

* ``rtt``: the receiving process sends 4 KiB on a pyzmq PAIR socket over TCP
  loopback and waits for the sending process to echo it; each round trip timed.
* ``pipelined``: the same echo with up to ``window`` messages in flight:
  round trips per second.
* each kvpoll path: the sending process adds a room and hands it one 4 KiB row
  (untimed); the receiving process times ``open()`` to Success. A room needs
  one round trip (bootstrap out, chunk notice back) plus the copy: its floor is
  about one ``rtt``.
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


def echo_child(address: str, count: int) -> None:
    """In the sending process: echo ``count`` messages back on a PAIR socket."""
    ctx = zmq.Context()
    pair = ctx.socket(zmq.PAIR)
    pair.setsockopt(zmq.LINGER, 0)
    pair.setsockopt(zmq.SNDHWM, 0)  # the window bounds what is in flight, not the queues
    pair.setsockopt(zmq.RCVHWM, 0)
    pair.connect(address)
    try:
        for _ in range(count):
            if not pair.poll(60_000):
                raise RuntimeError("echo: nothing to echo within 60 s")
            pair.send(pair.recv(copy=False), copy=False)
    finally:
        pair.close()
        ctx.term()


def _pair(conn: Any, count: int) -> tuple[zmq.Context[zmq.Socket[bytes]], zmq.Socket[bytes]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pair = ctx.socket(zmq.PAIR)
    pair.setsockopt(zmq.LINGER, 0)
    pair.setsockopt(zmq.SNDHWM, 0)
    pair.setsockopt(zmq.RCVHWM, 0)
    port = pair.bind_to_random_port("tcp://127.0.0.1")
    conn.send(("echo", f"tcp://127.0.0.1:{port}", count))
    return ctx, pair


def round_trips(conn: Any, count: int) -> list[float]:
    """``count`` timed 4 KiB round trips (after as many untimed to warm up)."""
    ctx, pair = _pair(conn, 2 * count)
    payload = bytes(ROW)
    samples = []
    try:
        for i in range(2 * count):
            start = time.perf_counter()
            pair.send(payload, copy=False)
            if not pair.poll(60_000):
                raise RuntimeError("raw pyzmq round trip: no echo within 60 s")
            pair.recv(copy=False)
            if i >= count:
                samples.append(time.perf_counter() - start)
        if not conn.poll(60) or conn.recv() != "ok":
            raise RuntimeError("the echo did not end")
    finally:
        pair.close()
        ctx.term()
    return samples


def pipelined(conn: Any, count: int, window: int) -> float:
    """Round trips per second with up to ``window`` 4 KiB messages in flight."""
    ctx, pair = _pair(conn, count)
    payload = bytes(ROW)
    sent = received = 0
    try:
        start = time.perf_counter()
        while received < count:
            while sent < count and sent - received < window:
                pair.send(payload, copy=False)
                sent += 1
            if not pair.poll(60_000):
                raise RuntimeError("raw pyzmq pipelined: no echo within 60 s")
            while received < sent and pair.poll(0):
                pair.recv(copy=False)
                received += 1
        took = time.perf_counter() - start
        if not conn.poll(60) or conn.recv() != "ok":
            raise RuntimeError("the echo did not end")
    finally:
        pair.close()
        ctx.term()
    return count / took


def room_latency(
    conn: Any, rx: Any, address: str, path: str, count: int, ids: Iterator[int]
) -> list[float]:
    """``count`` timed one-row rooms, ``open()`` to Success, one at a time."""
    samples = []
    for i in range(count + count // 5):  # the first fifth warms up
        room = next(ids)
        ask(conn, ("rooms", path, ROW, [room]))
        start = time.perf_counter()
        rx.open(room, address, row_shape=(ROW,), dtype=torch.uint8, allocated_tokens=1)
        status = rx.wait(room, 60)
        took = time.perf_counter() - start
        if status.name != "Success":
            raise RuntimeError(f"{path}: room {room} ended {status.name}: {rx.info(room).reason}")
        rx.remove(room)
        ask(conn, ("forget", path, [room]))
        if i >= count // 5:
            samples.append(took)
    return samples
