"""What a transport has handed to its engine, and what waits for its turn.

Every transport that moves bytes asynchronously (zmq over TCP, ucx, nixl,
mooncake) hands writes to an engine whose queues are finite: ZMQ's send queue
(``max_queued`` messages a peer), UCX's posted receives at the destination,
Mooncake's per-peer transfer queue. Overrunning one fails the write, and with
it a room that only had to wait. So each transport bounds what it has handed
over with one :class:`InFlight`:

* a write is **admitted** (its ``start`` runs) when its ranges and bytes fit
  beside those in flight, to its peer and in all (:class:`Limits`, chosen per
  transport below the limit of its engine, measured there); a write larger
  than a limit goes alone, once nothing else is in flight where it is too big;
* the others **wait in order**: per peer strictly first come, first served,
  and no write passes one that is waiting for the total to free up;
* a waiting write fails only when its peer made **no progress** (no write to
  it finished) for ``stall`` seconds, counted from when it began to wait: a
  busy engine is not a broken one. An admitted write has its transport's
  write time-out from admission, not from when it was asked for.

Not thread-safe: the transport's owner thread is the only caller.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

__all__ = ["InFlight", "Limits"]


@dataclass(frozen=True)
class Limits:
    """Ranges and bytes handed to an engine at once: to one peer, and in all."""

    peer_ranges: int
    peer_bytes: int
    ranges: int
    bytes: int

    def __post_init__(self) -> None:
        if min(self.peer_ranges, self.peer_bytes, self.ranges, self.bytes) < 1:
            raise ValueError(f"every limit must be at least 1: {self}")


@dataclass
class _Load:
    ranges: int = 0
    bytes: int = 0
    writes: int = 0

    def add(self, ranges: int, nbytes: int, sign: int) -> None:
        self.ranges += sign * ranges
        self.bytes += sign * nbytes
        self.writes += sign


@dataclass
class _Write:
    write_id: int
    peer: str
    ranges: int
    nbytes: int
    start: Callable[[], None]
    since: float  # when it began to wait
    waiting: bool = True


@dataclass
class _Peer:
    load: _Load = field(default_factory=_Load)
    waiting: deque[_Write] = field(default_factory=deque)
    progress: float = 0.0  # when a write to it last finished (or was admitted)


class InFlight:
    """The writes a transport has handed to its engine, and those waiting.

    Args:
        limits: what may be in flight at once.
        stall: seconds a waiting write may wait without its peer making progress.
    """

    def __init__(self, limits: Limits, stall: float) -> None:
        self.limits = limits
        self.stall = stall
        self._total = _Load()
        self._peers: dict[str, _Peer] = {}
        self._admitted: dict[int, _Write] = {}
        self._order: deque[_Write] = deque()  # every waiting write, first come first
        self._waiting = 0
        self.stats = {"writes_waited": 0, "waiting": 0, "in_flight_ranges": 0}

    # -- what the transport asks ------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Writes waiting for their turn."""
        return self._waiting

    @property
    def busy(self) -> bool:
        """Whether any write is in flight or waiting."""
        return bool(self._admitted) or self._waiting > 0

    def add(
        self,
        write_id: int,
        peer: str,
        ranges: int,
        nbytes: int,
        start: Callable[[], None],
        now: float,
    ) -> bool:
        """Run ``start`` now if the write fits (True), else keep it waiting (False).

        ``start`` hands the write to the engine; when it raises, nothing stays
        in flight for it and the exception goes to the caller.
        """
        state = self._peers.get(peer)
        if state is None:
            state = self._peers[peer] = _Peer(progress=now)
        write = _Write(write_id, peer, ranges, nbytes, start, now)
        if not state.waiting and not self._order_blocked() and self._fits(write, state):
            self._admit(write, state, now)
            return True
        state.waiting.append(write)
        self._order.append(write)
        self._waiting += 1
        self.stats["writes_waited"] += 1
        self.stats["waiting"] = self._waiting
        return False

    def done(self, write_id: int, now: float) -> bool:
        """An admitted write ended (either way): its share is free again. False for
        a write this does not hold (never admitted, or done already)."""
        write = self._admitted.pop(write_id, None)
        if write is None:
            return False
        state = self._peers[write.peer]
        state.load.add(write.ranges, write.nbytes, -1)
        self._total.add(write.ranges, write.nbytes, -1)
        state.progress = now
        self.stats["in_flight_ranges"] = self._total.ranges
        if not state.load.writes and not state.waiting:
            del self._peers[write.peer]
        return True

    def admit_waiting(self, now: float) -> Iterator[tuple[int, BaseException]]:
        """Start the waiting writes that fit now, in order; yields ``(write id,
        error)`` for each whose ``start`` raised (it is no longer held)."""
        blocked: set[str] = set()
        failed: list[tuple[int, BaseException]] = []
        for write in self._order:
            if not write.waiting or write.peer in blocked:
                continue
            state = self._peers[write.peer]
            if state.waiting[0] is not write:
                blocked.add(write.peer)
                continue
            if not self._fits(write, state):
                if not self._fits_total(write):
                    break  # nobody passes a write waiting for the total to free up
                blocked.add(write.peer)
                continue
            state.waiting.popleft()
            write.waiting = False
            self._waiting -= 1
            try:
                self._admit(write, state, now)
            except Exception as exc:
                failed.append((write.write_id, exc))
        self._order = deque(w for w in self._order if w.waiting)
        self.stats["waiting"] = self._waiting
        return iter(failed)

    def expired(self, now: float) -> list[tuple[int, str]]:
        """Waiting writes whose peer made no progress for ``stall`` seconds since
        they began to wait: ``(write id, why)``, each dropped."""
        late: list[tuple[int, str]] = []
        for peer, state in list(self._peers.items()):
            while state.waiting:
                write = state.waiting[0]
                quiet = now - max(write.since, state.progress)
                if quiet <= self.stall:
                    break
                self._drop(write, state)
                late.append(
                    (
                        write.write_id,
                        f"waited {quiet:.1f} s for its turn while no write to {peer} "
                        f"finished ({state.load.writes} in flight)",
                    )
                )
            if not state.load.writes and not state.waiting:
                del self._peers[peer]
        return late

    def drop_peer(self, peer: str) -> list[int]:
        """Forget ``peer``'s waiting writes (it closed); their ids. Writes in flight
        to it stay held until the transport reports them done."""
        state = self._peers.get(peer)
        if state is None:
            return []
        dropped = [w.write_id for w in state.waiting]
        while state.waiting:
            self._drop(state.waiting[0], state)
        if not state.load.writes:
            del self._peers[peer]
        return dropped

    def clear(self) -> None:
        """Forget everything (the transport closed)."""
        self._peers.clear()
        self._admitted.clear()
        self._order.clear()
        self._waiting = 0
        self._total = _Load()

    # -- inside ----------------------------------------------------------------------
    def _order_blocked(self) -> bool:
        """Whether a write waits for the total to free up (then nobody passes it)."""
        while self._order and not self._order[0].waiting:
            self._order.popleft()
        return bool(self._order) and not self._fits_total(self._order[0])

    def _fits_total(self, write: _Write) -> bool:
        total, limits = self._total, self.limits
        return not total.writes or (
            total.ranges + write.ranges <= limits.ranges
            and total.bytes + write.nbytes <= limits.bytes
        )

    def _fits(self, write: _Write, state: _Peer) -> bool:
        load, limits = state.load, self.limits
        return self._fits_total(write) and (
            not load.writes
            or (
                load.ranges + write.ranges <= limits.peer_ranges
                and load.bytes + write.nbytes <= limits.peer_bytes
            )
        )

    def _admit(self, write: _Write, state: _Peer, now: float) -> None:
        state.load.add(write.ranges, write.nbytes, 1)
        self._total.add(write.ranges, write.nbytes, 1)
        self._admitted[write.write_id] = write
        state.progress = now  # its queue moves
        self.stats["in_flight_ranges"] = self._total.ranges
        try:
            write.start()
        except BaseException:
            self.done(write.write_id, now)
            raise

    def _drop(self, write: _Write, state: _Peer) -> None:
        """Take a waiting write off its peer's queue (``_order`` forgets it lazily)."""
        state.waiting.remove(write)
        write.waiting = False
        self._waiting -= 1
        self.stats["waiting"] = self._waiting
