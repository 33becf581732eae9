"""SGLang's registered buffers as kvpoll pools.

SGLang describes its memory as three lists per kind (KV, aux, state): the
address of each buffer, its length in bytes, and its *item* length (the bytes
of one page of a KV buffer, of one request's row of an aux buffer, of one slot
of a state buffer). kvpoll moves the same bytes when each item is one "token"
of a :class:`~kvpoll.PagedPool` with ``page_size=1``: SGLang's page ``p`` is
kvpoll's page ``p`` of every buffer, and aux row ``r`` is the pool's aux row
``r``. No memory is copied or allocated; the pools are views of SGLang's.

This module does not import SGLang.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from typing import Any

import torch

from kvpoll.errors import InvalidArgument
from kvpoll.memory import PagedPool

__all__ = ["buffer_view", "describe", "pointer_device", "pool_from_buffers"]

log = logging.getLogger("kvpoll.integrations.sglang")


class _DeviceMemory:
    """A CUDA allocation as ``__cuda_array_interface__`` (bytes), for torch.as_tensor."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
        }


_CU_POINTER_ATTRIBUTE_MEMORY_TYPE = 2
_CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9
_CU_MEMORYTYPE_DEVICE = 2


def pointer_device(ptr: int) -> str:
    """Where the memory at ``ptr`` lives: ``"cpu"``, or ``"cuda:N"`` for device memory.

    Asked of the CUDA driver (``cuPointerGetAttribute``) when CUDA is available;
    host memory (malloc'd, pinned or managed) is ``"cpu"``.
    """
    if not torch.cuda.is_available():
        return "cpu"
    torch.cuda.current_device()  # makes the context the driver needs to answer
    driver = ctypes.CDLL("libcuda.so.1")
    kind, ordinal = ctypes.c_uint(0), ctypes.c_int(0)
    if driver.cuPointerGetAttribute(
        ctypes.byref(kind), _CU_POINTER_ATTRIBUTE_MEMORY_TYPE, ctypes.c_uint64(ptr)
    ):  # CUDA_ERROR_INVALID_VALUE: memory CUDA does not know, i.e. plain host memory
        return "cpu"
    if kind.value != _CU_MEMORYTYPE_DEVICE:
        return "cpu"
    driver.cuPointerGetAttribute(
        ctypes.byref(ordinal), _CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ctypes.c_uint64(ptr)
    )
    return f"cuda:{ordinal.value}"


def buffer_view(ptr: int, nbytes: int, device: str) -> torch.Tensor:
    """A uint8 tensor over ``nbytes`` at address ``ptr`` (no copy).

    ``device`` is ``"cpu"`` or a CUDA device (``"cuda"``, ``"cuda:1"``). The
    memory belongs to the caller, who keeps it alive while the view is used.

    Raises:
        InvalidArgument: a null address, a size < 1, or another device.
    """
    if isinstance(ptr, bool) or not isinstance(ptr, int) or ptr <= 0:
        raise InvalidArgument(f"buffer address must be a positive int, not {ptr!r}")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise InvalidArgument(f"buffer length must be an int >= 1, not {nbytes!r}")
    kind = torch.device(device).type
    if kind == "cpu":
        raw = (ctypes.c_uint8 * nbytes).from_address(ptr)
        return torch.frombuffer(raw, dtype=torch.uint8)
    if kind == "cuda":
        return torch.as_tensor(_DeviceMemory(ptr, nbytes), device=device)
    raise InvalidArgument(f"buffers on {device!r} are not supported (cpu or cuda)")


def _items(
    what: str,
    ptrs: Sequence[int],
    lens: Sequence[int],
    item_lens: Sequence[int],
    device: str,
) -> list[torch.Tensor]:
    """Each buffer as ``[items, item_len]`` uint8."""
    if not len(ptrs) == len(lens) == len(item_lens):
        raise InvalidArgument(
            f"{what}: {len(ptrs)} addresses, {len(lens)} lengths and "
            f"{len(item_lens)} item lengths do not pair up"
        )
    views = []
    for i, (ptr, nbytes, item) in enumerate(zip(ptrs, lens, item_lens, strict=True)):
        if isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise InvalidArgument(f"{what} {i}: item length must be an int >= 1, not {item!r}")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < item:
            raise InvalidArgument(f"{what} {i}: {nbytes!r} bytes hold no item of {item}")
        items = nbytes // item
        views.append(buffer_view(ptr, items * item, device).view(items, item))
    return views


def pool_from_buffers(
    ptrs: Sequence[int],
    lens: Sequence[int],
    item_lens: Sequence[int],
    *,
    device: str | None = None,
    aux_ptrs: Sequence[int] = (),
    aux_lens: Sequence[int] = (),
    aux_item_lens: Sequence[int] = (),
    aux_device: str | None = None,
) -> PagedPool:
    """A :class:`~kvpoll.PagedPool` (``page_size=1``) over SGLang's buffers.

    ``device`` / ``aux_device``: where the buffers live (default: asked of the
    CUDA driver for the first buffer, see :func:`pointer_device`).

    Every buffer holds ``len // item_len`` items; a pool's buffers must hold
    the same number (the smallest is used, with a warning, when they differ:
    items past it cannot be sent).

    Raises:
        InvalidArgument: lists that do not pair up, an item larger than its
            buffer, a null address, or memory on an unsupported device.
    """
    if device is None and len(ptrs):
        device = pointer_device(int(ptrs[0]))
    if aux_device is None and len(aux_ptrs):
        aux_device = pointer_device(int(aux_ptrs[0]))
    buffers = _items("KV buffer", ptrs, lens, item_lens, device or "cpu")
    if not buffers:
        raise InvalidArgument("SGLang registered no KV buffer")
    counts = {int(b.shape[0]) for b in buffers}
    if len(counts) > 1:
        log.warning(
            "SGLang's KV buffers hold %s pages: only the first %d of each can be sent",
            sorted(counts),
            min(counts),
        )
        buffers = [b[: min(counts)] for b in buffers]
    aux = _items("aux buffer", aux_ptrs, aux_lens, aux_item_lens, aux_device or "cpu")
    return PagedPool(buffers, page_size=1, aux=aux)


def describe(pool: PagedPool) -> dict[str, Any]:
    """A short description for logs: pages, buffers, bytes per page, aux rows."""
    return {
        "pages": pool.num_pages,
        "buffers": len(pool.buffers),
        "page_bytes": sum(int(b[0].nbytes) for b in pool.buffers),
        "aux_rows": pool.aux_rows,
    }
