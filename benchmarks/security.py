"""Benchmark: what the control plane's hardening costs and bounds, one run.

* the cost of the cluster secret (CURVE) against the same path without it,
  alternated in one run: a control message's round trip between two zmq
  transports, a 4 KiB room from open() to Success, a 16 MiB room over TCP
  (CURVE encrypts data frames too) and over shared memory (data never passes
  through ZMQ);
* a flood of 1 KiB messages at a receiver process: its memory before, at the
  peak and after;
* time for a surviving side to fail a room after its peer is killed (SIGKILL),
  default heartbeats (1 s x 3).

    python benchmarks/security.py [--repeat 5] [--out benchmarks/results/security.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import zmq

MiB = 1 << 20


def _secret_file(directory: str) -> str:
    path = Path(directory) / "secret"
    path.write_bytes(os.urandom(32).hex().encode())
    path.chmod(0o600)
    return str(path)


def control_round_trip(secret: str | None, n: int = 2000) -> float:
    """Seconds per control message round trip between two zmq transports."""
    from kvpoll.transports.base import MessageReceived
    from kvpoll.transports.zmq_transport import ZmqTransport

    a = ZmqTransport(secret_file=secret)
    b = ZmqTransport(secret_file=secret)

    def receive(t: ZmqTransport) -> None:
        while not any(isinstance(e, MessageReceived) for e in t.progress(0.01)):
            pass

    try:
        for _ in range(50):  # connect both ways, warm
            a.send(b.address, b"x" * 64)
            receive(b)
            b.send(a.address, b"y" * 64)
            receive(a)
        start = time.perf_counter()
        for _ in range(n):
            a.send(b.address, b"x" * 64)
            receive(b)
            b.send(a.address, b"y" * 64)
            receive(a)
        return (time.perf_counter() - start) / n
    finally:
        a.close()
        b.close()


def room_time(secret: str | None, nbytes: int, shm: bool, rooms: int) -> list[float]:
    """Seconds from open() to Success of ``rooms`` one-chunk rooms of ``nbytes``."""
    from kvpoll import Receiver, Sender

    options: dict[str, Any] = {"shm": shm}
    if secret:
        options["secret_file"] = secret
    data = torch.ones(nbytes // 256, 64, dtype=torch.float32)
    out = []
    with (
        Sender("zmq", transport_options=options) as tx,
        Receiver("zmq", transport_options=options) as rx,
    ):
        for room in range(rooms + 2):
            tx.add(room)
            tx.send(room, data)
            start = time.perf_counter()
            rx.open(
                room, tx.address, row_shape=(64,), dtype=torch.float32, allocated_tokens=len(data)
            )
            assert rx.wait(room, 30).name == "Success"
            if room >= 2:  # the first two warm the path
                out.append(time.perf_counter() - start)
            rx.remove(room)
            tx.remove(room)
    return out


def _flood_target(conn: Any) -> None:
    from kvpoll import Receiver

    with Receiver("zmq") as rx:
        conn.send(rx.address)
        while conn.recv():
            with open("/proc/self/status") as status:
                rss = next(int(line.split()[1]) * 1024 for line in status if "VmRSS" in line)
            conn.send(rss)


def flood(messages: int) -> dict[str, int]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_flood_target, args=(child,), daemon=True)
    proc.start()
    address = parent.recv()

    def rss() -> int:
        parent.send(True)
        return int(parent.recv())

    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.IDENTITY, b"tcp://127.0.0.1:1")
    sock.connect(address)
    before = rss()
    payload = b"x" * 1024
    sent = 0
    start = time.monotonic()
    while sent < messages and time.monotonic() - start < 60:
        try:
            sock.send_multipart([b"C", payload], zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            time.sleep(0.0005)
    peak = rss()
    sock.close()
    zctx.term()
    time.sleep(2.0)
    after = rss()
    parent.send(False)
    proc.join(10)
    return {"messages": sent, "rss_before": before, "rss_peak": peak, "rss_after": after}


def _idle_receiver(address: str, room: int, ready: Any) -> None:
    from kvpoll import Receiver

    rx = Receiver("zmq")
    rx.open(room, address, row_shape=(4,), dtype=torch.float32, allocated_tokens=4)
    ready.put(True)
    time.sleep(600)


def time_to_fail(kills: int) -> list[float]:
    from kvpoll import Sender

    ctx = mp.get_context("spawn")
    out = []
    with Sender("zmq") as tx:
        for room in range(kills):
            tx.add(room)
            ready = ctx.Queue()
            proc = ctx.Process(target=_idle_receiver, args=(tx.address, room, ready), daemon=True)
            proc.start()
            ready.get(timeout=60)
            while tx.poll(room).name != "WaitingForInput":
                time.sleep(0.01)
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            assert tx.wait(room, 30).name == "Failed"
            out.append(time.monotonic() - killed)
            proc.join(10)
    return out


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--flood", type=int, default=400_000)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/security.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        secret = _secret_file(tmp)
        ratios: dict[str, list[float]] = {}
        for _ in range(args.repeat):  # alternate plain and secret, minutes apart at most
            measures: list[tuple[str, Callable[[str | None], list[float]]]] = [
                ("control round trip", lambda s: [control_round_trip(s)]),
                ("4 KiB room (tcp)", lambda s: room_time(s, 4096, False, 200)),
                ("16 MiB room (tcp)", lambda s: room_time(s, 16 * MiB, False, 5)),
                ("16 MiB room (shm)", lambda s: room_time(s, 16 * MiB, True, 5)),
            ]
            for name, measure in measures:
                plain = statistics.median(measure(None))
                auth = statistics.median(measure(secret))
                ratios.setdefault(name, []).append(auth / plain)
                ratios.setdefault(f"{name}: plain s", []).append(plain)
                ratios.setdefault(f"{name}: secret s", []).append(auth)
    result: dict[str, Any] = {
        "auth": {name: summary(values) for name, values in ratios.items()},
        "flood": flood(args.flood),
        "time_to_fail_s": summary(time_to_fail(args.kills)),
    }
    for name, stats in result["auth"].items():
        low, high = stats["min"], stats["max"]
        print(f"{name:34s} median {stats['median']:.4g}  min {low:.4g}  max {high:.4g}")
    f = result["flood"]
    print(
        f"flood of {f['messages']} x 1 KiB: rss {f['rss_before'] / MiB:.0f} MiB before, "
        f"{f['rss_peak'] / MiB:.0f} MiB at the peak, {f['rss_after'] / MiB:.0f} MiB after"
    )
    t = result["time_to_fail_s"]
    print(f"time to fail after SIGKILL: median {t['median']:.2f} s ({t['min']:.2f}-{t['max']:.2f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
