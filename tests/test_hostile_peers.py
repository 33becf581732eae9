"""Failing and hostile peers, second round: each finding reproduced against an
endpoint in a process of its own (tests/target_peer.py), which must live on,
keep its memory, and serve real rooms."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

from kvpoll import Receiver, Sender
from kvpoll import TransferStatus as S
from kvpoll.protocol.messages import Heartbeat, encode
from kvpoll.transports.auth import ClusterKeys
from tests.conftest import FAST
from tests.target_peer import target

ATTACK_SECONDS = 60.0


def _reset_flood(address: str, secret_file: str | None, seconds: float, out: Any) -> None:
    """Connections that each queue 15,000 heartbeats, wait 0.15 s and close with
    linger 0 (a reset while the target's input is throttled): what made libzmq
    4.3.5 abort the target (``Assertion failed: !_io_error``) within seconds."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 4096)
    keys = ClusterKeys.from_file(secret_file) if secret_file else None
    message = [b"C", encode(Heartbeat(seq=1))]
    began, rounds = time.monotonic(), 0
    while time.monotonic() - began < seconds:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.IDENTITY, f"tcp://127.0.0.1:{30_000 + rounds % 20_000}".encode())
        if keys is not None:
            keys.connect(sock)
        sock.connect(address)
        for _ in range(15_000):
            try:
                sock.send_multipart(message, zmq.NOBLOCK)
            except zmq.Again:
                break
        time.sleep(0.15)
        sock.close(0)
        rounds += 1
    ctx.destroy(0)
    out.put(rounds)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_1_throttled_connections_reset_for_60_s_cannot_abort_an_endpoint(
    tmp_path: Path, spawn: Any, secret: str
) -> None:
    """A sender and a receiver, each without and with a cluster secret (the
    attacker holds it), attacked at once for 60 s: all four live and serve a
    room afterwards."""
    ctx, start = spawn
    done = ctx.Queue()
    targets = []
    for side in ("sender", "receiver"):
        for secret_file in (None, secret):
            options: dict[str, Any] = dict(FAST)
            if secret_file is not None:
                options["transport_options"] = {"secret_file": secret_file}
            targets.append((side, secret_file, target(tmp_path, side, **options)))
    entered = [(side, secret_file, manager.__enter__()) for side, secret_file, manager in targets]
    try:
        for _, secret_file, t in entered:
            start(_reset_flood, t.address, secret_file, ATTACK_SECONDS, done)
        rounds = [done.get(timeout=ATTACK_SECONDS + 120) for _ in entered]
        assert min(rounds) > 20, rounds  # each target was hit again and again
        for side, secret_file, t in entered:
            assert t.proc.is_alive(), f"the {side} (secret: {bool(secret_file)}) died"
            assert t.call("alive")
            options = {"secret_file": secret_file} if secret_file else {}
            if side == "sender":
                with Receiver("zmq", transport_options=options, **FAST) as rx:
                    t.call("add", 1)
                    rx.open(1, t.address, row_shape=(4,), dtype=torch.float32, allocated_tokens=3)
                    t.call("send_ones", 1, 3)
                    assert rx.wait(1, 30) is S.Success, rx.info(1).reason
            else:
                with Sender("zmq", transport_options=options, **FAST) as tx:
                    tx.add(1)
                    t.call("open", 1, tx.address, row_shape=(4,), dtype=torch.float32)
                    tx.send(1, torch.ones(3, 4))
                    assert t.call("wait", 1, 30) is S.Success
    finally:
        for _, _, manager in reversed(targets):
            manager.__exit__(None, None, None)


def test_3_reasons_sent_to_a_peer_carry_no_local_path(tmp_path: Path) -> None:
    """A peer offers a pool whose shared memory is a private file (its own
    descriptor of it): the sender refuses to write there and fails the room. The
    abort it sends names no path of its host (it did: '/proc/<pid>/fd/<n> is not
    kvpoll shared memory (it is '<the file>')'); its own record keeps the detail."""
    import os

    from kvpoll.memory.shm import boot_id
    from kvpoll.protocol.messages import Abort, Bootstrap, PoolBuffer, PoolOffer
    from kvpoll.transports.base import RegionDescriptor
    from tests.helpers import ScriptedPeer

    private = tmp_path / "bystander.log"
    private.write_bytes(b"\0" * 4096)
    fd = os.open(private, os.O_RDWR)
    peer = ScriptedPeer()
    try:
        with Sender("zmq", **FAST) as tx:
            extra = {
                "shm_pid": os.getpid(),
                "shm_fd": fd,
                "shm_inode": os.fstat(fd).st_ino,
                "shm_size": 4096,
                "shm_offset": 0,
                "shm_stamped": False,
                "boot_id": boot_id(),
            }
            region = RegionDescriptor(
                transport="zmq", endpoint=peer.address, region_id=5, nbytes=4096, extra=extra
            )
            buffer = PoolBuffer(region=region, row_bytes=16, dtype="float32", row_shape=[4])
            peer.send(tx.address, PoolOffer(pool=3, page_size=1, num_pages=256, buffers=[buffer]))
            tx.add(9)
            peer.send(
                tx.address,
                Bootstrap(room=9, session=4, pool=3, pages=[(0, 2)], transports=["zmq/shm"]),
            )
            tx.send(9, torch.ones(2, 4))
            abort = peer.receive(Abort, timeout=20)
            assert tx.wait(9, 10) is S.Failed
            local = tx.info(9).reason or ""
            assert "/proc/" in local  # the detail stays here
            assert "/proc/" not in abort.reason
            assert str(tmp_path) not in abort.reason
            assert "<local path>" in abort.reason
    finally:
        peer.close()
        os.close(fd)


def test_11_send_refuses_a_meta_tensor_and_the_room_is_unchanged() -> None:
    from kvpoll import InvalidArgument

    with Sender("zmq", **FAST) as tx:
        tx.add(1)
        with pytest.raises(InvalidArgument, match="meta"):
            tx.send(1, torch.empty(4, 4, device="meta"))
        assert tx.poll(1) is S.Bootstrapping
        assert tx.info(1).total_tokens is None


def _forged(room: int, session: int, peer: Any, token: str = "not-the-token") -> Any:
    from kvpoll.protocol.messages import Bootstrap

    region = peer.transport.allocate(3 * 16)
    return Bootstrap(
        room=room,
        session=session,
        region=region.descriptor,
        allocated_tokens=3,
        row_bytes=16,
        dtype="float32",
        row_shape=[4],
        transports=["zmq/tcp"],
        token=token,
    )


def test_4_a_waiting_bootstrap_does_not_inherit_the_age_of_a_forged_one(tmp_path: Path) -> None:
    """A forged bootstrap for room 5 at t; the legit receiver opens room 5 at t+1.5 s;
    the sender adds it (with its token) at t+2.5 s, past the forged one's 2 s but
    within the legit one's: the room succeeds (it failed: the legit bootstrap was
    refused with the forged one's age)."""
    from tests.helpers import ScriptedPeer

    forger = ScriptedPeer()
    try:
        with (
            target(tmp_path, "sender", timeouts={"Bootstrapping": 2.0}, **FAST) as t,
            Receiver("zmq", **FAST) as rx,
        ):
            began = time.monotonic()
            forger.send(t.address, _forged(5, 1, forger))
            t.wait_stat("messages_in", 1)
            time.sleep(1.5 - (time.monotonic() - began))
            rx.open(5, t.address, row_shape=(4,), dtype=torch.float32, allocated_tokens=3, token=77)
            time.sleep(2.5 - (time.monotonic() - began))
            t.call("add", 5, token=77)
            t.call("send_ones", 5, 3)
            assert rx.wait(5, 20) is S.Success, rx.info(5).reason
    finally:
        forger.close()


@pytest.mark.parametrize("identities", [1, 4])
def test_6_wrong_token_bootstraps_do_not_lock_a_room_out(tmp_path: Path, identities: int) -> None:
    """256 bootstraps with a wrong token for room 7, from one identity or four,
    wait before add(): the legit receiver's bootstrap still gets in (it was
    refused: '256 bootstraps already wait for room 7')."""
    from tests.helpers import ScriptedPeer

    forgers = [ScriptedPeer() for _ in range(identities)]
    try:
        with target(tmp_path, "sender", **FAST) as t, Receiver("zmq", **FAST) as rx:
            for i in range(256):
                forger = forgers[i % identities]
                forger.send(t.address, _forged(7, 1 + i, forger))
            t.wait_stat("messages_in", 256)
            rx.open(7, t.address, row_shape=(4,), dtype=torch.float32, allocated_tokens=3, token=9)
            t.wait_stat("messages_in", 258)  # its pool offer and bootstrap
            t.call("add", 7, token=9)
            t.call("send_ones", 7, 3)
            assert rx.wait(7, 20) is S.Success, rx.info(7).reason
    finally:
        for forger in forgers:
            forger.close()


def _identities_flood(address: str, count: int, out: Any) -> None:
    """``count`` made-up identities, each with one bootstrap waiting for a room of
    its own (rooms 100,000 and up)."""
    from kvpoll.protocol.messages import Bootstrap, encode
    from kvpoll.transports.base import RegionDescriptor

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 4096)
    region = RegionDescriptor(transport="zmq", endpoint="x", region_id=1, nbytes=48)
    for i in range(count):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 5000)
        identity = f"tcp://127.{i // 62500 + 1}.{i // 250 % 250}.{i % 250 + 1}:9"
        sock.setsockopt(zmq.IDENTITY, identity.encode())
        sock.connect(address)
        forged = Bootstrap(
            room=100_000 + i,
            session=1,
            region=region.model_copy(update={"endpoint": identity}),
            allocated_tokens=3,
            row_bytes=16,
            dtype="float32",
            row_shape=[4],
            transports=["zmq/tcp"],
        )
        sock.send_multipart([b"C", encode(forged)])
        sock.close()
        if i % 500 == 499:
            time.sleep(0.05)  # let the closed sockets go
    ctx.term()
    out.put(count)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_5_a_flood_of_identities_does_not_evict_an_earlier_open_before_add(
    tmp_path: Path, spawn: Any
) -> None:
    """The legit receiver opens room 1 before the sender's add(); then 10,001
    identities each leave one bootstrap waiting (the table holds 10,000 rooms).
    Every peer holds one: the newcomers give way, the legit bootstrap stays, and
    the room succeeds once added (it was the one evicted: the earliest)."""
    ctx, start = spawn
    done = ctx.Queue()
    with target(tmp_path, "sender", **FAST) as t, Receiver("zmq") as rx:
        rx.open(1, t.address, row_shape=(4,), dtype=torch.float32, allocated_tokens=3)
        t.wait_stat("messages_in", 2)  # its pool offer and its bootstrap
        start(_identities_flood, t.address, 10_001, done)
        assert done.get(timeout=240) == 10_001
        t.wait_stat("messages_in", 10_002, timeout=120)
        t.call("add", 1)
        t.call("send_ones", 1, 3)
        assert rx.wait(1, 30) is S.Success, rx.info(1).reason
        assert t.stats["pending_dropped"] == 2  # the last two newcomers were refused


def _pool_flood(address: str, identity: int, offers: int, out: Any) -> None:
    """``offers`` pool offers of 1,024 buffers with 4 KiB descriptions each (4 MiB
    an offer), from one made-up identity; then a description of 64 KiB."""
    from kvpoll.protocol.messages import PoolBuffer, PoolOffer, encode
    from kvpoll.transports.base import RegionDescriptor

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    me = f"tcp://127.0.0.{identity + 1}:9"
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 30_000)
    sock.setsockopt(zmq.IDENTITY, me.encode())
    sock.connect(address)
    fat = {"x": "a" * 4000}
    buffers = [
        PoolBuffer(
            region=RegionDescriptor(
                transport="zmq", endpoint=me, region_id=i + 1, nbytes=1 << 20, extra=fat
            ),
            row_bytes=16,
            dtype="float32",
            row_shape=[4],
        )
        for i in range(1024)
    ]
    for pool in range(offers):
        offer = PoolOffer(pool=pool, page_size=1, num_pages=1024, buffers=buffers)
        sock.send_multipart([b"C", encode(offer)])
    huge = encode(PoolOffer(pool=999, page_size=1, num_pages=1, buffers=buffers[:1]))
    sock.send_multipart([b"C", huge.replace(b"a" * 4000, b"a" * 65536, 1)])
    sock.close()
    ctx.term()
    out.put(offers)


def room_from_target(t: Any, rx: Receiver, room: int) -> None:
    """A legitimate room from a target sender: it must succeed, its data intact."""
    t.call("add", room)
    rx.open(room, t.address, row_shape=(4,), dtype=torch.float32, allocated_tokens=3)
    t.call("send_ones", room, 3)
    assert rx.wait(room, 30) is S.Success, rx.info(room).reason
    assert torch.equal(rx.result(room).tensor(), torch.arange(12.0).reshape(3, 4))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_7_pool_offers_are_bounded_in_bytes_per_peer_and_in_all(tmp_path: Path, spawn: Any) -> None:
    """Four identities each offer 30 pools of 4 MiB of descriptions (480 MiB in
    all; every one was kept before): the sender keeps at most 8 MiB of a peer's
    descriptions and 64 MiB in all, refuses a description over 16 KiB, and its
    memory stays near where it was."""
    ctx, start = spawn
    done = ctx.Queue()
    with target(tmp_path, "sender", **FAST) as t, Receiver("zmq", **FAST) as rx:
        before = t.call("process")["rss"]
        base = t.stats["messages_in"]
        for identity in range(4):
            start(_pool_flood, t.address, identity, 30, done)
        assert [done.get(timeout=240) for _ in range(4)] == [30] * 4
        stats = t.wait_stat("messages_in", base + 4 * 31, timeout=240)
        assert stats["malformed"] >= 4  # the 64 KiB descriptions
        grown = t.call("process")["rss"] - before
        assert grown < 200 << 20, f"the sender grew by {grown >> 20} MiB"
        room_from_target(t, rx, 1)


def test_9_bytes_from_a_dead_peers_address_do_not_keep_its_rooms_alive(tmp_path: Path) -> None:
    """The sender is killed; a connection without its incarnation keeps sending
    well-formed heartbeats and answers under its address: the receiver still
    fails the room within its window (the rooms stayed in their status 25 s
    later: anything from that address refreshed the peer's liveness)."""
    import os
    import signal

    from kvpoll.protocol.messages import HeartbeatAck
    from tests.helpers import raw_dealer

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with Receiver("zmq", **FAST) as rx, target(tmp_path, "sender", **FAST) as t:
        t.call("add", 3)
        rx.open(3, t.address, row_shape=(4,), dtype=torch.float32, allocated_tokens=3)
        deadline = time.monotonic() + 20
        while rx.poll(3) is not S.WaitingForInput:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(t.proc.pid, signal.SIGKILL)
        t.proc.join(10)
        forger = raw_dealer(ctx, rx.address, t.address)
        killed = time.monotonic()
        seq = 0
        while rx.poll(3) is not S.Failed and time.monotonic() - killed < 15:
            seq += 1
            forger.send_multipart([b"C", encode(Heartbeat(seq=seq))])
            forger.send_multipart([b"C", encode(HeartbeatAck(seq=seq))])
            time.sleep(0.05)
        assert rx.poll(3) is S.Failed
        assert time.monotonic() - killed < 5  # FAST: 8 heartbeats of 0.2 s
        assert "silent" in (rx.info(3).reason or "")
        forger.close(0)
    ctx.term()


def test_10_two_identities_cannot_take_every_ucx_receive() -> None:
    """Two made-up identities each ask for 4 writes of 65,536 ranges (every one
    gets receives posted, scratch ones for an unknown region): each gets at most
    one (65,536 receives), so a real writer's rooms still succeed (two
    identities took all 262,144 before, and real rooms failed for 30 s)."""
    import struct

    from tests.helpers import need_transport, raw_dealer

    need_transport("ucx")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with Receiver("ucx", **FAST) as rx, Sender("ucx", **FAST) as tx:
        forgers = [raw_dealer(ctx, rx.address, f"tcp://127.0.0.{i + 2}:9") for i in range(2)]
        count = 1 << 16
        for i, forger in enumerate(forgers):
            for write in range(4):
                tags = ((i + 1) << 40) | (write << 20)
                table = b"".join(struct.pack("<QQQQ", 12345, 0, 64, tags | r) for r in range(count))
                forger.send_multipart([b"U", struct.pack("<QQ", write + 1, count) + table])
        deadline = time.monotonic() + 30
        while rx.stats.get("rejected_writes", 0) < 2 * 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rx.stats["rejected_writes"] >= 2 * 4  # unknown region, or over the cap
        assert rx.stats["receives_posted"] <= 2 * count
        for room in range(3):
            tx.add(room)
            rx.open(room, tx.address, row_shape=(4,), dtype=torch.float32, allocated_tokens=3)
            tx.send(room, torch.full((3, 4), float(room)))
            assert rx.wait(room, 30) is S.Success, rx.info(room).reason
        for forger in forgers:
            forger.close(0)
    ctx.term()


def _pool_receiver(address: str, room: int, closing: bool, out: Any) -> None:
    """A receiver whose pool (64 MiB of shared memory) the sender writes into;
    then gone: closed cleanly, or dead without a word."""
    import os

    from kvpoll import PagedPool

    pool = PagedPool.allocate(
        num_pages=(64 << 20) // 16, page_size=1, buffers=[((4,), torch.float32)], transport="zmq"
    )
    rx = Receiver("zmq", heartbeat_interval=0.2, heartbeat_misses=8)
    rx.open(room, address, pool=pool, pages=[0, 1, 2])
    out.put((room, rx.wait(room, 30).name))
    if closing:
        rx.close()
        out.put((room, "closed"))
    out.close()
    out.join_thread()  # what was put has left this process
    if closing:
        time.sleep(600)
    os._exit(0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_8_a_sender_unmaps_the_memory_of_receivers_that_died_or_closed(
    tmp_path: Path, spawn: Any
) -> None:
    """Six receivers with a pool of 64 MiB of shared memory each get a room from the
    sender; three die, three close. The sender unmaps each one's segment once it
    learns it is gone (it kept them mapped until its 256-segment limit: 384 MiB)."""
    ctx, start = spawn
    out = ctx.Queue()
    with target(tmp_path, "sender", **FAST) as t:
        base = t.call("process")["mapped"]
        procs, peak = [], 0
        for room in range(6):
            t.call("add", room)
            procs.append(start(_pool_receiver, t.address, room, room % 2 == 0, out))
            t.call("send_ones", room, 3)
            t.call("wait", room, 30)
            peak = max(peak, t.call("process")["mapped"] - base)
        assert peak >= 64 << 20  # each receiver's segment was mapped while it was used
        heard = [out.get(timeout=60) for _ in range(9)]
        assert sorted(h for h in heard if h[1] != "closed") == [(r, "Success") for r in range(6)]
        assert sorted(h for h in heard if h[1] == "closed") == [(r, "closed") for r in (0, 2, 4)]
        for proc in procs:
            proc.kill()
        deadline = time.monotonic() + 30
        while t.call("process")["mapped"] - base > 16 << 20:
            assert time.monotonic() < deadline, t.call("process")
            time.sleep(0.2)


def _bystander(out: Any, control: Any) -> None:
    """A process with a kvpoll pool in shared memory, registered with its own
    receiver; reports the pool's descriptor, then whether its memory changed."""
    from kvpoll import PagedPool

    pool = PagedPool.allocate(
        num_pages=64, page_size=1, buffers=[((4,), torch.float32)], transport="zmq"
    )
    with Receiver("zmq") as rx:
        rx.register(pool)
        entry = rx._pools[pool.id]
        out.put(entry.regions[0].descriptor.model_dump())
        control.get(timeout=120)
        out.put(float(pool.buffers[0].abs().sum()))


def _offer_memory(peer: Any, sender: str, descriptor: dict[str, Any], room: int) -> None:
    """The peer offers a pool whose one buffer is ``descriptor``'s memory (its
    ``endpoint`` made the peer's own) and bootstraps ``room`` on two pages."""
    from kvpoll.protocol.messages import Bootstrap, PoolBuffer, PoolOffer
    from kvpoll.transports.base import RegionDescriptor

    region = RegionDescriptor(**{**descriptor, "endpoint": peer.address})
    buffer = PoolBuffer(region=region, row_bytes=16, dtype="float32", row_shape=[4])
    peer.send(sender, PoolOffer(pool=room, page_size=1, num_pages=64, buffers=[buffer]))
    peer.send(
        sender,
        Bootstrap(room=room, session=room, pool=room, pages=[(40, 2)], transports=["zmq/shm"]),
    )


def test_2_a_peer_cannot_make_the_sender_write_into_memory_not_its_own(spawn: Any) -> None:
    """A peer offers, as its own, (a) a bystander process's kvpoll pool and (b) the
    sender's own pool: the sender refuses both writes, fails only those rooms, and
    neither memory changes (both were written before: Success, pages overwritten)."""
    from kvpoll import PagedPool
    from tests.helpers import ScriptedPeer

    ctx, start = spawn
    out, control = ctx.Queue(), ctx.Queue()
    start(_bystander, out, control)
    bystander = out.get(timeout=60)
    peer = ScriptedPeer()
    try:
        with Sender("zmq", **FAST) as tx:
            own = PagedPool.allocate(
                num_pages=64, page_size=1, buffers=[((4,), torch.float32)], transport="zmq"
            )
            own.buffers[0].copy_(torch.arange(256.0).view(64, 4))
            tx.register(own)
            mine = tx._pools[own.id].regions[0].descriptor.model_dump()
            for room, descriptor in ((1, bystander), (2, mine)):
                tx.add(room)
                _offer_memory(peer, tx.address, descriptor, room)
                tx.send(room, pages=[0, 1], pool=own, is_last=True)
                assert tx.wait(room, 20) is S.Failed
                assert "not memory of" in (tx.info(room).reason or "")
            assert torch.equal(own.buffers[0], torch.arange(256.0).view(64, 4))
            control.put("done")
            assert out.get(timeout=60) == 0.0  # the bystander's pool is untouched
            # a real receiver's room still goes through
            with Receiver("zmq", **FAST) as rx:
                dst = PagedPool.allocate(num_pages=8, page_size=1, buffers=[((4,), torch.float32)])
                tx.add(3)
                rx.open(3, tx.address, pool=dst, pages=[4, 5])
                tx.send(3, pages=[0, 1], pool=own, is_last=True)
                assert rx.wait(3, 20) is S.Success
                assert torch.equal(dst.gather(0, [4, 5]), own.gather(0, [0, 1]))
    finally:
        peer.close()
