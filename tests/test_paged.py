"""Rooms over registered pools: pages streamed in pieces, resumes with pages, aux rows,
staging, and the errors a caller gets. Real ZMQ sockets and shared memory."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kvpoll import IllegalTransition, InvalidArgument, PagedPool, Receiver, Sender
from kvpoll import TransferStatus as S
from tests.conftest import FAST
from tests.helpers import wait_until

PS = 16  # tokens per page
HIDDEN = 32


def make_pool(pages: int, *, transport: str = "zmq", stage: bool | None = None) -> PagedPool:
    """Two buffers per token (like K and V of one layer) and four aux rows."""
    pool = PagedPool.allocate(
        num_pages=pages,
        page_size=PS,
        buffers=[((2, HIDDEN // 2), torch.bfloat16), ((4,), torch.int32)],
        aux=[(4, (3,), torch.int64)],
        transport=transport,
    )
    pool.stage = stage
    return pool


def fill(pool: PagedPool, pages: list[int], tokens: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Write ``tokens`` of reproducible data into ``pages``; return it per buffer."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(tokens, 2, HIDDEN // 2, generator=gen).to(torch.bfloat16)
    ids = torch.randint(0, 1 << 30, (tokens, 4), generator=gen, dtype=torch.int32)
    for i, page in enumerate(pages):
        lo, hi = i * PS, min((i + 1) * PS, tokens)
        if lo >= tokens:
            break
        pool.buffers[0][page * PS : page * PS + hi - lo] = k[lo:hi]
        pool.buffers[1][page * PS : page * PS + hi - lo] = ids[lo:hi]
    return k, ids


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.view(torch.uint8))


def statuses(endpoint: Sender | Receiver, room: int) -> list[str]:
    return [t.dest.name for t in endpoint.info(room).history]


def test_pages_streamed_in_pieces_with_resumes_in_between(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    src, dst = make_pool(64), make_pool(16)
    tokens = 700  # 44 pages, the last one partial
    src_pages = list(range(63, 63 - 44, -1))  # scattered: descending
    k, ids = fill(src, src_pages, tokens, seed=1)
    src.aux[0][2] = torch.tensor([7, tokens, 9])
    offer = [3, 4, 5, 9, 10, 0, 1, 2]  # 8 pages = 128 tokens at a time, 3 runs
    tx.add(1)
    rx.open(1, tx.address, pool=dst, pages=offer, aux_index=1)
    got_k, got_ids = [], []

    def produce() -> None:  # chunked prefill: 4 pieces, a pause after each
        for start in range(0, 44, 12):
            piece = src_pages[start : start + 12]
            last = start + 12 >= 44
            tx.send(
                1,
                pages=piece,
                pool=src,
                is_last=last,
                tokens=tokens - start * PS if last else None,
                aux_index=2 if last else None,
            )
            time.sleep(0.05)

    producer = threading.Thread(target=produce)
    producer.start()
    delivered = 0
    deadline = time.monotonic() + 30
    while rx.poll(1) is not S.Success:
        assert time.monotonic() < deadline, f"stuck in {rx.poll(1).name}"
        assert rx.poll(1) is not S.Failed, rx.info(1).reason
        info = rx.info(1)
        if info.status is S.Transferring and info.sent_tokens == delivered + 8 * PS:
            got_k.append(dst.gather(0, offer))
            got_ids.append(dst.gather(1, offer))
            delivered = info.sent_tokens
            rx.resume(1, pages=offer)  # the same pages again, once taken out
        time.sleep(0.001)
    producer.join(10)
    rest = tokens - delivered
    got_k.append(dst.gather(0, offer, rest))
    got_ids.append(dst.gather(1, offer, rest))
    assert same(torch.cat(got_k), k)
    assert same(torch.cat(got_ids), ids)
    assert dst.aux[0][1].tolist() == [7, tokens, 9]
    assert tx.wait(1, 10) is S.Success
    history = statuses(rx, 1)
    assert history.count("Success") == 1
    assert history[-1] == "Success"
    assert "WaitingForInput" not in history[history.index("Transferring") :]  # never back
    assert rx.info(1).total_tokens == tokens
    row_bytes = 2 * HIDDEN // 2 * 2 + 4 * 4
    metrics = rx.info(1).metrics
    assert metrics.bytes_moved == tokens * row_bytes + 3 * 8
    assert tx.info(1).metrics.bytes_moved == tokens * row_bytes + 3 * 8
    assert metrics.bootstrap_s is not None
    assert metrics.transfer_s is not None
    assert not metrics.staged


def test_enough_pages_need_no_resume_and_an_empty_last_send_ends_the_room(
    pair: tuple[Sender, Receiver],
) -> None:
    tx, rx = pair
    src, dst = make_pool(8), make_pool(8)
    k, _ = fill(src, [0, 1, 2, 3], 4 * PS, seed=2)
    tx.add(5)
    rx.open(5, tx.address, pool=dst, pages=[7, 6, 5, 4])
    wait_until(lambda: rx.poll(5) is S.WaitingForInput, what="the bootstrap")
    tx.send(5, pages=[0, 1], pool=src, is_last=False)
    tx.send(5, pages=[2, 3], pool=src, is_last=False)
    time.sleep(0.2)
    assert rx.poll(5) is S.WaitingForInput  # the data is there, but it is not complete
    tx.send(5, pages=[], pool=src, is_last=True)  # 13: a last call with no pages still ends it
    assert rx.wait(5, 10) is S.Success
    assert statuses(rx, 5) == ["WaitingForInput", "Success"]
    assert same(dst.gather(0, [7, 6, 5, 4]), k)


def test_a_sender_pool_on_the_old_receiver_api_and_back(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    src = make_pool(8)
    fill(src, list(range(8)), 100, seed=3)
    single = PagedPool([src.buffers[0]], page_size=PS)  # one buffer: the old API's shape
    tx.add(1)
    tx.send(1, pages=range(7), pool=single, tokens=100)
    rx.open(1, tx.address, row_shape=(2, HIDDEN // 2), dtype=torch.bfloat16, allocated_tokens=40)
    assert rx.wait(1, 10) is S.Success
    assert same(rx.result(1).tensor(), src.buffers[0][:100])
    assert len(rx.result(1).chunks) == 3  # 40 + 40 + 20: a chunk per buffer, as ever


def test_send_checks_its_pages() -> None:
    with Sender("zmq", **FAST) as tx:
        pool, other = make_pool(4), make_pool(4)
        tx.add(1)
        with pytest.raises(InvalidArgument, match="outside a pool of 4 pages"):
            tx.send(1, pages=[4], pool=pool)
        with pytest.raises(InvalidArgument, match="only the last page may be partial"):
            tx.send(1, pages=[0, 1], pool=pool, tokens=10)
        with pytest.raises(InvalidArgument, match="only the last send"):
            tx.send(1, pages=[0], pool=pool, tokens=10, is_last=False)
        with pytest.raises(InvalidArgument, match="aux_index 9"):
            tx.send(1, pages=[0], pool=pool, aux_index=9)
        with pytest.raises(InvalidArgument, match="unless exactly one pool is registered"):
            tx.send(1, pages=[0])
        tx.send(1, pages=[0], pool=pool, is_last=False)
        with pytest.raises(InvalidArgument, match="the same pool"):
            tx.send(1, pages=[1], pool=other)
        tx.send(1, pages=[1], pool=pool, tokens=3)
        with pytest.raises(IllegalTransition, match="already has all its data"):
            tx.send(1, pages=[2], pool=pool)
        assert tx.poll(1) is S.Bootstrapping  # nothing above changed the room


def test_open_and_resume_check_their_pages(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    pool = make_pool(4)
    with pytest.raises(InvalidArgument, match="outside a pool"):
        rx.open(1, tx.address, pool=pool, pages=[9])
    with pytest.raises(InvalidArgument, match="at least one page"):
        rx.open(1, tx.address, pool=pool, pages=[])
    with pytest.raises(InvalidArgument, match="aux_index"):
        rx.open(1, tx.address, pool=pool, pages=[0], aux_index=4)
    rx.open(1, tx.address, pool=pool, pages=[0])
    with pytest.raises(IllegalTransition, match="memory is full"):
        rx.resume(1, pages=[1])  # Bootstrapping, and memory left
    src = make_pool(4)
    fill(src, [0, 1], 2 * PS, seed=4)
    tx.add(1)
    tx.send(1, pages=[0, 1], pool=src)
    wait_until(lambda: rx.poll(1) is S.Transferring, what="the first page")
    with pytest.raises(InvalidArgument, match="resumes with pages"):
        rx.resume(1, buffer=torch.zeros(16, 2, HIDDEN // 2, dtype=torch.bfloat16))
    with pytest.raises(InvalidArgument, match="outside a pool"):
        rx.resume(1, pages=[4])
    rx.resume(1, pages=[3])
    assert rx.wait(1, 10) is S.Success


def test_a_layout_mismatch_fails_with_both_layouts_named(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    src = make_pool(2)
    dst = PagedPool([torch.zeros(2 * PS, 8)], page_size=PS)
    tx.add(1)
    tx.send(1, pages=[0], pool=src)
    rx.open(1, tx.address, pool=dst, pages=[0])
    assert tx.wait(1, 10) is S.Failed
    assert "offers 1 buffers per page; the data has 2" in (tx.info(1).reason or "")
    assert rx.wait(1, 10) is S.Failed


def test_pages_of_several_destinations_and_differing_page_sizes() -> None:
    tx = Sender("zmq", **FAST)
    ranks = [Receiver("zmq", **FAST) for _ in range(2)]
    try:
        src = make_pool(20)
        k, _ = fill(src, list(range(20)), 300, seed=5)
        big = PagedPool.allocate(
            num_pages=160,
            page_size=2,  # another page size: rooms move tokens, not pages
            buffers=[((2, HIDDEN // 2), torch.bfloat16), ((4,), torch.int32)],
            aux=[(4, (3,), torch.int64)],
            transport="zmq",
        )
        small = make_pool(5)
        tx.add(1, required_destinations=2)
        tx.send(1, pages=range(19), pool=src, tokens=300)
        ranks[0].open(1, tx.address, pool=big, pages=range(160), rank=0)  # all 320 tokens
        ranks[1].open(1, tx.address, pool=small, pages=range(5), rank=1)  # 80 at a time
        taken: list[torch.Tensor] = []
        while ranks[1].poll(1) is not S.Success:
            assert ranks[1].poll(1) is not S.Failed, ranks[1].info(1).reason
            info = ranks[1].info(1)
            if info.status is S.Transferring and info.sent_tokens == 80 * (len(taken) + 1):
                taken.append(small.gather(0, range(5)))
                ranks[1].resume(1, pages=range(5))
            time.sleep(0.001)
        taken.append(small.gather(0, range(5), 300 - 80 * len(taken)))
        assert same(torch.cat(taken), k)
        assert ranks[0].wait(1, 10) is S.Success
        assert same(big.gather(0, range(150)), k)
        assert tx.wait(1, 10) is S.Success
    finally:
        tx.close()
        for rx in ranks:
            rx.close()


def test_staging_through_host_memory_is_exact_and_reported(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    src, dst = make_pool(4, stage=True), make_pool(4, stage=True)
    k, ids = fill(src, [0, 1, 2], 40, seed=6)
    src.aux[0][0] = torch.tensor([1, 2, 3])
    tx.add(1)
    tx.send(1, pages=[0, 1, 2], pool=src, tokens=40, aux_index=0)
    rx.open(1, tx.address, pool=dst, pages=[3, 2, 1], aux_index=3)
    assert rx.wait(1, 10) is S.Success
    assert same(dst.gather(0, [3, 2, 1], 40), k)
    assert same(dst.gather(1, [3, 2, 1], 40), ids)
    assert dst.aux[0][3].tolist() == [1, 2, 3]
    assert rx.info(1).metrics.staged
    assert tx.info(1).metrics.staged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here: device pools untested")
def test_gpu_pools_move_directly_or_staged(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    shape = {"page_size": PS, "buffers": [((HIDDEN,), torch.bfloat16)], "memory": "cuda"}
    src = PagedPool.allocate(num_pages=4, **shape)  # type: ignore[arg-type]
    dst = PagedPool.allocate(num_pages=4, **shape)  # type: ignore[arg-type]
    src.buffers[0].copy_(torch.randn(4 * PS, HIDDEN, device="cuda").to(torch.bfloat16))
    tx.add(1)
    tx.send(1, pages=[0, 1], pool=src)
    rx.open(1, tx.address, pool=dst, pages=[2, 3])
    assert rx.wait(1, 20) is S.Success
    assert torch.equal(dst.page_view(0, 2, 2), src.page_view(0, 0, 2))
    assert rx.info(1).metrics.staged  # zmq cannot reach GPU memory: staged, and said so


def test_unregistering_a_pool_fails_its_rooms_only(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    a, b = make_pool(2), make_pool(2)
    rx.open(1, tx.address, pool=a, pages=[0])
    rx.open(2, tx.address, pool=b, pages=[0])
    rx.unregister(a)
    assert rx.poll(1) is S.Failed
    assert "unregistered" in (rx.info(1).reason or "")
    assert rx.poll(2) is S.Bootstrapping
    with pytest.raises(InvalidArgument, match="not registered"):
        rx.unregister(a)


def test_the_aux_row_can_travel_with_the_first_chunk(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    src, dst = make_pool(8), make_pool(8)
    fill(src, list(range(4)), 4 * PS, seed=7)
    src.aux[0][3] = torch.tensor([4, 5, 6])
    tx.add(1, aux_with="first")
    tx.send(1, pages=[0, 1, 2, 3], pool=src, aux_index=3)
    rx.open(1, tx.address, pool=dst, pages=[5, 6], aux_index=0)  # half of the data
    wait_until(lambda: rx.poll(1) is S.Transferring, what="the first chunk")
    assert dst.aux[0][0].tolist() == [4, 5, 6]  # here with the first chunk already
    rx.resume(1, pages=[7, 4])
    assert rx.wait(1, 10) is S.Success
    with pytest.raises(InvalidArgument, match="aux_with"):
        tx.add(2, aux_with="middle")  # type: ignore[arg-type]


def test_the_one_registered_pool_is_the_default(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    src, dst = make_pool(4), make_pool(4)
    k, _ = fill(src, [0, 1], 2 * PS, seed=8)
    tx.add(1)
    with pytest.raises(InvalidArgument, match="unless exactly one pool is registered"):
        tx.send(1, pages=[0, 1])
    tx.register(src)
    rx.register(dst)
    tx.register(src)  # again: nothing happens
    tx.send(1, src, pages=[0], is_last=False)  # the pool may come second, positionally
    tx.send(1, pages=[1])
    rx.open(1, tx.address, pages=[2, 3])
    assert rx.wait(1, 10) is S.Success
    assert same(dst.gather(0, [2, 3]), k)
    info = rx.info(1)
    assert info.bytes_moved == info.metrics.bytes_moved > 0
    assert info.bootstrap_s is not None
    assert info.transfer_s is not None
    assert not info.staged
    rx.register(make_pool(2))
    with pytest.raises(InvalidArgument, match="2 are"):
        rx.open(2, tx.address, pages=[0])
    with pytest.raises(InvalidArgument, match="register\\(\\) takes a PagedPool"):
        rx.register(torch.zeros(3))  # type: ignore[arg-type]


def test_an_error_escaping_the_write_path_fails_the_room_at_once() -> None:
    from collections.abc import Sequence

    from kvpoll.transports.base import Span
    from kvpoll.transports.zmq_transport import ZmqTransport

    class Faulty(ZmqTransport):  # fault injection: a transport with a bug in its write path
        def write_batch(self, spans: Sequence[Span], notice: bytes | None = None) -> int:
            raise ValueError("a bad size in a descriptor")

    with Sender(Faulty(), **FAST) as tx, Receiver("zmq", **FAST) as rx:
        src, dst = make_pool(2), make_pool(2)
        tx.add(1)
        tx.send(1, pages=[0], pool=src)
        rx.open(1, tx.address, pool=dst, pages=[1])
        assert tx.wait(1, 5) is S.Failed  # at once, not after a 300 s time-out
        assert "internal error" in (tx.info(1).reason or "")
        assert rx.wait(1, 5) is S.Failed
        assert tx.stats["internal_errors"] == 1


def test_closing_a_receiver_gives_back_its_shared_memory(pair: tuple[Sender, Receiver]) -> None:
    from tests.helpers import own_memfds

    tx, _ = pair
    before = set(own_memfds().values())
    rx = Receiver("zmq", **FAST)
    payload = torch.randn(100, 8)
    tx.add(1)
    tx.send(1, payload)
    rx.open(1, tx.address, row_shape=(8,), dtype=torch.float32, allocated_tokens=64)
    assert rx.wait(1, 10) is S.Success
    view = rx.result(1).chunks[0]
    assert set(own_memfds().values()) - before  # an arena in shared memory
    rx.close()
    assert set(own_memfds().values()) <= before  # its descriptor is gone ...
    assert torch.equal(view, payload[:64])  # ... and the view still reads its data


def test_a_sender_that_forgot_a_pool_gets_it_offered_again() -> None:
    from kvpoll.protocol.messages import Bootstrap, PoolOffer, Reject
    from tests.helpers import ScriptedPeer

    peer = ScriptedPeer()  # a sender that restarted on the same address
    rx = Receiver("zmq", **FAST)
    try:
        pool = make_pool(4)
        rx.open(1, peer.address, pool=pool, pages=[0])
        assert peer.receive(PoolOffer).pool == pool.id
        boot = peer.receive(Bootstrap)
        peer.send(
            rx.address,
            Reject(room=1, session=boot.session, reason="pool never offered", unknown_pool=True),
        )
        assert rx.wait(1, 5) is S.Failed
        rx.open(2, peer.address, pool=pool, pages=[1])
        assert peer.receive(PoolOffer).pool == pool.id  # offered again before the bootstrap
        assert peer.receive(Bootstrap).room == 2
    finally:
        rx.close()
        peer.close()
