"""An endpoint in a process of its own, driven by the test over a pipe: the target
of the hostile-peer tests (its memory, file descriptors and log are its own)."""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest


def _process_info() -> dict[str, int]:
    rss = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    from kvpoll.soak.workers import mapped_memfds

    return {"rss": rss, "fds": len(os.listdir("/proc/self/fd")), "mapped": mapped_memfds()}


def serve(conn: Any, side: str, transport: str, options: dict[str, Any], log_file: str) -> None:
    """Run a Sender or Receiver; answer ``(method, args, kwargs)`` calls until ``None``."""
    logging.basicConfig(filename=log_file, level=logging.WARNING)
    import torch

    from kvpoll import Receiver, Sender

    cls = Sender if side == "sender" else Receiver
    endpoint = cls(transport, **options)
    conn.send(endpoint.address)
    while True:
        request = conn.recv()
        if request is None:
            break
        method, args, kwargs = request
        try:
            if method == "process":
                gc.collect()
                result: Any = _process_info()
            elif method == "alive":
                result = endpoint._thread.is_alive()
            elif method == "send_ones":  # a room's data made here: tokens x 4 floats
                room, tokens = args
                assert isinstance(endpoint, Sender)
                endpoint.send(room, torch.arange(tokens * 4.0).reshape(tokens, 4))
                result = None
            else:
                result = getattr(endpoint, method)
                result = result(*args, **kwargs) if callable(result) else result
            conn.send(("ok", result))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    endpoint.close()
    conn.send(("closed", None))


class Target:
    """The test's handle on a target process."""

    def __init__(self, proc: Any, conn: Any, address: str, log_file: str) -> None:
        self.proc = proc
        self.conn = conn
        self.address = address
        self.log_file = log_file

    def call(self, method: str, *args: Any, timeout: float = 60.0, **kwargs: Any) -> Any:
        self.conn.send((method, args, kwargs))
        if not self.conn.poll(timeout):
            raise AssertionError(f"the target did not answer {method} within {timeout} s")
        status, value = self.conn.recv()
        if status == "error":
            raise AssertionError(f"{method} failed in the target: {value}")
        return value

    @property
    def stats(self) -> dict[str, int]:
        return dict(self.call("stats"))

    def wait_stat(self, key: str, at_least: int, timeout: float = 60.0) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats
            if stats.get(key, 0) >= at_least:
                return stats
            assert time.monotonic() < deadline, f"{key} stayed below {at_least}: {stats}"
            time.sleep(0.05)

    def log_lines(self) -> list[str]:
        with open(self.log_file) as log:
            return log.read().splitlines()


@contextmanager
def target(
    tmp_path: Any,
    side: str,
    transport: str = "zmq",
    *,
    env: dict[str, str] | None = None,
    **options: Any,
) -> Iterator[Target]:
    """Start a target endpoint process; stop it (and check it closed) after."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    log_file = str(tmp_path / f"{side}-{transport}.log")
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        proc = ctx.Process(
            target=serve, args=(child, side, transport, options, log_file), daemon=True
        )
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        if not parent.poll(60):
            pytest.fail(f"the {side} target did not start")
        handle = Target(proc, parent, parent.recv(), log_file)
        yield handle
        if proc.is_alive():
            parent.send(None)
            parent.poll(30)
    finally:
        proc.join(15)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
