"""The benchmarks' sending process: started, spoken to over a pipe, always ended."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kvpoll.processes import worker_context

__all__ = ["ask", "sending_child"]


@contextmanager
def sending_child(target: Callable[[Any], None], name: str) -> Iterator[Any]:
    """Run ``target(conn)`` in a worker process; yield this end of the pipe.

    On the way out the child is told ``("exit",)``, given 30 s, then killed.
    """
    ctx = worker_context()
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=target, args=(child_conn,), name=name, daemon=True)
    child.start()
    try:
        yield conn
    finally:
        if child.is_alive():
            conn.send(("exit",))
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join(5)


def ask(conn: Any, command: tuple[Any, ...], timeout: float = 300.0) -> Any:
    """Send a command to the child and wait (bounded) for its answer."""
    conn.send(command)
    if not conn.poll(timeout):
        raise RuntimeError(f"the sending process did not answer {command!r} within {timeout:g} s")
    return conn.recv()
