"""Memory: page-indexed pools, page runs, and shared memory (used by protocol/ and transports/).

* :class:`PagedPool`: buffers of pages (a KV cache, multimodal blocks) plus
  aux rows, registered once per endpoint.
* :mod:`kvpoll.memory.pages`: page indices as runs, paired across two sides.
* :mod:`kvpoll.memory.shm`: sealed shared memory that peers on one host attach.
* :mod:`kvpoll.memory.arena`: the pools kvpoll owns for contiguous buffers.
"""

from kvpoll.memory.pages import PageList, as_runs, pair_runs
from kvpoll.memory.pool import BufferLayout, PagedPool, dtype_name

__all__ = ["BufferLayout", "PageList", "PagedPool", "as_runs", "dtype_name", "pair_runs"]
