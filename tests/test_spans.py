"""SpanBatch: a batched write held as columns. It is its spans (Sequence[Span]),
is checked as they are, copies as they would, and a paged room moves the same
bytes whether the Sender hands its ranges over as columns or as a list."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from kvpoll import PagedPool, Receiver, Sender
from kvpoll import TransferStatus as S
from kvpoll.protocol import sender as sender_module
from kvpoll.testing import wait_for_write
from kvpoll.transports import SpanBatch, create
from kvpoll.transports.base import (
    Region,
    RegionBoundsError,
    RegionDescriptor,
    Span,
    TransportError,
    check_batch,
)
from kvpoll.transports.spans import copy_batch
from tests.conftest import FAST


def region(nbytes: int, region_id: int, endpoint: str = "tcp://127.0.0.1:1") -> Region:
    descriptor = RegionDescriptor(
        transport="zmq", endpoint=endpoint, region_id=region_id, nbytes=nbytes
    )
    return Region(descriptor, torch.zeros(nbytes, dtype=torch.uint8))


def raw(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes (random bytes make NaNs of floats, which equal nothing)."""
    return tensor.contiguous().view(torch.uint8)


@pytest.fixture
def spans() -> list[Span]:
    a, b, c = region(4096, 1), region(4096, 2), region(8192, 3)
    return [
        Span(a, 0, c.descriptor, 4096, 512),
        Span(b, 512, c.descriptor, 0, 1024),
        Span(a, 1024, c.descriptor, 2048, 256),
        Span(a, 2048, b.descriptor, 0, 0),
    ]


def test_a_span_batch_is_its_spans(spans: list[Span]) -> None:
    batch = SpanBatch.of(spans)
    assert len(batch) == 4
    assert len(batch.pairs) == 3
    assert list(batch) == spans
    assert [batch[i] for i in range(4)] == spans
    assert batch[-1] == spans[-1]
    part = batch[1:3]
    assert isinstance(part, SpanBatch)
    assert list(part) == spans[1:3]
    assert batch.total == sum(s.nbytes for s in spans)
    assert list(batch.nonempty()) == spans[:3]
    assert batch.src_addresses().tolist() == [s.src.data.data_ptr() + s.src_offset for s in spans]
    rebuilt = SpanBatch(batch.pairs, batch.pair, batch.src_offset, batch.dst_offset, batch.nbytes)
    assert list(rebuilt) == spans
    with pytest.raises(ValueError, match="read-only"):
        batch.nbytes[0] = 1  # columns are read-only


@pytest.mark.parametrize(
    ("columns", "match"),
    [
        (([0, 0], [0], [0, 0], [1, 1]), "differ in length"),
        (([0], [-1], [0], [1]), "src_offset must be >= 0"),
        (([0], [0], [0], [1.5]), "nbytes must be integers"),
        (([0], [0], [0], ["1"]), "nbytes must be integers"),
        (([1], [0], [0], [1]), "refers to pair 1"),
        (([0], [1 << 64], [0], [1]), "src_offset must be integers"),
        (([0], np.array([1 << 63], dtype=np.uint64), [0], [1]), "src_offset must be >= 0"),
    ],
)
def test_bad_columns_are_refused(columns: tuple[Any, ...], match: str) -> None:
    a = region(64, 1)
    with pytest.raises(TransportError, match=match):
        SpanBatch([(a, a.descriptor)], *columns)


def test_pairs_must_be_regions_and_descriptors() -> None:
    a = region(64, 1)
    with pytest.raises(TransportError, match=r"\(Region, RegionDescriptor\)"):
        SpanBatch([(a.descriptor, a)], [0], [0], [0], [1])  # type: ignore[list-item]


def bad_lists() -> list[tuple[str, list[Span]]]:
    a, b = region(4096, 1), region(4096, 2)
    far = region(4096, 3, endpoint="tcp://127.0.0.1:2")
    good = Span(a, 0, b.descriptor, 0, 1024)
    return [
        ("source", [good, Span(a, 4000, b.descriptor, 0, 200)]),
        ("destination", [good, good, Span(a, 0, b.descriptor, 3900, 200)]),
        ("two peers", [good, Span(a, 0, far.descriptor, 0, 16)]),
        ("empty", []),
    ]


@pytest.mark.parametrize(("what", "spans"), bad_lists(), ids=[w for w, _ in bad_lists()])
def test_a_batch_is_checked_over_its_columns_as_its_spans_are(what: str, spans: list[Span]) -> None:
    errors = []
    for form in (spans, SpanBatch.of(spans)):
        with pytest.raises(TransportError) as caught:
            check_batch(form)
        errors.append((type(caught.value), str(caught.value)))
    assert errors[0] == errors[1]
    if what in ("source", "destination"):
        assert errors[0][0] is RegionBoundsError
        assert f"range {len(spans) - 1}" in errors[0][1]


def test_overlapping_destinations_are_found(spans: list[Span]) -> None:
    assert not SpanBatch.of(spans).overlapping()
    a, c = spans[0].src, spans[0].dst
    clash = Span(a, 0, c, 4096 + 500, 100)  # into the first span's bytes, from another pair
    assert SpanBatch.of([*spans, Span(spans[1].src, 0, c, 4096 + 500, 100)]).overlapping()
    assert SpanBatch.of([*spans, clash]).overlapping()
    touching = Span(a, 0, c, 4096 + 512, 100)  # right after it: no overlap
    assert not SpanBatch.of([*spans, touching]).overlapping()


@pytest.mark.parametrize(
    ("count", "granule", "pairs"), [(5, 4096, 1), (40, 1, 2), (40, 256, 1), (300, 512, 3)]
)
def test_copy_batch_copies_as_a_loop_of_copies_would(count: int, granule: int, pairs: int) -> None:
    rng = np.random.default_rng(count + granule)
    size = count * granule * 4
    srcs = [region(size, i) for i in range(pairs)]
    dsts = [region(size, 10 + i) for i in range(pairs)]
    for r in srcs:
        r.data.copy_(torch.from_numpy(rng.integers(0, 256, size, dtype=np.uint8)))
    pair = rng.integers(0, pairs, count)
    slots = rng.permutation(size // granule // 2)[:count]  # destinations do not overlap
    lengths = rng.integers(0, 3, count) * granule  # some empty
    src_offset = rng.integers(0, size // granule - 2, count) * granule
    dst_offset = slots * 2 * granule
    expected = [d.data.clone() for d in dsts]
    for p, so, do, n in zip(pair, src_offset, dst_offset, lengths, strict=True):
        expected[p][do : do + n] = srcs[p].data[so : so + n]
    batch = SpanBatch(
        [(s, d.descriptor) for s, d in zip(srcs, dsts, strict=True)],
        pair,
        src_offset,
        dst_offset,
        lengths,
    )
    assert copy_batch(batch, lambda at: (dsts[at].data.numpy(), srcs[at].data.numpy()))
    assert all(torch.equal(d.data, e) for d, e in zip(dsts, expected, strict=True))


@pytest.mark.parametrize("shared_destination", [False, True])
def test_copy_batch_copies_nothing_when_destinations_overlap(shared_destination: bool) -> None:
    a, b = region(64 * 512, 1), region(64 * 512, 2)
    c = region(64 * 512, 3)
    a.data.fill_(1)
    b.data.fill_(2)
    other = c.descriptor if shared_destination else region(64 * 512, 4).descriptor
    # range 39 writes into range 0's bytes (of the same destination)
    batch = SpanBatch(
        [(a, c.descriptor), (b, other)],
        [0] * 40 + [1] * 8,
        [i * 512 for i in range(40)] + [0] * 8,
        [i * 512 for i in range(39)] + [100] + [40 * 512 + i * 512 for i in range(8)],
        [512] * 48,
    )
    assert not copy_batch(batch, lambda at: (c.data.numpy(), (a, b)[at].data.numpy()))
    assert not bool(c.data.any())


@pytest.mark.parametrize("count", [4, 64])
def test_copy_batch_refuses_a_range_past_the_end(count: int) -> None:
    src, dst = region(count * 1024, 1), region(count * 512, 2)
    dst_offset = np.arange(count, dtype=np.int64) * 512
    dst_offset[-1] = count * 512  # one past the end of dst (unchecked here)
    batch = SpanBatch._trusted(
        ((src, dst.descriptor),),
        [np.zeros(count, dtype=np.int64), np.arange(count) * 512, dst_offset, np.full(count, 512)],
    )
    with pytest.raises((IndexError, ValueError)):
        copy_batch(batch, lambda _: (dst.data.numpy(), src.data.numpy()))


def test_overlapping_columns_land_in_order_over_shared_memory() -> None:
    a, b = create("zmq"), create("zmq")
    try:
        src = a.register(torch.arange(256, dtype=torch.uint8).repeat(64))  # 16 KiB
        dst = b.allocate(4096)
        page = 256
        n = 40  # enough ranges for the gathered copy, were they not overlapping
        pair = [0] * n
        src_offset = [i * page for i in range(n)]
        dst_offset = [(i % 8) * page for i in range(n)]  # each slot written five times
        src.data[: n * page] = torch.arange(n, dtype=torch.uint8).repeat_interleave(page)
        batch = SpanBatch([(src, dst.descriptor)], pair, src_offset, dst_offset, [page] * n)
        assert batch.overlapping()
        write_id = a.write_batch(batch)
        assert wait_for_write(a, b, write_id).ok
        last = [max(i for i in range(n) if i % 8 == slot) for slot in range(8)]  # later wins
        assert dst.data[: 8 * page].tolist() == [v for v in last for _ in range(page)]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("shm", [True, False], ids=["shm", "tcp"])
@pytest.mark.parametrize("few", [0, 1 << 30], ids=["columns", "list"])
def test_a_paged_room_moves_the_same_bytes_as_columns_or_as_a_list(
    shm: bool, few: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sender_module, "_FEW_RANGES", few)
    layout = {
        "page_size": 4,
        "buffers": [((8,), torch.bfloat16), ((3,), torch.int32), ((5,), torch.uint8)],
        "aux": [(2, (3,), torch.int64)],
    }
    src = PagedPool.allocate(num_pages=64, **layout)  # type: ignore[arg-type]
    dst = PagedPool.allocate(num_pages=64, **layout)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(3)
    for buffer in (*src.buffers, *src.aux):
        buffer.view(torch.uint8).copy_(
            torch.randint(0, 256, buffer.view(torch.uint8).shape, generator=gen, dtype=torch.uint8)
        )
    src_pages = torch.randperm(64, generator=gen)[:30].tolist()
    dst_pages = torch.randperm(64, generator=gen)[:30].tolist()
    tx = Sender("zmq", transport_options={"shm": shm}, **FAST)
    rx = Receiver("zmq", transport_options={"shm": shm}, **FAST)
    try:
        tx.add(1)
        tx.send(1, pages=src_pages, pool=src, aux_index=1)
        rx.open(1, tx.address, pool=dst, pages=dst_pages, aux_index=0)
        assert rx.wait(1, 20) is S.Success, rx.info(1).reason
        for mine, theirs in zip(src.buffers, dst.buffers, strict=True):
            for sp, dp in zip(src_pages, dst_pages, strict=True):
                assert torch.equal(raw(mine[sp * 4 : sp * 4 + 4]), raw(theirs[dp * 4 : dp * 4 + 4]))
        assert torch.equal(raw(dst.aux[0][0]), raw(src.aux[0][1]))
        assert rx.info(1).bytes_moved == tx.info(1).bytes_moved > 0
    finally:
        tx.close()
        rx.close()
        src.close()
        dst.close()
