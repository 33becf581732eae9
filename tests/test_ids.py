"""Random ids are read from the OS's generator in blocks: still unique, in range, and
never repeated by a forked child."""

from __future__ import annotations

import os

import pytest

from kvpoll.ids import random_bits


def test_ids_are_in_range_and_distinct() -> None:
    ids = [random_bits(62) for _ in range(5000)]  # more than one block
    assert all(0 <= i < 2**62 for i in ids)
    assert len(set(ids)) == len(ids)
    assert max(ids) >= 2**61  # the top bit is used
    assert {random_bits(1) for _ in range(200)} == {0, 1}


@pytest.mark.parametrize("bits", [0, 65, -1])
def test_a_bad_width_is_refused(bits: int) -> None:
    with pytest.raises(ValueError, match="1 to 64 bits"):
        random_bits(bits)


def test_a_forked_child_does_not_repeat_its_parents_next_ids() -> None:
    random_bits(64)  # the parent has a block in hand
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write, b"".join(random_bits(64).to_bytes(8, "little") for _ in range(4)))
        finally:
            os._exit(0)
    os.close(write)
    try:
        got = b""
        while len(got) < 32:
            part = os.read(read, 32 - len(got))
            if not part:
                break
            got += part
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    child = [int.from_bytes(got[i : i + 8], "little") for i in range(0, 32, 8)]
    parent = [random_bits(64) for _ in range(4)]
    assert len(child) == 4
    assert not set(child) & set(parent)
