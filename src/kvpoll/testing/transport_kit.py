"""``check_transport``: the behaviour every transport must show.

Call it from a transport's own tests with a factory of connected pairs::

    def test_my_transport():
        check_transport(lambda: (MyTransport(), MyTransport()))

Each check gets a fresh pair and closes it. A failed check raises
AssertionError naming the check and what was seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from kvpoll.transports.base import (
    MessageReceived,
    PeerClosed,
    RegionBoundsError,
    Span,
    Transport,
    TransportClosed,
    TransportError,
    TransportEvent,
    WriteDone,
)
from kvpoll.transports.spans import SpanBatch

__all__ = ["check_transport", "pump", "wait_for_write"]

MakePair = Callable[[], tuple[Transport, Transport]]


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def pump(
    transports: Sequence[Transport],
    until: Callable[[list[TransportEvent]], bool],
    timeout: float = 15.0,
) -> list[TransportEvent]:
    """Drive every transport until ``until(events of the first)`` holds.

    Returns the first transport's events. Raises AssertionError on time-out.
    """
    seen: list[TransportEvent] = []
    deadline = time.monotonic() + timeout
    while not until(seen):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s; events so far: {seen[-5:]}")
        seen.extend(transports[0].progress(0.002))
        for other in transports[1:]:
            other.progress(0)
    return seen


def wait_for_write(a: Transport, b: Transport, write_id: int, timeout: float = 15.0) -> WriteDone:
    """Pump ``a`` (the writer) and ``b`` until write ``write_id`` is done."""
    events = pump(
        [a, b],
        lambda ev: any(isinstance(e, WriteDone) and e.write_id == write_id for e in ev),
        timeout,
    )
    done = [e for e in events if isinstance(e, WriteDone) and e.write_id == write_id]
    _expect(len(done) == 1, f"write {write_id} completed {len(done)} times")
    return done[0]


def _random_bytes(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)


def _control_order(a: Transport, b: Transport) -> None:
    payloads = [b"", b"x", *(f"message {i}".encode() for i in range(200)), bytes(100_000)]
    for payload in payloads:
        a.send(b.address, payload)
    got = pump([b, a], lambda ev: sum(isinstance(e, MessageReceived) for e in ev) >= len(payloads))
    messages = [e for e in got if isinstance(e, MessageReceived)]
    _expect(
        [m.payload for m in messages] == payloads,
        "control messages arrived out of order, duplicated or changed",
    )
    _expect(
        {m.peer for m in messages} == {a.address},
        f"messages name their sender {a.address}, not { ({m.peer for m in messages}) }",
    )
    b.send(a.address, b"reply")
    back = pump([a, b], lambda ev: any(isinstance(e, MessageReceived) for e in ev))
    _expect(
        [e.payload for e in back if isinstance(e, MessageReceived)] == [b"reply"],
        "a reply did not come back",
    )


def _sent_together(a: Transport, b: Transport) -> None:
    """``send_many`` delivers each message once, in order, among single sends; the
    notices of several writes started in one turn each come once."""
    many = [f"many {i}".encode() for i in range(300)]
    many[7], many[150] = b"", bytes(300_000)  # an empty one; one larger than a group
    expected = [b"first", *many, b"single", b"last"]
    a.send(b.address, b"first")
    a.send_many(b.address, many)
    a.send_many(b.address, [])
    a.send_many(b.address, [b"single"])
    a.send(b.address, b"last")
    got = pump([b, a], lambda ev: sum(isinstance(e, MessageReceived) for e in ev) >= len(expected))
    messages = [e for e in got if isinstance(e, MessageReceived)]
    _expect(
        [m.payload for m in messages] == expected,
        "messages sent with send_many arrived out of order, duplicated, changed or lost",
    )
    _expect({m.peer for m in messages} == {a.address}, "send_many's messages name another sender")
    if not a.capabilities.notices:
        return
    page = 4096
    src = a.register(_random_bytes(8 * page, 13))
    dst = b.allocate(8 * page)
    ids = [
        a.write_batch([Span(src, i * page, dst.descriptor, i * page, page)], f"n{i}".encode())
        for i in range(8)
    ]
    mine, theirs = _both(
        a,
        b,
        lambda ev: sum(isinstance(e, MessageReceived) for e in ev) >= len(ids),
    )
    mine += _both(a, b, lambda ev: all(_done(mine + ev, w) for w in ids))[0]
    _expect(all(_ok(mine, w) for w in ids), "a write of a turn with several notices failed")
    landed = [e.payload for e in theirs if isinstance(e, MessageReceived)]
    _expect(  # writes in flight together may land in any order
        sorted(landed) == [f"n{i}".encode() for i in range(8)],
        f"the notices of one turn's writes did not each come once: {landed}",
    )
    _expect(torch.equal(dst.data, src.data), "the writes of one turn did not all land")


def _roundtrip(a: Transport, b: Transport) -> None:
    src = a.register(_random_bytes(1 << 20, 1))
    dst = b.allocate(1 << 20)
    done = wait_for_write(a, b, a.write(src, 0, dst.descriptor, 0, 1 << 20))
    _expect(done.ok, f"a write failed: {done.error}")
    _expect(torch.equal(dst.data, src.data), "the destination does not hold the written bytes")


def _offsets(a: Transport, b: Transport) -> None:
    src = a.register(_random_bytes(4096, 2))
    dst = b.allocate(8192)
    dst.data.fill_(7)
    done = wait_for_write(a, b, a.write(src, 100, dst.descriptor, 1000, 200))
    _expect(done.ok, f"an offset write failed: {done.error}")
    _expect(torch.equal(dst.data[1000:1200], src.data[100:300]), "wrong bytes at the offset")
    _expect(
        bool((dst.data[:1000] == 7).all()) and bool((dst.data[1200:] == 7).all()),
        "a write touched bytes outside its range",
    )


def _tiny_and_empty(a: Transport, b: Transport) -> None:
    src = a.register(torch.tensor([42], dtype=torch.uint8))
    dst = b.allocate(1)
    _expect(wait_for_write(a, b, a.write(src, 0, dst.descriptor, 0, 1)).ok, "a 1-byte write failed")
    _expect(int(dst.data[0]) == 42, "a 1-byte write did not arrive")
    _expect(
        wait_for_write(a, b, a.write(src, 0, dst.descriptor, 0, 0)).ok,
        "a zero-byte write did not complete successfully",
    )


def _large(a: Transport, b: Transport, nbytes: int) -> None:
    src = a.register(_random_bytes(nbytes, 3))
    dst = b.allocate(nbytes)
    done = wait_for_write(a, b, a.write(src, 0, dst.descriptor, 0, nbytes), timeout=60)
    _expect(done.ok, f"a {nbytes}-byte write failed: {done.error}")
    _expect(torch.equal(dst.data, src.data), f"a {nbytes}-byte write arrived corrupted")


def _many_in_flight(a: Transport, b: Transport) -> None:
    n, size = 200, 1000
    src = a.register(_random_bytes(n * size, 4))
    dst = b.allocate(n * size)
    ids = {a.write(src, i * size, dst.descriptor, i * size, size) for i in range(n)}
    _expect(len(ids) == n, "write ids are not unique")
    events = pump([a, b], lambda ev: sum(isinstance(e, WriteDone) for e in ev) >= n)
    done = [e for e in events if isinstance(e, WriteDone)]
    _expect(sorted(e.write_id for e in done) == sorted(ids), "each write completes exactly once")
    _expect(all(e.ok for e in done), "a concurrent write failed")
    _expect(torch.equal(dst.data, src.data), "concurrent writes mixed up their bytes")


def _bounds(a: Transport, b: Transport) -> None:
    src = a.register(_random_bytes(1000, 5))
    dst = b.allocate(500)
    dst.data.fill_(9)
    for args in ((0, 0, 501), (0, 100, 401), (900, 0, 101), (-1, 0, 10)):
        try:
            a.write(src, args[0], dst.descriptor, args[1], args[2])
        except RegionBoundsError:
            continue
        raise AssertionError(f"a write outside a region was accepted: {args}")
    forged = dst.descriptor.model_copy(update={"nbytes": 1000})
    done = wait_for_write(a, b, a.write(src, 0, forged, 0, 1000))
    _expect(not done.ok, "the destination accepted a write beyond its region (forged size)")
    _expect(bool((dst.data == 9).all()), "a rejected write changed the destination")


def _unknown_and_released(a: Transport, b: Transport) -> None:
    src = a.register(_random_bytes(100, 6))
    dst = b.allocate(100)
    forged = dst.descriptor.model_copy(update={"region_id": dst.descriptor.region_id ^ 1})
    _expect(
        not wait_for_write(a, b, a.write(src, 0, forged, 0, 100)).ok,
        "a write to an unknown region succeeded",
    )
    descriptor = dst.descriptor
    _expect(wait_for_write(a, b, a.write(src, 0, descriptor, 0, 100)).ok, "a write failed")
    b.release(dst)
    _expect(
        not wait_for_write(a, b, a.write(src, 0, descriptor, 0, 100)).ok,
        "a write to a released region succeeded (after one that was accepted)",
    )
    # its memory handed to a new region: the old descriptor must not reach it
    again = b.allocate(100)
    again.data.fill_(3)
    _expect(
        not wait_for_write(a, b, a.write(src, 0, descriptor, 0, 100)).ok,
        "a write through a released region's descriptor succeeded once its memory was reused",
    )
    _expect(bool((again.data == 3).all()), "a released region's descriptor changed a new region")


def _dtypes(a: Transport, b: Transport) -> None:
    gen = torch.Generator().manual_seed(7)
    tensor = torch.randn(33, 64, generator=gen).to(torch.bfloat16)
    src = a.register(tensor)
    dst = b.allocate(tensor.numel() * tensor.element_size())
    _expect(
        wait_for_write(a, b, a.write(src, 0, dst.descriptor, 0, src.nbytes)).ok,
        "a bf16 write failed",
    )
    got = dst.data.view(torch.bfloat16).reshape(33, 64)
    _expect(torch.equal(got, tensor), "bf16 data did not survive the trip bit for bit")
    try:
        a.register(torch.zeros(8, 8)[:, ::2])
    except TransportError:
        pass
    else:
        raise AssertionError("a non-contiguous tensor was registered")


def _closed_peer(a: Transport, b: Transport) -> None:
    src = a.register(_random_bytes(100, 8))
    dst = b.allocate(100)
    a.send(b.address, b"hello")
    pump([b, a], lambda ev: any(isinstance(e, MessageReceived) for e in ev))
    b.send(a.address, b"hello")
    pump([a, b], lambda ev: any(isinstance(e, MessageReceived) for e in ev))
    b.close()
    b.close()  # idempotent
    events: list[TransportEvent] = []
    deadline = time.monotonic() + 30
    write_id = a.write(src, 0, dst.descriptor, 0, 100)
    while not any(isinstance(e, WriteDone) and e.write_id == write_id for e in events):
        _expect(time.monotonic() < deadline, "a write to a closed peer never completed")
        events.extend(a.progress(0.01))
    done = next(e for e in events if isinstance(e, WriteDone) and e.write_id == write_id)
    _expect(not done.ok, "a write to a closed peer succeeded")
    for call in (lambda: b.allocate(10), lambda: b.send(a.address, b"x"), lambda: b.progress(0)):
        try:
            call()
        except TransportClosed:
            continue
        raise AssertionError("a closed transport still worked")
    _ = [e for e in events if isinstance(e, PeerClosed)]  # allowed, not required


def _batch(a: Transport, b: Transport) -> None:
    """Scattered pages of two buffers into scattered pages of two others: one write."""
    page = 4096
    src = [a.register(_random_bytes(16 * page, 10 + i)) for i in range(2)]
    dst = [b.allocate(16 * page) for _ in range(2)]
    for d in dst:
        d.data.fill_(3)
    moves = [(0, 5, 3), (7, 0, 2), (12, 9, 1)]  # (src page, dst page, pages)
    spans = [
        Span(s, sp * page, d.descriptor, dp * page, n * page)
        for s, d in zip(src, dst, strict=True)
        for sp, dp, n in moves
    ]
    ids_before = {a.write_batch(spans)}
    done = wait_for_write(a, b, next(iter(ids_before)))
    _expect(done.ok, f"a batch failed: {done.error}")
    for s, d in zip(src, dst, strict=True):
        touched = torch.zeros(16 * page, dtype=torch.bool)
        for sp, dp, n in moves:
            _expect(
                torch.equal(
                    d.data[dp * page : (dp + n) * page], s.data[sp * page : (sp + n) * page]
                ),
                f"a batch range (page {sp} -> {dp}) did not arrive",
            )
            touched[dp * page : (dp + n) * page] = True
        _expect(bool((d.data[~touched] == 3).all()), "a batch wrote outside its ranges")
    # A batch with one range outside its region is refused whole, before anything moves.
    for d in dst:
        d.data.fill_(3)
    bad = [*spans[:2], Span(src[0], 0, dst[0].descriptor, 15 * page, 2 * page)]
    try:
        a.write_batch(bad)
    except RegionBoundsError:
        pass
    else:
        raise AssertionError("a batch with a range outside its region was accepted")
    _expect(all(bool((d.data == 3).all()) for d in dst), "a refused batch changed the destination")
    # A forged range (the destination's real size is smaller) fails the whole write.
    forged = dst[1].descriptor.model_copy(update={"nbytes": 32 * page})
    done = wait_for_write(a, b, a.write_batch([spans[0], Span(src[1], 0, forged, 20 * page, page)]))
    _expect(not done.ok, "a batch with a forged range succeeded")
    try:
        a.write_batch([])
    except TransportError:
        pass
    else:
        raise AssertionError("an empty batch was accepted")


def _many_batches(a: Transport, b: Transport) -> None:
    n, page = 50, 512
    src = a.register(_random_bytes(n * 4 * page, 11))
    dst = b.allocate(n * 4 * page)
    ids = set()
    for i in range(n):  # each batch: pages 4i+3, 4i+1 -> 4i, 4i+2 (crossed)
        base = 4 * i * page
        ids.add(
            a.write_batch(
                [
                    Span(src, base + 3 * page, dst.descriptor, base, page),
                    Span(src, base + page, dst.descriptor, base + 2 * page, page),
                ]
            )
        )
    events = pump([a, b], lambda ev: sum(isinstance(e, WriteDone) for e in ev) >= n)
    done = [e for e in events if isinstance(e, WriteDone)]
    _expect(sorted(e.write_id for e in done) == sorted(ids), "each batch completes exactly once")
    _expect(all(e.ok for e in done), "a batch in flight failed")
    for i in range(n):
        base = 4 * i * page
        _expect(
            torch.equal(dst.data[base : base + page], src.data[base + 3 * page : base + 4 * page])
            and torch.equal(
                dst.data[base + 2 * page : base + 3 * page], src.data[base + page : base + 2 * page]
            ),
            f"batch {i} put its bytes in the wrong place",
        )


def _columns(a: Transport, b: Transport) -> None:
    """A SpanBatch (ranges as columns, as the Sender hands over a paged chunk) writes
    what its spans would; one with a range out of bounds is refused whole."""
    page, pages, moved = 512, 128, 96
    src = [a.register(_random_bytes(pages * page, 20 + i)) for i in range(2)]
    dst = [b.allocate(pages * page) for _ in range(2)]
    for d in dst:
        d.data.fill_(7)
    gen = torch.Generator().manual_seed(5)
    src_pages = torch.randperm(pages, generator=gen)[:moved].tolist()
    dst_pages = torch.randperm(pages, generator=gen)[:moved].tolist()
    moves = list(zip(src_pages, dst_pages, strict=True))
    pairs = [(s, d.descriptor) for s, d in zip(src, dst, strict=True)]
    pair = [i for _ in moves for i in range(2)]
    batch = SpanBatch(
        pairs,
        pair,
        [sp * page for sp, _ in moves for _ in range(2)],
        [dp * page for _, dp in moves for _ in range(2)],
        [page] * len(pair),
    )
    _expect(len(batch) == 2 * moved and batch[1].src is src[1], "a SpanBatch is not its spans")
    done = wait_for_write(a, b, a.write_batch(batch))
    _expect(done.ok, f"a SpanBatch write failed: {done.error}")
    for s, d in zip(src, dst, strict=True):
        expected = torch.full((pages * page,), 7, dtype=torch.uint8)
        for sp, dp in moves:
            expected[dp * page : (dp + 1) * page] = s.data[sp * page : (sp + 1) * page]
        _expect(torch.equal(d.data, expected), "a SpanBatch's ranges did not land as spans would")
    for d in dst:
        d.data.fill_(7)
    bad = SpanBatch(pairs, [0, 1], [0, 0], [0, (pages - 1) * page], [page, 2 * page])
    try:
        a.write_batch(bad)
    except RegionBoundsError:
        pass
    else:
        raise AssertionError("a SpanBatch with a range outside its region was accepted")
    _expect(
        all(bool((d.data == 7).all()) for d in dst), "a refused SpanBatch changed the destination"
    )


def _notices_of(events: list[TransportEvent], payload: bytes) -> list[MessageReceived]:
    return [e for e in events if isinstance(e, MessageReceived) and e.payload == payload]


def _both(
    a: Transport, b: Transport, until: Callable[[list[TransportEvent]], bool]
) -> tuple[list[TransportEvent], list[TransportEvent]]:
    """Drive ``a`` and ``b`` until ``until(a's events + b's events)``; each one's events."""
    seen: tuple[list[TransportEvent], list[TransportEvent]] = ([], [])
    deadline = time.monotonic() + 15
    while not until(seen[0] + seen[1]):
        _expect(time.monotonic() < deadline, f"timed out; events so far: {seen}")
        seen[0].extend(a.progress(0.002))
        seen[1].extend(b.progress(0.002))
    return seen


def _done(events: list[TransportEvent], write_id: int) -> WriteDone | None:
    return next((e for e in events if isinstance(e, WriteDone) and e.write_id == write_id), None)


def _ok(events: list[TransportEvent], write_id: int) -> bool:
    done = _done(events, write_id)
    _expect(done is not None, f"write {write_id} did not complete")
    return done is not None and done.ok


def _notices(a: Transport, b: Transport) -> None:
    """A notice reaches the destination once its batch's bytes are there, from the
    writer, once; after what was sent before it; never for a refused write."""
    if not a.capabilities.notices:
        return
    page = 4096
    src = a.register(_random_bytes(64 * page, 12))
    dst = b.allocate(64 * page)
    spans = [
        Span(src, 0, dst.descriptor, 32 * page, 16 * page),
        Span(src, 40 * page, dst.descriptor, 0, 8 * page),
    ]
    a.send(b.address, b"before")
    write_id = a.write_batch(spans, b"landed")
    mine: list[TransportEvent] = []
    seen: list[TransportEvent] = []
    deadline = time.monotonic() + 15
    while not _notices_of(seen, b"landed"):  # look at the memory as soon as it is there
        _expect(time.monotonic() < deadline, "a write's notice never arrived")
        seen.extend(b.progress(0.002))
        mine.extend(a.progress(0))
    _expect(
        torch.equal(dst.data[32 * page : 48 * page], src.data[: 16 * page])
        and torch.equal(dst.data[: 8 * page], src.data[40 * page : 48 * page]),
        "a notice arrived before its write's bytes",
    )
    messages = [e for e in seen if isinstance(e, MessageReceived)]
    _expect(
        [m.payload for m in messages] == [b"before", b"landed"],
        f"a notice did not follow what was sent before it: {[m.payload for m in messages]}",
    )
    _expect(messages[-1].peer == a.address, f"a notice names {messages[-1].peer}, not the writer")
    mine += _both(a, b, lambda ev: _done(mine + ev, write_id) is not None)[0]
    _expect(_ok(mine, write_id), "a write with a notice failed")
    # refused writes (an unknown region, a forged size) deliver no notice; an empty
    # batch delivers its notice once
    forged = dst.descriptor.model_copy(update={"region_id": dst.descriptor.region_id ^ 1})
    grown = dst.descriptor.model_copy(update={"nbytes": 128 * page})
    refused = [
        a.write_batch([Span(src, 0, d, at, page)], b"no")
        for d, at in ((forged, 0), (grown, 64 * page))
    ]
    empty = a.write_batch([Span(src, 0, dst.descriptor, 0, 0)], b"empty")
    ours, theirs = _both(a, b, lambda ev: all(_done(ev, w) for w in (*refused, empty)))
    _expect(not any(_ok(ours, w) for w in refused), "a refused write succeeded")
    _expect(_ok(ours, empty), "an empty write with a notice failed")
    a.send(b.address, b"after")
    more = _both(a, b, lambda ev: bool(_notices_of(ev, b"after")))[1]
    _expect(not _notices_of(theirs + more, b"no"), "a refused write delivered its notice")
    _expect(
        len(_notices_of(theirs + more, b"empty")) == 1, "an empty write's notice did not come once"
    )


def _notice_after_burst(a: Transport, b: Transport) -> None:
    """On a pair that has written and talked both ways (an engine may take another
    path once the two know each other), a notice sent behind a burst of 2,000
    control messages still comes after every one of them."""
    if not a.capabilities.notices:
        return
    src = a.register(_random_bytes(4096, 13))
    dst = b.allocate(4096)
    for _ in range(3):
        _expect(wait_for_write(a, b, a.write(src, 0, dst.descriptor, 0, 4096)).ok, "a write failed")
        for x, y in ((a, b), (b, a)):
            x.send(y.address, b"ping")
            pump([y, x], lambda ev: bool(_notices_of(ev, b"ping")))
    burst = [f"burst {i}".encode() for i in range(2000)]
    for payload in burst:
        a.send(b.address, payload)
    write_id = a.write_batch([Span(src, 0, dst.descriptor, 0, 4096)], b"after the burst")
    time.sleep(0.05)  # whatever overtakes the burst on the wire is at b before b reads any
    theirs, ours = _both(b, a, lambda ev: bool(_notices_of(ev, b"after the burst")))
    got = [e.payload for e in theirs if isinstance(e, MessageReceived)]
    _expect(got == [*burst, b"after the burst"], "a notice overtook messages sent before it")
    ours += _both(a, b, lambda ev: _done(ours + ev, write_id) is not None)[0]
    _expect(_ok(ours, write_id), "the write behind the burst failed")


CHECKS: dict[str, Callable[[Transport, Transport], None]] = {
    "control messages arrive in order": _control_order,
    "messages sent together arrive in order": _sent_together,
    "a write arrives": _roundtrip,
    "writes honour offsets": _offsets,
    "tiny and empty writes": _tiny_and_empty,
    "many writes in flight": _many_in_flight,
    "writes outside a region fail": _bounds,
    "writes to unknown or released regions fail": _unknown_and_released,
    "any dtype, bit for bit": _dtypes,
    "a closed peer fails writes": _closed_peer,
    "a batch of scattered ranges is one write": _batch,
    "many batches in flight": _many_batches,
    "a batch held as columns writes what its spans would": _columns,
    "notices come with the data": _notices,
    "a notice comes after a burst sent before it": _notice_after_burst,
}


def check_transport(make_pair: MakePair, *, large_bytes: int = 64 << 20) -> list[str]:
    """Run every check on fresh pairs from ``make_pair``; return the checks' names.

    Raises:
        AssertionError: a check failed (the message names it).
    """
    checks = dict(CHECKS)
    checks[f"a large write ({large_bytes} bytes)"] = lambda a, b: _large(a, b, large_bytes)
    for name, check in checks.items():
        a, b = make_pair()
        try:
            check(a, b)
        except AssertionError as exc:
            raise AssertionError(f"{type(a).__name__}: {name}: {exc}") from exc
        finally:
            a.close()
            b.close()
    return list(checks)
