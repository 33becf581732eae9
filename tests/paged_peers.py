"""Peer processes for the paged-room tests (run with multiprocessing's spawn)."""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from typing import Any

import torch

PS = 16
HIDDEN = 8


def pool_of(pages: int, transport: str = "zmq", *, single: bool = False) -> Any:
    """Two buffers per token and an aux buffer (one buffer alone with ``single``:
    the shape the contiguous-buffer API receives)."""
    from kvpoll import PagedPool

    buffers: list[Any] = [((HIDDEN,), torch.float32)]
    if not single:
        buffers.append(((2,), torch.int32))
    return PagedPool.allocate(
        num_pages=pages,
        page_size=PS,
        buffers=buffers,
        aux=[] if single else [(2, (2,), torch.int64)],
        transport=transport,
    )


def room_data(room: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(room)
    return (
        torch.randn(tokens, HIDDEN, generator=gen),
        torch.randint(0, 1000, (tokens, 2), generator=gen, dtype=torch.int32),
    )


def streaming_sender(
    transport: str, rooms: dict[int, int], info: Any, pause: float, single: bool = False
) -> None:
    """Stream each room's pages in pieces of 3 pages, ``pause`` s apart, then serve."""
    from kvpoll import Sender

    tx = Sender(transport, heartbeat_interval=0.2)
    pool = pool_of(sum(-(-t // PS) for t in rooms.values()) + 1, transport, single=single)
    info.put(tx.address)
    next_page = 0
    plans = {}
    for room, tokens in rooms.items():
        count = -(-tokens // PS)
        pages = list(range(next_page, next_page + count))[::-1]  # descending: one page per run
        next_page += count
        k, ids = room_data(room, tokens)
        for i, page in enumerate(pages):
            n = min(PS, tokens - i * PS)
            pool.buffers[0][page * PS : page * PS + n] = k[i * PS : i * PS + n]
            if not single:
                pool.buffers[1][page * PS : page * PS + n] = ids[i * PS : i * PS + n]
        tx.add(room)
        plans[room] = (pages, tokens)
    for start in range(0, max(len(p) for p, _ in plans.values()), 3):
        for room, (pages, tokens) in plans.items():
            piece = pages[start : start + 3]
            if not piece:
                continue
            last = start + 3 >= len(pages)
            tx.send(
                room,
                pages=piece,
                pool=pool,
                is_last=last,
                tokens=tokens - start * PS if last else None,
            )
        time.sleep(pause)
    time.sleep(600)


def many_rooms_sender(transport: str, count: int, info: Any) -> None:
    """One page per room: room r's data is its page r of one pool."""
    from kvpoll import Sender

    tx = Sender(transport, heartbeat_interval=1.0)
    pool = pool_of(count, transport)
    pool.buffers[0].copy_(torch.arange(count * PS * HIDDEN, dtype=torch.float32).view(-1, HIDDEN))
    info.put(tx.address)
    while True:
        first, n = info_get(info)
        for room in range(first, first + n):
            tx.add(room)
            tx.send(room, pages=[room], pool=pool)


def info_get(queue: Any) -> Any:
    return queue.get(timeout=600)


def views_after_everything(transport: str, out: Any) -> None:
    """Hold views of received data, then abort, kill the sender, remove and close;
    read every view after each step. Exits 0 only if nothing crashed."""
    import multiprocessing as mp

    from kvpoll import Receiver
    from kvpoll import TransferStatus as S

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    rooms = {1: 40, 2: 200, 3: 200}
    sender = ctx.Process(target=streaming_sender, args=(transport, rooms, queue, 0.0, True))
    sender.start()
    address = queue.get(timeout=120)
    rx = Receiver(transport, heartbeat_interval=0.2)
    pool = pool_of(4, transport, single=True)
    views: list[torch.Tensor] = []
    total = 0.0

    def read_all() -> float:
        return float(sum(float(v.float().sum()) for v in views))

    rx.open(1, address, row_shape=(HIDDEN,), dtype=torch.float32, allocated_tokens=64)
    rx.open(
        2, address, row_shape=(HIDDEN,), dtype=torch.float32, allocated_tokens=64, auto_resume=False
    )
    rx.open(3, address, pool=pool, pages=[0, 1])
    assert rx.wait(1, 30) is S.Success
    views += list(rx.result(1).chunks)
    deadline = time.monotonic() + 30
    while rx.poll(2) is not S.Transferring or rx.poll(3) is not S.Transferring:
        assert time.monotonic() < deadline, (rx.poll(2), rx.poll(3))
        time.sleep(0.01)
    views += list(rx.chunks(2)) + list(rx.chunks(3)) + [pool.buffers[0]]
    total += read_all()
    rx.remove(1)  # removed: its memory may be reused, but stays readable
    total += read_all()
    rx.abort(2, "the application gave up")
    total += read_all()
    sender.kill()  # room 3 fails when the heartbeats stop
    sender.join(10)
    assert rx.wait(3, 30) is S.Failed
    total += read_all()
    rx.close()
    total += read_all()
    del pool
    total += read_all()
    out.put(("ok", total, len(views)))


def hostile_receiver(sender: str, rooms: dict[str, int], info: Any) -> None:
    """Offer memory a sender must refuse to write, one trick per room."""
    from kvpoll.memory.shm import boot_id
    from kvpoll.protocol.messages import Bootstrap, PoolBuffer, PoolOffer, encode
    from kvpoll.transports.base import RegionDescriptor
    from kvpoll.transports.zmq_transport import ZmqTransport

    peer = ZmqTransport()
    me = peer.address
    rows, row_bytes = 64, HIDDEN * 4
    keep: list[Any] = []
    tmp = tempfile.mkdtemp()
    target = os.path.join(tmp, "secret")
    with open(target, "wb") as f:
        f.write(b"\0" * rows * row_bytes)
    os.chmod(target, 0o600)
    link = os.path.join(tmp, "kvpoll-link")
    os.symlink(target, link)

    def shm_extra(fd: int, size: int) -> dict[str, Any]:
        return {
            "shm_pid": os.getpid(),
            "shm_fd": fd,
            "shm_inode": os.fstat(fd).st_ino,
            "shm_size": size,
            "shm_offset": 0,
            "shm_stamped": False,
            "boot_id": boot_id(),
        }

    def offer(pool: int, extra: dict[str, Any], nbytes: int, endpoint: str = me) -> None:
        region = RegionDescriptor(
            transport="zmq", endpoint=endpoint, region_id=pool + 1, nbytes=nbytes, extra=extra
        )
        buffer = PoolBuffer(region=region, row_bytes=row_bytes, dtype="float32", row_shape=[HIDDEN])
        message = PoolOffer(pool=pool, page_size=1, num_pages=rows, buffers=[buffer])
        peer.send(sender, encode(message))

    # a symlink to a private file: its fd is not kvpoll memory
    fd = os.open(link, os.O_RDWR)
    keep.append(fd)
    offer(1, shm_extra(fd, rows * row_bytes), rows * row_bytes)
    # an unsealed memfd, truncated after it was described
    loose = os.memfd_create("kvpoll", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.fchmod(loose, 0o600)
    os.ftruncate(loose, rows * row_bytes)
    keep.append(loose)
    offer(2, shm_extra(loose, rows * row_bytes), rows * row_bytes)
    os.ftruncate(loose, 0)
    # a sealed memfd smaller than the region it claims (a forged size)
    small = os.memfd_create("kvpoll", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.fchmod(small, 0o600)
    os.ftruncate(small, 1024)
    fcntl.fcntl(small, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    keep.append(small)
    offer(3, shm_extra(small, 1024), rows * row_bytes)
    # memory of another endpoint (not the peer's own): the offer is dropped
    offer(4, {}, rows * row_bytes, endpoint="tcp://127.0.0.1:9")
    for trick, room in rooms.items():
        pool = {"symlink": 1, "truncated": 2, "forged-size": 3, "not-its-memory": 4}.get(trick, 3)
        pages = [(rows - 2, 4)] if trick == "out-of-bounds" else [(0, rows)]
        peer.send(
            sender,
            encode(Bootstrap(room=room, session=room, pool=pool, pages=pages, host=boot_id())),
        )
    info.put((me, target))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        peer.progress(0.05)


def out_of_descriptors(out: Any) -> None:
    """Open rooms until the file descriptor limit is hit: a typed error, nothing
    else harmed, and rooms work again once descriptors are free."""
    import resource

    from kvpoll import Receiver, ResourceExhausted, Sender
    from kvpoll import TransferStatus as S

    tx, rx = Sender("zmq"), Receiver("zmq")
    data = torch.arange(64 * 8, dtype=torch.float32).view(64, 8)
    tx.add(0)
    tx.send(0, data)
    rx.open(0, tx.address, row_shape=(8,), dtype=torch.float32, allocated_tokens=64)
    assert rx.wait(0, 30) is S.Success
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 6, hard))
    error = None
    opened = []
    for room in range(1, 40):  # each needs an arena of its own (rows of 1 MiB x 80)
        try:
            rx.open(room, tx.address, row_shape=(1 << 20,), dtype=torch.uint8, allocated_tokens=80)
            opened.append(room)
        except ResourceExhausted as exc:
            error = str(exc)
            break
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert error is not None, "the descriptor limit was never hit"
    assert rx.poll(0) is S.Success  # nothing else was touched
    for room in opened:
        rx.remove(room)
    tx.add(99)
    tx.send(99, data)
    rx.open(99, tx.address, row_shape=(8,), dtype=torch.float32, allocated_tokens=64)
    assert rx.wait(99, 30) is S.Success
    assert torch.equal(rx.result(99).tensor(), data)
    rx.close()
    tx.close()
    out.put(("ok", error, len(opened)))
