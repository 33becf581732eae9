"""Agreeing on a transport path at bootstrap.

A receiver announces the paths its transport speaks (``zmq/shm``, ``zmq/tcp``,
``ucx``, ...) and its host in ``bootstrap``; the sender picks one it speaks
too. On one host a shared-memory path comes first; across hosts a
shared-memory path is never chosen. No common path is a clear error at once:
the sender refuses the bootstrap, naming both lists, and both sides' rooms fail.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

__all__ = ["SAME_HOST_SUFFIX", "choose_path", "mismatch"]

SAME_HOST_SUFFIX = "/shm"
"""Paths ending so reach only endpoints on the same host."""


def choose_path(
    offered: Sequence[str], spoken: Sequence[str], *, same_host: bool | None
) -> str | None:
    """The path to use, or None when the two sides share none.

    ``spoken`` is in the sender's order of preference; on one host, paths
    ending in ``/shm`` move ahead of the rest; across hosts they are dropped.
    ``same_host`` None (the receiver did not say where it is) keeps the
    sender's order. A receiver that announces no paths at all (an older or a
    minimal peer) gets the sender's first path: the write itself then checks
    that it can reach the region.
    """
    if sum(map(len, offered)) > _CACHED_CHARS:  # a peer's long names are not kept
        return _choose.__wrapped__(tuple(offered), tuple(spoken), same_host)
    return _choose(tuple(offered), tuple(spoken), same_host)


_CACHED_CHARS = 512


@lru_cache(maxsize=256)
def _choose(
    offered: tuple[str, ...], spoken: tuple[str, ...], same_host: bool | None
) -> str | None:
    """:func:`choose_path`, kept for a few hundred questions (every bootstrap
    between two endpoints asks the same one)."""
    common = [path for path in spoken if path in offered] if offered else list(spoken)
    if same_host is None:
        return common[0] if common else None
    local = [path for path in common if path.endswith(SAME_HOST_SUFFIX)]
    network = [path for path in common if not path.endswith(SAME_HOST_SUFFIX)]
    ordered = [*local, *network] if same_host else network
    return ordered[0] if ordered else None


def mismatch(offered: Sequence[str], spoken: Sequence[str], *, same_host: bool | None) -> str:
    """Why :func:`choose_path` found nothing, in words for an error message."""
    where = {True: "on this host", False: "on another host", None: "host unknown"}[same_host]
    return (
        f"no common transport: the receiver ({where}) offers {', '.join(offered) or 'nothing'}; "
        f"this sender speaks {', '.join(spoken)}. Configure both sides with one transport "
        "(KVPOLL_TRANSPORT or 'transport' in kvpoll.toml)"
    )
