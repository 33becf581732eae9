"""``PagedPool``: long-lived, page-indexed memory, as serving engines hold it.

A pool is a set of buffers whose first dimension is tokens (a multiple of
``page_size``): page ``p`` is tokens ``[p * page_size, (p + 1) * page_size)``
of every buffer at once (one buffer per layer, K and V: a KV cache). Optional
aux buffers hold one row per request (output ids, lengths, ...).

The application owns the memory of a pool built from its own tensors; a pool
made by :meth:`PagedPool.allocate` owns its memory, in the place a transport
reaches fastest (shared memory for ``zmq``). Either way, the memory is
registered once per endpoint and attached once per peer, and a view of it is
valid as long as the view exists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from kvpoll.errors import InvalidArgument
from kvpoll.ids import random_bits
from kvpoll.memory.pages import Run, as_runs
from kvpoll.memory.shm import Segment

__all__ = ["BufferLayout", "Memory", "PagedPool", "dtype_name"]

Memory = Literal["auto", "shm", "host", "pinned", "cuda"]
_ALIGN = 64


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class BufferLayout:
    """One buffer's shape of a token (or aux row) and its size in bytes."""

    row_shape: tuple[int, ...]
    dtype: str
    row_bytes: int

    @classmethod
    def of(cls, tensor: torch.Tensor) -> BufferLayout:
        row_shape = tuple(int(d) for d in tensor.shape[1:])
        return cls(
            row_shape, dtype_name(tensor.dtype), math.prod(row_shape) * tensor.element_size()
        )


def _check_buffer(tensor: Any, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() < 1:
        raise InvalidArgument(f"{what} must be a tensor of shape [tokens, ...]")
    if not tensor.is_contiguous():
        raise InvalidArgument(f"{what} must be contiguous")
    return tensor


class PagedPool:
    """Page-indexed buffers registered once and named by page indices per request.

    Args:
        buffers: tensors of shape ``[num_pages * page_size, *row_shape]``, all
            with the same number of tokens, on one device.
        page_size: tokens per page (>= 1).
        aux: tensors of shape ``[rows, *row_shape]``: one row per request.
        stage: move the data through a host-memory copy of the pool (True),
            never (False), or when the transport cannot reach the pool's
            memory itself (None: a GPU pool on a transport without device
            memory). Staging is reported in each room's ``info().metrics``.

    Raises:
        InvalidArgument: no buffers, token counts that differ or are not a
            multiple of ``page_size``, non-contiguous tensors, mixed devices.
    """

    def __init__(
        self,
        buffers: Sequence[torch.Tensor],
        *,
        page_size: int,
        aux: Sequence[torch.Tensor] = (),
        stage: bool | None = None,
    ) -> None:
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise InvalidArgument(f"page_size must be an int >= 1, not {page_size!r}")
        if isinstance(buffers, torch.Tensor):
            buffers = [buffers]
        self.buffers = tuple(_check_buffer(b, f"buffer {i}") for i, b in enumerate(buffers))
        self.aux = tuple(_check_buffer(a, f"aux buffer {i}") for i, a in enumerate(aux))
        if not self.buffers:
            raise InvalidArgument("a pool needs at least one buffer")
        tokens = {int(b.shape[0]) for b in self.buffers}
        if len(tokens) != 1:
            raise InvalidArgument(
                f"every buffer needs the same number of tokens, not {sorted(tokens)}"
            )
        (self.tokens,) = tokens
        if self.tokens % page_size:
            raise InvalidArgument(
                f"buffers of {self.tokens} tokens are not a whole number of pages of {page_size}"
            )
        devices = {b.device for b in (*self.buffers, *self.aux)}
        if any(d.type not in ("cpu", "cuda") for d in devices):
            raise InvalidArgument(
                f"a pool's buffers hold data in CPU or CUDA memory, not on {devices} "
                "(a meta tensor has no data to move)"
            )
        if len({d.type for d in devices}) != 1 and {d.type for d in devices} != {"cpu", "cuda"}:
            raise InvalidArgument(f"a pool's buffers live on one kind of device, not {devices}")
        self.page_size = page_size
        self.num_pages = self.tokens // page_size
        self.aux_rows = min((int(a.shape[0]) for a in self.aux), default=0)
        self.layouts = tuple(BufferLayout.of(b) for b in self.buffers)
        self.aux_layouts = tuple(BufferLayout.of(a) for a in self.aux)
        self.id = random_bits(62)
        self.segment: Segment | None = None
        if stage is not None and not isinstance(stage, bool):
            raise InvalidArgument(f"stage must be True, False or None, not {stage!r}")
        self.stage = stage

    def mirror(self, memory: str) -> PagedPool:
        """A pool of the same layout in host memory (``memory``: shm, pinned or host)."""
        return PagedPool.allocate(
            num_pages=self.num_pages,
            page_size=self.page_size,
            buffers=[(tuple(b.shape[1:]), b.dtype) for b in self.buffers],
            aux=[(int(a.shape[0]), tuple(a.shape[1:]), a.dtype) for a in self.aux],
            memory=memory,
        )

    # -- making one ----------------------------------------------------------------
    @classmethod
    def allocate(
        cls,
        *,
        num_pages: int,
        page_size: int,
        buffers: Sequence[tuple[Sequence[int], torch.dtype]],
        aux: Sequence[tuple[int, Sequence[int], torch.dtype]] = (),
        memory: Memory | str = "auto",
        transport: Any = None,
        device: str | torch.device | None = None,
    ) -> PagedPool:
        """A pool whose memory kvpoll allocates, where ``transport`` reaches it best.

        Args:
            num_pages, page_size: the pool's size.
            buffers: ``(row_shape, dtype)`` of each buffer.
            aux: ``(rows, row_shape, dtype)`` of each aux buffer.
            memory: ``"shm"`` (one shared-memory segment peers on this host
                write into directly), ``"host"``, ``"pinned"``, ``"cuda"``, or
                ``"auto"``: what ``transport`` (a name or a transport) prefers:
                shared memory for ``zmq``, host memory otherwise, ``cuda``
                when ``device`` is a GPU.
            device: the CUDA device for ``memory="cuda"``.

        Raises:
            InvalidArgument: a bad size or layout, or memory this machine lacks.
        """
        for name, value in (("num_pages", num_pages), ("page_size", page_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name} must be an int >= 1, not {value!r}")
        if not buffers:
            raise InvalidArgument("a pool needs at least one buffer")
        kind = _memory_kind(memory, transport, device)
        tokens = num_pages * page_size
        shapes: list[tuple[tuple[int, ...], torch.dtype]] = [
            ((tokens, *_shape(shape)), dtype) for shape, dtype in buffers
        ]
        shapes += [((int(rows), *_shape(shape)), dtype) for rows, shape, dtype in aux]
        sizes = [math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in shapes]
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += -(-size // _ALIGN) * _ALIGN
        segment = None
        if kind == "shm":
            segment = Segment.create(total)
            segment.publish()
            raw = segment.data
        elif kind == "cuda":
            if not torch.cuda.is_available():
                raise InvalidArgument("memory='cuda' needs a GPU, and torch sees none here")
            raw = torch.zeros(total, dtype=torch.uint8, device=device or "cuda")
        else:
            raw = torch.zeros(total, dtype=torch.uint8, pin_memory=kind == "pinned")
        tensors = [
            raw[off : off + size].view(dtype).view(shape)
            for (shape, dtype), off, size in zip(shapes, offsets, sizes, strict=True)
        ]
        pool = cls(tensors[: len(buffers)], page_size=page_size, aux=tensors[len(buffers) :])
        pool.segment = segment
        return pool

    # -- reading -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.buffers[0].device

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (*self.buffers, *self.aux))

    def check_pages(self, pages: Any, what: str = "pages") -> list[Run]:
        """``pages`` as runs, each page checked to lie in this pool.

        Raises:
            InvalidArgument: not page indices, or a page outside the pool.
        """
        runs = as_runs(pages, what=what)
        for first, count in runs:
            if first + count > self.num_pages:
                raise InvalidArgument(
                    f"{what}: page {first + count - 1} is outside a pool of {self.num_pages} pages"
                )
        return runs

    def gather(self, buffer: int, pages: Any, tokens: int | None = None) -> torch.Tensor:
        """A copy of the tokens on ``pages`` of buffer ``buffer``, in page order
        (the first ``tokens`` of them, when given)."""
        runs = self.check_pages(pages)
        data = self.buffers[buffer]
        ps = self.page_size
        parts = [data[first * ps : (first + count) * ps] for first, count in runs]
        out = torch.cat(parts) if len(parts) != 1 else parts[0].clone()
        return out if tokens is None else out[:tokens]

    def page_view(self, buffer: int, first: int, count: int = 1) -> torch.Tensor:
        """A view (no copy) of ``count`` consecutive pages of buffer ``buffer``."""
        if not 0 <= first <= first + count <= self.num_pages:
            raise InvalidArgument(f"pages {first}..{first + count} of {self.num_pages}")
        ps = self.page_size
        return self.buffers[buffer][first * ps : (first + count) * ps]

    def close(self) -> None:
        """Stop offering the pool's shared memory to new peers (views stay valid)."""
        if self.segment is not None:
            self.segment.close()

    def __repr__(self) -> str:
        return (
            f"PagedPool({len(self.buffers)} buffers, {self.num_pages} pages of {self.page_size} "
            f"tokens, {len(self.aux)} aux, {self.device})"
        )


def _shape(shape: Sequence[int] | int) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        out = tuple(shape)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgument(f"a row shape is a sequence of ints, not {shape!r}") from None
    for d in out:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise InvalidArgument(f"a row shape needs ints >= 1, not {list(out)!r}")
    return out


def _memory_kind(memory: str, transport: Any, device: str | torch.device | None) -> str:
    if memory not in ("auto", "shm", "host", "pinned", "cuda"):
        raise InvalidArgument(
            f"memory must be 'auto', 'shm', 'host', 'pinned' or 'cuda', not {memory!r}"
        )
    if memory != "auto":
        return memory
    if device is not None and torch.device(device).type == "cuda":
        return "cuda"
    if transport is None:
        return "host"
    if isinstance(transport, str):
        return "shm" if transport == "zmq" else "host"
    kind = transport.memory_kind()
    return str(kind)
