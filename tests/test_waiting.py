"""Waiting for rooms: no limit, any of many, each as it ends, and the same in asyncio."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from kvpoll import InvalidArgument, Receiver, Sender, TransferStatus, UnknownRoom

S = TransferStatus


def start(tx: Sender, rx: Receiver, room: int, tokens: int = 8) -> torch.Tensor:
    payload = torch.arange(tokens * 4, dtype=torch.float32).reshape(tokens, 4)
    tx.add(room)
    rx.open(room, tx.address, row_shape=(4,), dtype=torch.float32, allocated_tokens=tokens)
    return payload


def later(delay: float, action: object) -> threading.Timer:
    timer = threading.Timer(delay, action)  # type: ignore[arg-type]
    timer.start()
    return timer


def test_wait_without_a_limit_returns_the_final_status(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    payload = start(tx, rx, 1)
    timer = later(0.2, lambda: tx.send(1, payload))
    assert rx.wait(1, timeout=None) is S.Success
    assert rx.wait(1) is S.Success  # the default is no limit too
    timer.join()


def test_wait_zero_looks_once_and_bad_timeouts_are_refused(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    start(tx, rx, 2)
    began = time.monotonic()
    assert not rx.wait(2, 0).is_final
    assert time.monotonic() - began < 1.0
    for bad in (-1, float("nan"), "soon", True):
        with pytest.raises(InvalidArgument, match="timeout"):
            rx.wait(2, bad)  # type: ignore[arg-type]
    with pytest.raises(UnknownRoom):
        rx.wait(99, None)


def test_timeouts_of_zero_mean_no_limit_in_code_too() -> None:
    with Sender("zmq", timeouts={"Bootstrapping": 0, "Transferring": None}) as tx:
        tx.add(5)
        assert tx._deadlines.timeouts.keys() == {S.WaitingForInput}
    with pytest.raises(InvalidArgument, match=">= 0"):
        Sender("zmq", timeouts={"Bootstrapping": -1})


def test_wait_any_returns_the_rooms_that_ended(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    payloads = {room: start(tx, rx, room) for room in (10, 11, 12)}
    assert rx.wait_any([10, 11, 12], timeout=0.05) == {}
    timer = later(0.1, lambda: tx.send(11, payloads[11]))
    assert rx.wait_any([10, 11, 12], timeout=20) == {11: S.Success}
    timer.join()
    rx.abort(12, "not needed")
    assert rx.wait_any((10, 12)) == {12: S.Failed}
    with pytest.raises(InvalidArgument, match="no rooms"):
        rx.wait_any([])


def test_as_completed_in_the_order_rooms_end(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    payloads = {room: start(tx, rx, room) for room in (20, 21, 22)}
    timers = [
        later(0.05, lambda: tx.send(22, payloads[22])),
        later(0.4, lambda: rx.abort(20, "gave up")),
        later(0.8, lambda: tx.send(21, payloads[21])),
    ]
    got = list(rx.as_completed([20, 21, 22], timeout=20))
    assert got == [(22, S.Success), (20, S.Failed), (21, S.Success)]
    for timer in timers:
        timer.join()


def test_as_completed_names_the_rooms_left_when_time_runs_out(
    pair: tuple[Sender, Receiver],
) -> None:
    tx, rx = pair
    payload = start(tx, rx, 30)
    start(tx, rx, 31)
    tx.send(30, payload)
    completion = rx.as_completed([30, 31], timeout=0.5)
    assert next(completion) == (30, S.Success)
    with pytest.raises(TimeoutError, match=r"\[31\]"):
        next(completion)


def test_the_asyncio_api(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    payloads = {room: start(tx, rx, room) for room in (40, 41, 42)}

    async def main() -> list[object]:
        loop = asyncio.get_running_loop()
        ticks = 0

        async def ticker() -> None:  # the event loop keeps running while rooms are awaited
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        beat = asyncio.create_task(ticker())
        loop.call_later(0.2, tx.send, 40, payloads[40])
        first = await rx.wait_async(40, timeout=20)
        timed_out = await rx.wait_async(41, timeout=0.1)
        loop.call_later(0.1, tx.send, 41, payloads[41])
        anyone = await rx.wait_any_async([41, 42], timeout=20)
        loop.call_later(0.1, rx.abort, 42, "enough")
        ended = [pair async for pair in rx.as_completed([40, 42], timeout=20)]
        beat.cancel()
        return [first, timed_out, anyone, ended, ticks]

    first, timed_out, anyone, ended, ticks = asyncio.run(main())
    assert first is S.Success
    assert timed_out is S.WaitingForInput
    assert anyone == {41: S.Success}
    assert ended == [(40, S.Success), (42, S.Failed)]
    assert isinstance(ticks, int)
    assert ticks >= 10


def test_a_room_removed_while_awaited_raises(pair: tuple[Sender, Receiver]) -> None:
    tx, rx = pair
    start(tx, rx, 50)

    async def main() -> None:
        asyncio.get_running_loop().call_later(0.1, rx.remove, 50)
        await rx.wait_async(50, timeout=20)

    began = time.monotonic()
    with pytest.raises(UnknownRoom):
        asyncio.run(main())
    assert time.monotonic() - began < 10


def test_a_resume_buffer_that_holds_an_earlier_chunk_is_refused(
    pair: tuple[Sender, Receiver],
) -> None:
    tx, rx = pair
    payload = torch.arange(12 * 4, dtype=torch.float32).reshape(12, 4)
    mine = torch.zeros(4, 4)
    tx.add(60)
    rx.open(60, tx.address, row_shape=(4,), dtype=torch.float32, buffer=mine, auto_resume=False)
    tx.send(60, payload)
    deadline = time.monotonic() + 20
    while rx.info(60).sent_tokens < 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for reused in (mine, mine[2:], mine.view(-1)[4:12].view(2, 4)):
        with pytest.raises(InvalidArgument, match="shares memory with the buffer of tokens 0"):
            rx.resume(60, buffer=reused)
    assert rx.poll(60) is S.Transferring  # refused: nothing changed
    second = torch.zeros(4, 4)
    rx.resume(60, buffer=second)
    while rx.info(60).sent_tokens < 8:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(InvalidArgument, match="tokens 4"):
        rx.resume(60, buffer=second)
    rx.resume(60)  # kvpoll's own buffer
    assert rx.wait(60, 20) is S.Success
    assert torch.equal(rx.result(60).tensor(), payload)  # no chunk was overwritten
