"""Each transport passes the transport test kit; plus what is particular to each."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from kvpoll.testing import check_transport, pump, wait_for_write
from kvpoll.transports import (
    MessageReceived,
    TransportError,
    TransportUnavailable,
    WriteDone,
    available,
    create,
    resolve,
)
from kvpoll.transports.loopback import LoopbackTransport
from kvpoll.transports.zmq_transport import ZmqTransport
from tests.helpers import own_memfds, raw_dealer


def test_loopback_passes_the_kit() -> None:
    check_transport(lambda: (LoopbackTransport(), LoopbackTransport()))


def test_zmq_shared_memory_passes_the_kit() -> None:
    check_transport(lambda: (ZmqTransport(write_timeout=5), ZmqTransport(write_timeout=5)))


def test_zmq_tcp_passes_the_kit() -> None:
    check_transport(
        lambda: (
            ZmqTransport(shm=False, write_timeout=5, max_frame=1 << 20),
            ZmqTransport(shm=False, write_timeout=5, max_frame=1 << 20),
        )
    )


def shm_files() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"kvpoll-{os.getpid()}-")}


def test_zmq_uses_shared_memory_on_one_host_and_tcp_when_told() -> None:
    for shm, path in ((True, "shm_writes"), (False, "tcp_writes")):
        a, b = ZmqTransport(shm=shm), ZmqTransport(shm=shm)
        try:
            src = a.register(torch.arange(64, dtype=torch.uint8))
            dst = b.allocate(64)
            assert wait_for_write(a, b, a.write(src, 0, dst.descriptor, 0, 64)).ok
            assert a.stats[path] == 1
            assert sum(a.stats[k] for k in ("shm_writes", "tcp_writes")) == 1
        finally:
            a.close()
            b.close()


def test_segments_are_owner_only_pooled_and_unlinked() -> None:
    # Segments are sealed memfds: nothing in /dev/shm, freed by the kernel with the process.
    before, files = own_memfds(), shm_files()
    t = ZmqTransport()
    try:
        region = t.allocate(100_000)
        (inode,) = set(own_memfds().values()) - set(before.values())
        fd = next(fd for fd, ino in own_memfds().items() if ino == inode)
        assert os.stat(f"/proc/self/fd/{fd}").st_mode & 0o777 == 0o600
        t.release(region)
        again = t.allocate(90_000)
        assert set(own_memfds().values()) - set(before.values()) == {inode}  # reused
        t.release(again, reuse=False)
        assert set(own_memfds().values()) == set(before.values())  # discarded at once
        t.allocate(10)
    finally:
        t.close()
    assert own_memfds() == before
    assert shm_files() == files


def test_zmq_tcp_write_goes_straight_into_the_region_in_pieces() -> None:
    a = ZmqTransport(shm=False, max_frame=4096)
    b = ZmqTransport(shm=False)
    try:
        data = torch.randint(0, 256, (100_000,), dtype=torch.uint8)
        src = a.register(data)
        dst = b.register(torch.zeros(100_000, dtype=torch.uint8))
        assert wait_for_write(a, b, a.write(src, 0, dst.descriptor, 0, 100_000)).ok
        assert torch.equal(dst.data, data)
    finally:
        a.close()
        b.close()


@pytest.fixture
def rogue() -> Iterator[tuple[ZmqTransport, Any]]:
    """A zmq transport and a raw DEALER socket connected to it (frames of one's own)."""
    import zmq

    t = ZmqTransport()
    ctx = zmq.Context()
    dealer = raw_dealer(ctx, t.address, "tcp://127.0.0.1:1")
    try:
        yield t, dealer
    finally:
        dealer.close()
        ctx.term()
        t.close()


def test_malformed_frames_are_counted_and_never_break_the_endpoint(
    rogue: tuple[ZmqTransport, Any],
) -> None:
    t, dealer = rogue
    dst = t.allocate(16)
    for frames in (
        [b"Z", b"junk"],
        [b"W", b"short"],
        [b"W", b"\0" * 33, b"x"],
        [b"A", b"?"],
        [b"C"],
        [b"C", b"a", b"b"],
        [b"W"],
    ):
        dealer.send_multipart(frames)
    dealer.send_multipart([b"C", b"still alive"])
    events = pump([t], lambda ev: any(isinstance(e, MessageReceived) for e in ev))
    assert [e.payload for e in events if isinstance(e, MessageReceived)] == [b"still alive"]
    assert t.stats["malformed"] >= 5
    assert bool((dst.data == 0).all())


def test_many_control_messages_in_one_arrive_whole_or_not_at_all(
    rogue: tuple[ZmqTransport, Any],
) -> None:
    """An M message holds 2 to 128 control messages: each is handed over, in
    order; one with fewer or more is counted malformed and none of it is read."""
    t, dealer = rogue
    too_many = [f"over {i}".encode() for i in range(129)]
    too_long = [bytes(200_000), bytes(100_000), b"past 256 KiB"]
    for frames in ([b"M"], [b"M", b"alone"], [b"M", *too_many], [b"M", *too_long]):
        dealer.send_multipart(frames)
    ok = [f"ok {i}".encode() for i in range(128)]
    dealer.send_multipart([b"M", *ok])
    dealer.send_multipart([b"C", b"still alive"])
    events = pump([t], lambda ev: any(getattr(e, "payload", None) == b"still alive" for e in ev))
    assert [e.payload for e in events if isinstance(e, MessageReceived)] == [*ok, b"still alive"]
    assert t.stats["malformed"] == 4


def test_a_write_notice_from_the_wire_is_handed_over_only_for_a_whole_accepted_write(
    rogue: tuple[ZmqTransport, Any],
) -> None:
    import struct

    t, dealer = rogue

    def write(write_id: int, flags: int, region: int, *extra: bytes) -> list[bytes]:
        head = struct.pack("<QIB", write_id, 1, flags) + struct.pack("<QQQ", region, 0, 4)
        return [b"W", head, b"abcd", *extra]

    dst = t.allocate(16)
    rid = dst.descriptor.region_id
    for frames in (
        write(1, 2, rid, b"not last"),  # a notice flag without the last one
        write(2, 0x80 | 1, rid, b"unknown flag"),
        write(3, 3, rid),  # a notice announced, none held
        write(4, 3, rid ^ 1, b"unknown region"),
        write(5, 3, rid, b"one", b"two"),  # more frames than announced
    ):
        dealer.send_multipart(frames)
    dealer.send_multipart(write(6, 3, rid, b"landed"))
    events = pump([t], lambda ev: any(isinstance(e, MessageReceived) for e in ev))
    assert [e.payload for e in events if isinstance(e, MessageReceived)] == [b"landed"]
    assert bytes(dst.data[:4].tolist()) == b"abcd"
    assert t.stats["malformed"] >= 2
    assert t.stats["rejected_writes"] >= 3


def test_transports_are_found_by_name() -> None:
    assert {"loopback", "zmq"} <= set(available())
    assert resolve("zmq") is ZmqTransport
    t = create("loopback")
    assert isinstance(t, LoopbackTransport)
    t.close()
    with pytest.raises(TransportUnavailable, match="unknown transport 'carrier-pigeon'"):
        create("carrier-pigeon")
    with pytest.raises(TransportError, match="bad options"):
        create("zmq", colour="blue")


def test_a_wildcard_bind_needs_an_address_to_advertise() -> None:
    with pytest.raises(TransportError, match="advertise"):
        ZmqTransport(host="0.0.0.0")
    t = ZmqTransport(host="0.0.0.0", advertise="127.0.0.1")
    try:
        assert t.address.startswith("tcp://127.0.0.1:")
    finally:
        t.close()


def test_device_memory_is_refused_with_a_reason() -> None:
    t = ZmqTransport()
    try:
        meta = torch.empty(4, device="meta")
        with pytest.raises(TransportError, match="CPU memory only"):
            t.register(meta)
    finally:
        t.close()


def test_a_missing_system_library_is_named_with_its_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    real = importlib.import_module

    def without_verbs(name: str, *args: object) -> object:
        if name == "kvpoll.transports.mooncake_transport":
            raise ImportError(
                "libibverbs.so.1: cannot open shared object file: No such file or directory"
            )
        return real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib, "import_module", without_verbs)
    with pytest.raises(TransportUnavailable) as info:
        resolve("mooncake")
    message = str(info.value)
    assert "installed but cannot load the system library libibverbs.so.1" in message
    assert "apt-get install libibverbs1" in message
    assert "pip install" not in message


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_large_range_is_copied_by_the_copy_threads_whole_and_in_place(threads: int) -> None:
    """Ranges of 4 MiB and more are cut over ``copy_threads``: the bytes land exactly
    (offsets not page-aligned, a length not a multiple of the parts), neighbours
    untouched; the helper threads are gone after close()."""
    import threading

    from kvpoll.transports.base import Span

    a, b = ZmqTransport(copy_threads=threads), ZmqTransport()
    try:
        gen = torch.Generator().manual_seed(threads)
        src = a.register(torch.randint(0, 256, (9 << 20,), dtype=torch.uint8, generator=gen))
        dst = b.allocate(10 << 20)
        spans = [
            Span(src, 0, dst.descriptor, 0, 4096),  # small: on the I/O thread
            Span(src, 4097, dst.descriptor, 8191, (6 << 20) + 4321),  # large, unaligned
        ]
        done = wait_for_write(a, b, a.write_batch(spans))
        assert done.ok, done.error
        end = 8191 + (6 << 20) + 4321
        assert torch.equal(dst.data[:4096], src.data[:4096])
        assert torch.equal(dst.data[8191:end], src.data[4097 : 4097 + (6 << 20) + 4321])
        assert not dst.data[4096:8191].any()
        assert not dst.data[end:].any()
        helpers = [t for t in threading.enumerate() if t.name.startswith("kvpoll-copy")]
        assert (len(helpers) > 0) == (threads > 1)
    finally:
        a.close()
        b.close()
    for helper in helpers:
        assert not helper.is_alive()


def test_overlapping_memory_is_copied_as_one_memmove() -> None:
    import numpy as np

    t = ZmqTransport(copy_threads=2)
    try:
        for dst, src in (
            (slice(0, 8 << 20), slice(4 << 20, 12 << 20)),
            (slice(4 << 20, 12 << 20), slice(0, 8 << 20)),
        ):
            memory = (np.arange(12 << 20, dtype=np.int64) % 251).astype(np.uint8)
            expected = memory.copy()
            expected[dst] = memory[src].copy()
            t._copy(memory[dst], memory[src])
            assert np.array_equal(memory, expected)
    finally:
        t.close()


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "2"])
def test_copy_threads_must_be_a_positive_int(bad: Any) -> None:
    with pytest.raises(TransportError, match="copy_threads"):
        ZmqTransport(copy_threads=bad)


def test_a_peer_writing_16_mib_messages_is_read_by_the_default_transport() -> None:
    """The default max_frame is 2 MiB, but a receiver still reads a writer whose
    max_frame is the old 16 MiB (its frame limit is max(max_frame, 16 MiB) + 4 MiB)."""
    a, b = ZmqTransport(shm=False, max_frame=16 << 20), ZmqTransport(shm=False)
    try:
        gen = torch.Generator().manual_seed(16)
        src = a.register(torch.randint(0, 256, (16 << 20,), dtype=torch.uint8, generator=gen))
        dst = b.allocate(16 << 20)
        done = wait_for_write(a, b, a.write(src, 0, dst.descriptor, 0, 16 << 20))
        assert done.ok, done.error
        assert torch.equal(dst.data, src.data)
    finally:
        a.close()
        b.close()


def test_unacknowledged_writes_fail_at_their_own_deadlines() -> None:
    """A peer that never answers: each write fails once the write time-out has
    passed since it started, not before, the earlier ones first."""
    with (
        ZmqTransport(shm=False, write_timeout=0.6) as a,
        ZmqTransport(shm=False) as silent,  # never driven: it reads nothing, answers nothing
    ):
        src = a.register(torch.ones(64, dtype=torch.uint8))
        dst = silent.allocate(64)
        started: dict[int, float] = {}
        for _ in range(3):
            started[a.write(src, 0, dst.descriptor, 0, 64)] = time.monotonic()
            a.progress(0)
            time.sleep(0.25)
        failed: dict[int, float] = {}
        deadline = time.monotonic() + 10
        while len(failed) < 3:
            assert time.monotonic() < deadline, failed
            for event in a.progress(0.01):
                if isinstance(event, WriteDone):
                    assert event.error is not None
                    assert "no acknowledgement" in event.error
                    failed[event.write_id] = time.monotonic()
        assert list(failed) == list(started)  # in the order they started
        for write_id, at in failed.items():
            assert at - started[write_id] >= 0.6
            assert at - started[write_id] < 0.6 + 3  # and soon after (a loaded machine)
