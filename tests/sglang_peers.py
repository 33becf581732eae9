"""A prefill or decode scheduler rank of SGLang on the kvpoll backend, driven as
SGLang's scheduler drives it, for tests/test_sglang_backend.py.

    python -m tests.sglang_peers prefill|decode SCENARIO BOOTSTRAP_PORT ROOM

Each side builds SGLang's own ``ServerArgs`` (published as SGLang's process
entry does), loads the plugins (kvpoll's entry point among them), makes its
``KVArgs`` from CPU tensors shaped like a small model's KV pool and SGLang's
real ``MetadataBuffers``, and gets every class through ``get_kv_class``.
It prints one JSON object per line: events, page digests, the outcome.

Scenarios: ``ok`` (the whole request), ``kill`` (the prefill stops after its
first chunk and waits to be killed), ``abort-prefill`` / ``abort-decode`` (that
side aborts once the transfer has started).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch

LAYERS = 4
PAGE_SIZE = 16
HEADS = 2
HEAD_DIM = 8
NUM_PAGES = 64
AUX_ROWS = 8
PREFILL_PAGES = [3, 4, 9, 10, 11]
DECODE_PAGES = [20, 21, 22, 40, 7]
CHUNKS = [2, 3]  # pages per prefill chunk
PREFILL_AUX, DECODE_AUX = 2, 5
STATE_SLOTS = 8
PREFILL_SLOT, DECODE_SLOT = 3, 6  # a mamba-like state: one slot per request
DEADLINE = 30.0


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def kv_pool(seed: int) -> list[Any]:
    """K and V of every layer: [pages, page_size, heads, head_dim] bf16."""
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_PAGES, PAGE_SIZE, HEADS, HEAD_DIM)
    return [torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(2 * LAYERS)]


def digest(buffers: list[Any], pages: list[int]) -> list[list[str]]:
    """sha256 of each page of each buffer, in room order."""
    return [
        [hashlib.sha256(b[p].contiguous().view(torch.uint8).numpy()).hexdigest() for p in pages]
        for b in buffers
    ]


def state_pool(seed: int) -> list[Any]:
    """One state component of two tensors (conv and temporal state), a slot per request."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn((STATE_SLOTS, 24), generator=gen),
        torch.randn((STATE_SLOTS, 40), generator=gen),
    ]


def aux_digest(metadata: Any, row: int) -> list[str]:
    ptrs, _, items = metadata.get_buf_infos()
    return [
        hashlib.sha256(ctypes.string_at(ptr + row * item, item)).hexdigest()
        for ptr, item in zip(ptrs, items, strict=True)
    ]


def setup(mode: str, port: int) -> tuple[Any, Any, Any, Any]:
    from sglang.srt.disaggregation.utils import MetadataBuffers

    from kvpoll.bench.sglang_peer import sglang_rank

    buffers = kv_pool(seed=1 if mode == "prefill" else 2)
    states = state_pool(seed=3 if mode == "prefill" else 4)
    metadata = MetadataBuffers(AUX_ROWS, 16, torch.float32, 16)
    backend, manager, server = sglang_rank(
        mode, "kvpoll", port, buffers, metadata, layers=LAYERS, heads=HEADS, states=[states]
    )
    emit(event="ready", manager=type(manager).__name__)
    return (backend, manager, (buffers, metadata, states), server)


def wait_for(poller: Any, wanted: set[int], what: str) -> int:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        status = int(poller.poll())
        if status in wanted or status == 0:
            return status
        time.sleep(0.005)
    raise SystemExit(f"timed out waiting for {what}")


def failure(poller: Any) -> str:
    try:
        poller.failure_exception()
    except Exception as exc:  # SGLang's KVTransferError is what the scheduler catches
        return f"{type(exc).__name__}: {exc}"
    return "failure_exception() did not raise"


def prefill(scenario: str, port: int, room: int) -> None:
    from sglang.srt.disaggregation.utils import KVClassType, get_kv_class

    backend, manager, (buffers, metadata, states), server = setup("prefill", port)
    metadata.output_ids[PREFILL_AUX, 0] = 4242
    metadata.bootstrap_room[PREFILL_AUX, 0] = room
    emit(
        event="data",
        pages=digest(buffers, PREFILL_PAGES),
        aux=aux_digest(metadata, PREFILL_AUX),
        state=digest(states, [PREFILL_SLOT]),
    )
    sender = get_kv_class(backend, KVClassType.SENDER)(
        mgr=manager, bootstrap_addr=f"127.0.0.1:{port}", bootstrap_room=room
    )
    polls = {int(sender.poll())}
    status = wait_for(sender, {2}, "WaitingForInput")  # the scheduler's bootstrap queue
    polls.add(status)
    before_init = sorted(polls)
    if status == 2:
        sender.init(len(PREFILL_PAGES), PREFILL_AUX)
        start = 0
        for n, count in enumerate(CHUNKS):
            last = start + count == len(PREFILL_PAGES)
            sender.send(
                np.array(PREFILL_PAGES[start : start + count], dtype="int32"),
                state_indices=[np.array([PREFILL_SLOT], dtype="int32")] if last else None,
                num_kv_tokens=None,
                indices_event=None,  # a keyword newer schedulers pass
            )
            start += count
            polls.add(int(sender.poll()))
            if n == 0 and scenario == "kill":
                emit(event="first_chunk_sent")
                time.sleep(DEADLINE)
            if n == 0 and scenario == "abort-decode":
                emit(event="first_chunk_sent")
                if wait_for(sender, {4}, "the decode side's abort") == 0:
                    break
            if n == 0 and scenario == "abort-prefill":
                sender.abort()
                emit(event="aborted")
                break
        status = wait_for(sender, {4}, "Success")
    emit(
        event="done",
        status=status,
        polls=sorted(polls),
        polls_before_init=before_init,
        reason=failure(sender) if status == 0 else None,
        metric=vars(sender.get_transfer_metric()),
    )
    sender.clear()
    time.sleep(0.5 if scenario == "ok" else 2.0)  # let the decode side hear the outcome
    manager.close()
    if server is not None:
        server.close()


def decode(scenario: str, port: int, room: int) -> None:
    from sglang.srt.disaggregation.utils import KVClassType, get_kv_class

    backend, manager, (buffers, metadata, states), _ = setup("decode", port)
    bootstrap_addr = f"127.0.0.1:{port}"
    receiver = get_kv_class(backend, KVClassType.RECEIVER)(
        mgr=manager, bootstrap_addr=bootstrap_addr, bootstrap_room=room
    )
    polls = {int(receiver.poll())}
    deadline = time.monotonic() + DEADLINE
    while not manager.try_ensure_parallel_info(bootstrap_addr):  # the pending queue
        if time.monotonic() > deadline:
            raise SystemExit("prefill never registered")
        time.sleep(0.1)
    receiver.init(0)
    status = wait_for(receiver, {2}, "WaitingForInput")  # the handshake queue
    polls.add(status)
    if status == 2:
        receiver.send_metadata(
            np.array(DECODE_PAGES, dtype="int32"),
            DECODE_AUX,
            [np.array([DECODE_SLOT], dtype="int32")],
        )
        emit(event="opened")
        if scenario == "abort-decode":
            time.sleep(1.0)  # the prefill sends one chunk, then waits for this abort
            receiver.abort()
            emit(event="aborted")
        status = wait_for(receiver, {4}, "Success")  # the transfer queue
        polls.add(status)
    failed_at = time.monotonic()
    emit(
        event="done",
        status=status,
        polls=sorted(polls),
        failed_at=failed_at if status == 0 else None,
        reason=failure(receiver) if status == 0 else None,
        pages=digest(buffers, DECODE_PAGES) if status == 4 else None,
        aux=aux_digest(metadata, DECODE_AUX) if status == 4 else None,
        state=digest(states, [DECODE_SLOT]) if status == 4 else None,
        room_row=int(metadata.bootstrap_room[DECODE_AUX, 0]),
    )
    receiver.clear()
    manager.close()


if __name__ == "__main__":
    os.environ.setdefault("SGLANG_HOST_IP", "127.0.0.1")
    from kvpoll.integrations.sglang import cpu as sglang_stubs

    sglang_stubs.install()
    from sglang.srt.plugins import load_plugins

    load_plugins()  # as every SGLang process does first: kvpoll's entry point among them
    role, scenario, port, room = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    {"prefill": prefill, "decode": decode}[role](scenario, port, room)
