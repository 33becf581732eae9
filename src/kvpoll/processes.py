"""Worker processes that start in milliseconds: a fork server with torch imported.

Spawning a Python process that imports torch costs seconds; the demo, the
soak and the benchmarks start several. :func:`worker_context` starts
multiprocessing's fork server at once, in the background, with ``modules``
imported there; each worker is then forked from it, imports done.

The server keeps the environment and working directory it started with: start
it (call this) after the command line and configuration are settled, and
hand workers what they need as arguments rather than through later changes
to ``os.environ``.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing import forkserver
from multiprocessing.context import ForkServerContext

__all__ = ["BASE_MODULES", "worker_context"]

BASE_MODULES = ("torch", "kvpoll.protocol")
"""What every worker imports: the fork server imports these, then ``modules``."""


def worker_context(*modules: str) -> ForkServerContext:
    """A multiprocessing context whose workers fork from a server that imported
    :data:`BASE_MODULES` and ``modules``.

    The server starts now (its imports run beside whatever the caller does
    next); a server already running is kept (its imports were made already).
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([*BASE_MODULES, *modules])
    forkserver.ensure_running()
    return ctx
