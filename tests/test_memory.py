"""The memory model's parts: page runs, pools, arenas, and shared memory that peers attach."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
from typing import Any

import pytest
import torch

from kvpoll import InvalidArgument
from kvpoll.memory import PagedPool, PageList, as_runs, pair_runs
from kvpoll.memory.arena import Arenas
from kvpoll.memory.shm import Attachments, Segment, SegmentError, SegmentInfo, find_shared


# -- page runs ---------------------------------------------------------------------------
def test_pages_merge_into_runs_from_any_sequence() -> None:
    assert as_runs([3, 4, 5, 9, 10, 2]) == [(3, 3), (9, 2), (2, 1)]
    assert as_runs(range(4, 8)) == [(4, 4)]
    assert as_runs(torch.tensor([1, 2], dtype=torch.int32)) == [(1, 2)]
    assert as_runs([[0, 2], [2, 3], [9, 1]]) == [(0, 5), (9, 1)]
    assert as_runs([]) == []
    for bad in ([-1], [1.5], ["a"], [True], [(1, 0)], 7):
        with pytest.raises(InvalidArgument):
            as_runs(bad)


def test_page_list_slices_across_runs() -> None:
    pages = PageList([(10, 3), (2, 2), (40, 5)])
    assert len(pages) == 10
    assert pages.slice(0, 10) == [(10, 3), (2, 2), (40, 5)]
    assert pages.slice(2, 6) == [(12, 1), (2, 2), (40, 1)]
    assert pages.slice(5, 5) == []
    with pytest.raises(IndexError):
        pages.slice(3, 11)


def test_runs_pair_up_where_both_sides_are_consecutive() -> None:
    assert pair_runs([(0, 4)], [(10, 2), (20, 2)]) == [(0, 10, 2), (2, 20, 2)]
    assert pair_runs([(0, 2), (2, 2)], [(7, 4)]) == [(0, 7, 4)]  # merged again
    assert pair_runs([(5, 1), (3, 1)], [(0, 2)]) == [(5, 0, 1), (3, 1, 1)]


# -- pools -------------------------------------------------------------------------------
def test_a_pool_checks_its_buffers() -> None:
    k, v = torch.zeros(64, 2, 8), torch.zeros(64, 2, 8)
    pool = PagedPool([k, v], page_size=16, aux=[torch.zeros(4, 3, dtype=torch.int64)])
    assert (pool.num_pages, pool.page_size, pool.aux_rows) == (4, 16, 4)
    assert pool.layouts[0].row_bytes == 2 * 8 * 4
    assert pool.check_pages([3, 0]) == [(3, 1), (0, 1)]
    with pytest.raises(InvalidArgument, match="outside a pool of 4 pages"):
        pool.check_pages([4])
    with pytest.raises(InvalidArgument, match="whole number of pages"):
        PagedPool([torch.zeros(60, 8)], page_size=16)
    with pytest.raises(InvalidArgument, match="same number of tokens"):
        PagedPool([torch.zeros(64, 8), torch.zeros(32, 8)], page_size=16)
    with pytest.raises(InvalidArgument, match="contiguous"):
        PagedPool([torch.zeros(8, 64).t()], page_size=16)
    with pytest.raises(InvalidArgument, match="page_size"):
        PagedPool([k], page_size=0)
    with pytest.raises(InvalidArgument, match="at least one buffer"):
        PagedPool([], page_size=1)


def test_allocated_pools_live_where_the_transport_reaches_them() -> None:
    spec: Any = {
        "num_pages": 8,
        "page_size": 4,
        "buffers": [((16,), torch.bfloat16), ((3,), torch.int32)],
    }
    shm = PagedPool.allocate(**spec, aux=[(2, (5,), torch.int64)], transport="zmq")
    host = PagedPool.allocate(**spec, transport="ucx")
    try:
        assert shm.segment is not None
        assert host.segment is None
        for tensor in (*shm.buffers, *shm.aux):
            found = find_shared(tensor.data_ptr(), tensor.numel() * tensor.element_size())
            assert found is not None
            assert found[0] is shm.segment
        assert find_shared(host.buffers[0].data_ptr(), 1) is None
        assert shm.buffers[0].shape == (32, 16)
        assert shm.aux[0].shape == (2, 5)
        shm.buffers[0][5] = 1.5
        assert torch.equal(shm.gather(0, [1], 2)[1], shm.buffers[0][5])
    finally:
        shm.close()
        host.close()
    with pytest.raises(InvalidArgument, match="memory must be"):
        PagedPool.allocate(**spec, memory="floppy")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgument, match="needs a GPU"):
            PagedPool.allocate(**spec, memory="cuda")


def test_arenas_reuse_runs_and_quarantine_failed_ones() -> None:
    arenas = Arenas("shm", arena_bytes=1 << 16, quarantine=0.05)
    try:
        a, new_a = arenas.take((8,), torch.float32, 100)
        b, new_b = arenas.take((8,), torch.float32, 100)
        assert new_a
        assert not new_b
        assert a.pool is b.pool
        assert b.start == 100
        arenas.give(b)
        c, _ = arenas.take((8,), torch.float32, 100)
        assert c.start == b.start  # the same run, reused
        assert arenas.give(c, quarantine=True) == []
        d, _ = arenas.take((8,), torch.float32, 100)
        assert d.start != c.start  # quarantined: not handed on
        import time

        time.sleep(0.06)
        arenas.tick(time.monotonic())
        e, _ = arenas.take((8,), torch.float32, 100)
        assert e.start == c.start
        big, new = arenas.take((8,), torch.float32, 10_000)  # bigger than an arena
        assert new
        assert big.pool.num_pages >= 10_000
    finally:
        arenas.close()


# -- shared memory -----------------------------------------------------------------------
def test_a_peer_writes_into_a_segment_through_its_checked_descriptor() -> None:
    segment = Segment.create(1 << 16)
    try:
        info = segment.info
        code = (
            "import sys; from kvpoll.memory.shm import Segment, SegmentInfo\n"
            f"s = Segment.attach(SegmentInfo({info.pid}, {info.fd}, {info.inode}, {info.size}))\n"
            "s.data[:4] = 7\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        assert segment.data[:4].tolist() == [7, 7, 7, 7]
        fd = os.open(f"/proc/self/fd/{info.fd}", os.O_RDWR)
        try:
            with pytest.raises(PermissionError):  # sealed: nobody can shrink it (no SIGBUS)
                os.ftruncate(fd, 10)
        finally:
            os.close(fd)
    finally:
        segment.close()


def _refused(info: SegmentInfo, match: str) -> None:
    with pytest.raises(SegmentError, match=match):
        Segment.attach(info)


def test_attaching_refuses_anything_but_a_sealed_kvpoll_segment() -> None:
    pid = os.getpid()
    segment = Segment.create(4096)
    try:
        i = segment.info
        _refused(SegmentInfo(pid, i.fd, i.inode + 1, i.size), "another file")
        _refused(SegmentInfo(pid, i.fd, i.inode, i.size * 2), "not the 8192 announced")
        _refused(SegmentInfo(pid, 999_999, i.inode, i.size), "gone")
        # a regular file, and a symlink to it: not kvpoll memory, never opened
        with tempfile.NamedTemporaryFile() as plain:
            link = plain.name + ".link"
            os.symlink(plain.name, link)
            try:
                fd = os.open(link, os.O_RDONLY)
                try:
                    _refused(
                        SegmentInfo(pid, fd, os.fstat(fd).st_ino, 0), "not kvpoll shared memory"
                    )
                finally:
                    os.close(fd)
            finally:
                os.unlink(link)
        # an unsealed memfd (could be truncated under a writer): refused
        loose = os.memfd_create("kvpoll", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.fchmod(loose, 0o600)
            os.ftruncate(loose, 4096)
            _refused(SegmentInfo(pid, loose, os.fstat(loose).st_ino, 4096), "not sealed")
            fcntl.fcntl(loose, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            os.fchmod(loose, 0o644)
            _refused(SegmentInfo(pid, loose, os.fstat(loose).st_ino, 4096), "lets others in")
        finally:
            os.close(loose)
        with pytest.raises(SegmentError, match="must be an int"):
            SegmentInfo(pid, -1, 1, 1)
    finally:
        segment.close()


def test_attachments_are_bounded_and_views_outlive_every_close() -> None:
    segments = [Segment.create(4096) for _ in range(5)]
    attachments = Attachments(limit=2)
    try:
        for segment in segments:
            attachments.get(segment.info)
        assert len(attachments) == 2
        view = segments[0].data[100:200]
        view.fill_(3)
        for segment in segments:
            segment.close()
        attachments.close()
        assert int(view.sum()) == 300  # still mapped: the view holds the memory
    finally:
        for segment in segments:
            segment.close()
