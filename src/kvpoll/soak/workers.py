"""The soak's peer processes: a sender and receivers, each driven over a pipe.

A worker takes commands (``("add" | "open", room, tokens, ...)``), runs its
endpoint, and reports each room once it is final: ``("final", room, status,
reason, ok)`` where ``ok`` says the data matched (receivers check every byte
against the room's seed). ``("probe",)`` answers what the process holds
(file descriptors, memory, memfds) so leaks can be measured.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
from typing import Any

import torch

__all__ = ["HIDDEN", "payload", "probe", "receiver_worker", "sender_worker"]

HIDDEN = 64
BOOTSTRAP_TIMEOUT = 5.0
"""Seconds a sender's room waits for its receiver's bootstrap (an engine's bootstrap time-out)."""


def payload(room: int, tokens: int) -> torch.Tensor:
    """The room's data, the same on both sides: ``[tokens, HIDDEN]`` bf16 from the room id."""
    gen = torch.Generator().manual_seed(room & 0x7FFFFFFF)
    return torch.randn(tokens, HIDDEN, generator=gen).to(torch.bfloat16)


def probe() -> dict[str, int]:
    """What this process holds now: open fds, memfds, shared memory mapped (bytes of
    memfd mappings: a peer's segment mapped here after its descriptor closed
    still counts), resident memory (bytes)."""
    gc.collect()
    fds = os.listdir("/proc/self/fd")
    memfds = 0
    for fd in fds:
        with contextlib.suppress(OSError):
            memfds += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
    rss = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return {"fds": len(fds), "memfds": memfds, "mapped": mapped_memfds(), "rss": rss}


def mapped_memfds() -> int:
    """Bytes of memfd (shared memory) mappings in this process."""
    total = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "/memfd:" in line:
                span = line.split(" ", 1)[0]
                lo, hi = span.split("-")
                total += int(hi, 16) - int(lo, 16)
    return total


def _serve(conn: Any, endpoint: Any, handle: Any, check: Any) -> None:
    """The worker loop: commands in, final rooms out, until ``None`` or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the soak stops its workers itself
    # the injected traffic is refused by design: counted in stats, not logged here
    logging.getLogger("kvpoll").setLevel(logging.ERROR)
    watched: dict[int, int] = {}
    conn.send(("ready", endpoint.address))
    while True:
        if conn.poll(0.01):
            try:
                command = conn.recv()
            except EOFError:
                break
            if command is None:
                break
            if command[0] == "probe":
                conn.send(("probe", {**probe(), **endpoint.stats}))
                continue
            room, tokens = command[1], command[2]
            try:
                handle(command)
                watched[room] = tokens
            except Exception as exc:  # refused at once: reported as the room's end
                conn.send(("final", room, "Failed", f"{type(exc).__name__}: {exc}", False))
        for room, tokens in list(watched.items()):
            status = endpoint.poll(room)
            if status.is_final:
                del watched[room]
                ok = status.name == "Success" and check(room, tokens)
                conn.send(("final", room, status.name, endpoint.info(room).reason, ok))
                endpoint.remove(room)
    endpoint.close()


def sender_worker(conn: Any, transport: str, options: dict[str, Any], heartbeat: float) -> None:
    """Add each room it is told to and send its data (two chunks: see the receiver)."""
    from kvpoll import Sender

    # a receiver killed before it bootstrapped is unknown here: its room ends by time-out
    tx = Sender(
        transport,
        transport_options=options,
        heartbeat_interval=heartbeat,
        timeouts={"Bootstrapping": BOOTSTRAP_TIMEOUT},
    )

    def handle(command: tuple[Any, ...]) -> None:
        _, room, tokens, token = command
        tx.add(room, token=token)
        tx.send(room, payload(room, tokens))

    _serve(conn, tx, handle, lambda room, tokens: True)


def receiver_worker(conn: Any, transport: str, options: dict[str, Any], heartbeat: float) -> None:
    """Open each room it is told to, in buffers of half the room (so it resumes once)."""
    from kvpoll import Receiver

    rx = Receiver(transport, transport_options=options, heartbeat_interval=heartbeat)

    def handle(command: tuple[Any, ...]) -> None:
        _, room, tokens, token, sender = command
        rx.open(
            room,
            sender,
            token=token,
            row_shape=(HIDDEN,),
            dtype=torch.bfloat16,
            allocated_tokens=max(1, (tokens + 1) // 2),
        )

    def check(room: int, tokens: int) -> bool:
        got = rx.result(room).tensor()
        return bool(torch.equal(got, payload(room, tokens)))

    _serve(conn, rx, handle, check)
