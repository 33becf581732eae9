"""What a sender and a receiver share: one I/O thread, rooms, heartbeats, time-outs.

An endpoint owns a transport and one I/O thread, whatever the number of rooms.
That thread is the only one that touches the transport. Application calls
either read (``poll`` never waits for the thread), hand the thread a command
and wait for it, with a time-out, or - where nothing but a message must reach
the transport - change rooms themselves under the endpoint's lock and leave
the encoded message in the *outbox*, which the I/O thread sends first thing
on its next turn (woken once per batch, so many rooms opened at once cost one
wake-up and no round trip each).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from kvpoll.config import Config, load_config
from kvpoll.errors import IllegalTransition, InvalidArgument, KvpollError, UnknownRoom
from kvpoll.memory.pool import PagedPool
from kvpoll.protocol.liveness import Liveness, Lost
from kvpoll.protocol.messages import (
    Abort,
    AbortAck,
    Heartbeat,
    HeartbeatAck,
    Message,
    MessageError,
    decode,
    encode,
)
from kvpoll.protocol.pools import Registered, register_pool
from kvpoll.protocol.waiting import Completion, Waiter, check_rooms
from kvpoll.statemachine.deadlines import Deadlines, Timeouts, check_timeouts
from kvpoll.statemachine.state import TransferState, Transition
from kvpoll.statemachine.status import TransferStatus
from kvpoll.throttle import LogThrottle
from kvpoll.transports import create
from kvpoll.transports.base import (
    MessageReceived,
    PeerActive,
    PeerClosed,
    Transport,
    WriteDone,
)

__all__ = ["EndpointClosed", "RoomInfo", "RoomMetrics", "StatusChange", "TransferIncomplete"]

log = logging.getLogger("kvpoll.protocol")
_FAILED = TransferStatus.Failed
_TOMBSTONES = 65536
_COMMAND_TURN = 0.02
"""Seconds of application commands one turn of the I/O loop runs at most before it
reads its input again (the rest wait for the next turn)."""


def _takes_secret(name: str) -> bool:
    """Whether the transport named ``name`` authenticates its peers (takes ``secret_file``)."""
    from kvpoll.transports import resolve
    from kvpoll.transports.options import schema

    options = schema(resolve(name))
    return options is None or "secret_file" in options


class EndpointClosed(KvpollError):
    """The endpoint is closed (or its I/O thread stopped)."""


class TransferIncomplete(KvpollError):
    """The room has not reached Success, so there is no result yet.

    Attributes:
        room: the room.
        status: its status now.
    """

    def __init__(self, room: int, status: TransferStatus, reason: str | None = None) -> None:
        self.room = room
        self.status = status
        why = f": {reason}" if reason else ""
        super().__init__(f"room {room} is {status.name}, not Success{why}")


@dataclass(frozen=True)
class StatusChange:
    """One applied step of a room, as handed to ``on_status`` callbacks."""

    side: str
    room: int
    source: TransferStatus
    dest: TransferStatus
    event: str
    sent_tokens: int
    at: float
    reason: str | None = None


@dataclass(frozen=True)
class RoomMetrics:
    """What a room moved and how long each phase took (SGLang's KVTransferMetric, and more).

    Attributes:
        bytes_moved: payload bytes written (sender) or landed (receiver), aux rows included.
        bootstrap_s: from open/add until WaitingForInput (None: not reached).
        transfer_s: from WaitingForInput until the room was final (None: not final yet).
        staged: the data went through pinned host memory (a device pool on a
            transport that cannot move device memory).
    """

    bytes_moved: int = 0
    bootstrap_s: float | None = None
    transfer_s: float | None = None
    staged: bool = False


@dataclass(frozen=True)
class RoomInfo:
    """A snapshot of one room."""

    room: int
    status: TransferStatus
    sent_tokens: int
    total_tokens: int | None
    reason: str | None
    history: tuple[Transition, ...]
    peers: tuple[str, ...]
    paths: tuple[str, ...] = ()
    """The data paths agreed at bootstrap (``zmq/shm``, ``ucx``, ...), one per kind."""
    metrics: RoomMetrics = RoomMetrics()
    """Bytes moved and time per phase."""

    @property
    def bytes_moved(self) -> int:
        """``metrics.bytes_moved``."""
        return self.metrics.bytes_moved

    @property
    def bootstrap_s(self) -> float | None:
        """``metrics.bootstrap_s``."""
        return self.metrics.bootstrap_s

    @property
    def transfer_s(self) -> float | None:
        """``metrics.transfer_s``."""
        return self.metrics.transfer_s

    @property
    def staged(self) -> bool:
        """``metrics.staged``."""
        return self.metrics.staged


class RoomBase:
    """The part of a room record every side has."""

    __slots__ = (
        "bytes_moved",
        "done_at",
        "opened_at",
        "paths",
        "peers",
        "ready_at",
        "staged",
        "state",
    )

    def __init__(self, room: int, history: bool) -> None:
        self.state = TransferState(room, history=history)
        self.peers: set[str] = set()
        self.paths: set[str] = set()  # the data paths agreed at bootstrap
        self.opened_at = time.monotonic()
        self.ready_at: float | None = None
        self.done_at: float | None = None
        self.bytes_moved = 0
        self.staged = False

    def metrics(self) -> RoomMetrics:
        ready, done = self.ready_at, self.done_at
        return RoomMetrics(
            self.bytes_moved,
            None if ready is None else ready - self.opened_at,
            None if ready is None or done is None else done - ready,
            self.staged,
        )

    @property
    def total_tokens(self) -> int | None:
        return None


R = TypeVar("R", bound=RoomBase)


class Endpoint(Generic[R]):
    """Base of :class:`~kvpoll.Sender` and :class:`~kvpoll.Receiver`.

    Every argument left as None comes from the configuration: ``config`` when
    given, else the one :func:`kvpoll.config.load_config` reads (file and
    ``KVPOLL_*`` variables; the defaults below when neither sets it).

    Args:
        transport: a transport name (``"zmq"``, ``"ucx"``, ...) or an open
            :class:`~kvpoll.transports.Transport` (the endpoint then owns it).
        transport_options: keyword options for a transport made by name; they
            win over the configuration's options for that transport.
        config: the configuration to take unset arguments from.
        timeouts: seconds a room may stay in each non-final status without a
            step (default 300 s each, Transferring included).
        heartbeat_interval: seconds between heartbeats to each peer that shares
            an unfinished room (default 1).
        heartbeat_misses: a peer silent for this many intervals, with as many
            heartbeats unanswered, is dead: every unfinished room it shares
            fails, and it is told so (default 3; see :mod:`kvpoll.protocol.liveness`).
        history: keep each room's steps with timestamps.
        on_status: called on the I/O thread after every step of every room;
            keep it quick (it delays I/O); exceptions are logged and ignored.
        command_timeout: seconds an application call waits for the I/O thread
            (default 30).
    """

    side: ClassVar[str] = "endpoint"

    def __init__(
        self,
        transport: str | Transport | None = None,
        *,
        transport_options: Mapping[str, Any] | None = None,
        config: Config | None = None,
        timeouts: Timeouts | None = None,
        heartbeat_interval: float | None = None,
        heartbeat_misses: int | None = None,
        history: bool = True,
        on_status: Callable[[StatusChange], None] | None = None,
        command_timeout: float | None = None,
    ) -> None:
        cfg = config if config is not None else load_config()
        heartbeat_interval = (
            cfg.heartbeat_interval if heartbeat_interval is None else heartbeat_interval
        )
        heartbeat_misses = cfg.heartbeat_misses if heartbeat_misses is None else heartbeat_misses
        command_timeout = cfg.command_timeout if command_timeout is None else command_timeout
        if not heartbeat_interval > 0 or heartbeat_misses < 1:
            raise InvalidArgument("heartbeat_interval must be > 0 and heartbeat_misses >= 1")
        self._deadlines: Deadlines[int] = Deadlines(
            check_timeouts(cfg.timeouts if timeouts is None else timeouts)
        )
        if isinstance(transport, Transport):
            self._transport = transport
        else:
            name = transport or cfg.transport
            options = {**cfg.options(name), **dict(transport_options or {})}
            if cfg.secret_file and "secret_file" not in options and _takes_secret(name):
                options["secret_file"] = cfg.secret_file
            self._transport = create(name, **options)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._waiter = Waiter(self.poll, self._changed)
        self._warn = LogThrottle(log)  # refused input: a flood logs a summary
        self._rooms: dict[int, R] = {}
        self._status: dict[int, TransferStatus] = {}  # read without the lock by poll()
        self._tombstones: OrderedDict[int, None] = OrderedDict()
        self._liveness = Liveness(heartbeat_interval, heartbeat_misses)
        self._writes: dict[int, tuple[int, int]] = {}  # write id -> (room, rank)
        self._pools: dict[int, Registered] = {}  # pool id -> its registration here
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        # (peer, encoded message, its room and record): sent by the I/O thread unless
        # the room ended or went meanwhile; filled by callers under the lock
        self._outbox: deque[tuple[str, bytes, str, int, R]] = deque()
        self._history = history
        self._on_status = on_status
        self._command_timeout = command_timeout
        self._seq = itertools.count(1)
        self._stop = threading.Event()
        self._closed = False
        self._stats: dict[str, int] = dict.fromkeys(
            (
                "messages_in",
                "messages_out",
                "malformed",
                "rejected",
                "late",
                "unknown",
                "illegal",
                "timeouts",
                "peers_lost",
                "abort_acks",
                "internal_errors",
                "send_errors",
                "pending_dropped",
            ),
            0,
        )
        self._setup()
        self._thread = threading.Thread(
            target=self._run, name=f"kvpoll-{self.side}-io", daemon=True
        )
        self._thread.start()

    # -- public --------------------------------------------------------------------
    @property
    def address(self) -> str:
        """Where peers reach this endpoint."""
        return self._transport.address

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats to each peer sharing an unfinished room."""
        return self._liveness.interval

    @property
    def heartbeat_misses(self) -> int:
        """Heartbeats a peer may leave unanswered (over as many intervals) before it is lost."""
        return self._liveness.misses

    @property
    def transport(self) -> Transport:
        """The transport (driven by the I/O thread: do not call it from elsewhere)."""
        return self._transport

    def poll(self, room: int) -> TransferStatus:
        """The room's status now, without waiting for anything.

        Raises:
            UnknownRoom: the room is not open here (never, or removed).
        """
        status = self._status.get(room)
        if status is None:
            raise UnknownRoom(room)
        return status

    def wait(self, room: int, timeout: float | None = None) -> TransferStatus:
        """Wait until the room is Success or Failed, or ``timeout`` seconds pass.

        ``timeout=None`` waits without a limit (the room's own time-outs still
        end it); ``0`` looks once.

        Returns:
            The status at that moment (final unless the time ran out).

        Raises:
            UnknownRoom: the room is not open here (or was removed meanwhile).
            InvalidArgument: a negative or non-numeric timeout.
        """
        return self._waiter.until(lambda: self._final_or(room), timeout) or self.poll(room)

    def wait_any(
        self, rooms: Iterable[int], timeout: float | None = None
    ) -> dict[int, TransferStatus]:
        """Wait until at least one of ``rooms`` is final, or ``timeout`` seconds pass.

        Returns:
            Every room among ``rooms`` that is final at that moment, with its
            status (empty when the time ran out).

        Raises:
            UnknownRoom: one of the rooms is not open here.
            InvalidArgument: no rooms, a non-int id, or a bad timeout.
        """
        listed = check_rooms(rooms)
        return self._waiter.until(lambda: self._waiter.finals(listed) or None, timeout) or {}

    def as_completed(self, rooms: Iterable[int], timeout: float | None = None) -> Completion:
        """``(room, final status)`` for each of ``rooms``, in the order they end.

        Use ``for`` (blocking) or ``async for`` (asyncio). When ``timeout``
        seconds pass with rooms unfinished, the next step raises
        :class:`TimeoutError` naming them.
        """
        return Completion(self._waiter, rooms, timeout)

    async def wait_async(self, room: int, timeout: float | None = None) -> TransferStatus:
        """:meth:`wait` for asyncio: awaits without blocking the event loop or a thread."""
        found = await self._waiter.until_async(lambda: self._final_or(room), timeout)
        return found or self.poll(room)

    async def wait_any_async(
        self, rooms: Iterable[int], timeout: float | None = None
    ) -> dict[int, TransferStatus]:
        """:meth:`wait_any` for asyncio."""
        listed = check_rooms(rooms)
        found = await self._waiter.until_async(lambda: self._waiter.finals(listed) or None, timeout)
        return found or {}

    def _final_or(self, room: int) -> TransferStatus | None:
        status = self.poll(room)
        return status if status.is_final else None

    def info(self, room: int) -> RoomInfo:
        """A snapshot of the room: status, tokens, history, failure reason.

        Raises:
            UnknownRoom: the room is not open here.
        """
        with self._lock:
            rec = self._room(room)
            state = rec.state
            return RoomInfo(
                room,
                state.status,
                state.sent_tokens,
                rec.total_tokens,
                state.reason,
                state.history,
                tuple(sorted(rec.peers)),
                tuple(sorted(rec.paths)),
                rec.metrics(),
            )

    def register(self, pool: PagedPool) -> None:
        """Register a pool's memory with this endpoint's transport (once; later calls
        do nothing). Rooms register their pool on first use anyway.

        Raises:
            InvalidArgument: not a PagedPool, or memory the transport cannot reach.
        """
        if not isinstance(pool, PagedPool):
            raise InvalidArgument(f"register() takes a PagedPool, not {type(pool).__name__}")
        self._call(lambda: self._pool_entry(pool))

    def _default_pool(self, pool: PagedPool | None, what: str) -> PagedPool:
        """``pool``, or the one pool the application registered here."""
        if pool is not None:
            if not isinstance(pool, PagedPool):
                raise InvalidArgument(
                    f"{what}: pool must be a PagedPool, not {type(pool).__name__}"
                )
            return pool
        with self._lock:
            mine = [e.pool for e in self._pools.values() if not e.internal]
        if len(mine) != 1:
            raise InvalidArgument(
                f"{what}: pages= needs pool= (a PagedPool), unless exactly one pool is "
                f"registered here ({len(mine)} are)"
            )
        return mine[0]

    def unregister(self, pool: PagedPool) -> None:
        """Deregister a pool; rooms still using it fail first.

        Raises:
            InvalidArgument: the pool is not registered here.
        """
        self._call(lambda: self._unregister_pool(pool))

    def rooms(self) -> list[int]:
        """Ids of the rooms open here."""
        return list(self._status)

    def abort(self, room: int, reason: str = "aborted by the application") -> None:
        """Fail the room here and at every peer (which acknowledge it).

        Aborting a room already final changes nothing.

        Raises:
            UnknownRoom: the room is not open here.
        """
        self._call(lambda: self._abort(room, reason))

    def remove(self, room: int) -> None:
        """Forget the room and release its buffers; later messages for it are dropped.

        An unfinished room is aborted first. Views of received data must not
        be used after this.

        Raises:
            UnknownRoom: the room is not open here.
        """
        self._call(lambda: self._remove(room))

    @property
    def stats(self) -> dict[str, int]:
        """Every counter of this endpoint, its transport's included (one place).

        The endpoint's: ``messages_in``, ``messages_out``, ``malformed`` (also
        frames the transport could not read), ``rejected``, ``late`` (for
        removed rooms), ``unknown`` (rooms never seen), ``illegal``,
        ``timeouts``, ``peers_lost``, ``abort_acks``, ``internal_errors``; the
        transport's (``rejected_writes``, ``shm_writes``, ``ucx_writes``, ...)
        as it names them.
        """
        with self._lock:
            counters = dict(self._stats)
        transport = getattr(self._transport, "stats", None)
        for key, value in dict(transport or {}).items():
            if isinstance(value, int) and not isinstance(value, bool):
                counters[key] = counters.get(key, 0) + value
        return counters

    def close(self, timeout: float = 10.0) -> None:
        """Fail unfinished rooms (telling peers), stop the I/O thread, close the transport.

        Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._transport.wakeup()
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Only the owner thread may touch the transport: leave it rather than race it.
            log.error(
                "the %s I/O thread did not stop within %g s; its transport is left open",
                self.side,
                timeout,
            )
            return
        self._transport.close()
        self._teardown()

    def __enter__(self: Any) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands --------------------------------------------------------------------
    def _call(self, fn: Callable[[], Any]) -> Any:
        if threading.current_thread() is self._thread:
            with self._lock:
                return fn()
        if self._closed or not self._thread.is_alive():
            raise EndpointClosed(f"the {self.side} at {self.address} is closed")
        future: Future[Any] = Future()
        self._commands.put((fn, future))
        self._transport.wakeup()
        try:
            return future.result(self._command_timeout)
        except FutureTimeout:
            raise EndpointClosed(
                f"the {self.side}'s I/O thread did not answer within {self._command_timeout:g} s"
            ) from None

    def _here(self) -> bool:
        """Whether an application call may change rooms on its own thread (then the
        lock is held): the endpoint is open and this is not the I/O thread.

        Raises:
            EndpointClosed: the endpoint is closed or its I/O thread stopped.
        """
        if threading.current_thread() is self._thread:
            return False
        if self._closed or not self._thread.is_alive():
            raise EndpointClosed(f"the {self.side} at {self.address} is closed")
        return True

    def _queue(self, peer: str, payload: bytes, what: str, room: int, rec: R) -> None:
        """Leave a room's encoded message (of type ``what``) for the I/O thread (the
        lock is held, any thread)."""
        self._outbox.append((peer, payload, what, room, rec))
        if len(self._outbox) == 1:  # later ones ride on this wake-up
            self._transport.wakeup()

    def _flush(self) -> None:
        """Send what callers queued, in order (the lock is held, on the I/O thread).

        A message for a room that ended or was removed meanwhile is dropped.
        Each peer's messages leave together (``send_many``: one ZMQ message
        for many rooms' bootstraps).
        """
        batches: dict[str, list[tuple[bytes, int, str]]] = {}
        while self._outbox:
            peer, payload, what, room, rec = self._outbox.popleft()
            if self._rooms.get(room) is rec and not rec.state.is_final:
                batches.setdefault(peer, []).append((payload, room, what))
        for peer, batch in batches.items():
            self._send_payloads(peer, batch)

    def _run_commands(self) -> bool:
        """Run what callers queued, for at most :data:`_COMMAND_TURN` seconds; True
        when commands are left for the next turn (which then does not wait)."""
        with self._lock:
            self._flush()
        until = time.monotonic() + _COMMAND_TURN
        while True:
            if time.monotonic() > until:
                return not self._commands.empty()
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return False
            if not future.set_running_or_notify_cancel():
                continue
            try:
                with self._lock:
                    result = fn()
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)
            else:
                future.set_result(result)

    # -- the I/O loop ----------------------------------------------------------------
    def _run(self) -> None:
        """The I/O loop. Each turn: run the callers' commands (bounded in time), read
        and handle what arrived (the transport's progress), then judge time (room
        time-outs, heartbeats, silence): nobody is judged before the turn's input
        was read."""
        try:
            wait = 0.0
            while not self._stop.is_set():
                try:
                    more = self._run_commands()
                    events = self._transport.progress(0.0 if more else wait)
                except Exception:  # never let one bad turn stop the thread
                    self._stats["internal_errors"] += 1
                    log.exception("the %s I/O loop hit an error; it goes on", self.side)
                    self._stop.wait(0.01)  # no hot loop if the error repeats
                    continue
                for event in events:
                    self._dispatch(event)
                try:
                    wait = self._tick()
                except Exception:
                    self._stats["internal_errors"] += 1
                    log.exception("the %s I/O loop hit an error; it goes on", self.side)
                    wait = 0.01
            self._shutdown()
        except Exception:
            log.exception("the %s I/O thread stopped on an error", self.side)
        finally:
            while True:
                try:
                    _, future = self._commands.get_nowait()
                except queue.Empty:
                    break
                future.set_exception(EndpointClosed(f"the {self.side} is closed"))

    def _shutdown(self) -> None:
        with self._lock:
            for room, rec in list(self._rooms.items()):
                if not rec.state.is_final:
                    self._fail(room, rec, f"the {self.side} at {self.address} closed")
        self._run_commands()
        self._transport.progress(0)
        self._warn.flush()  # what the last window left out

    def _dispatch(self, event: object) -> None:
        try:
            with self._lock:
                if isinstance(event, MessageReceived):
                    self._on_payload(event.peer, event.payload, event.trusted)
                elif isinstance(event, WriteDone):
                    target = self._writes.pop(event.write_id, None)
                    if target is not None:
                        self._on_write_done(target[0], target[1], event)
                elif isinstance(event, PeerActive):
                    self._liveness.heard(event.peer, time.monotonic())
                elif isinstance(event, PeerClosed):
                    self._peer_lost(event.peer, event.why, tell=False)
        except Exception:
            self._stats["internal_errors"] += 1
            peer = getattr(event, "peer", None)
            log.exception(  # the event's type and peer, never its payload
                "the %s could not handle a %s from %s", self.side, type(event).__name__, peer
            )

    def _on_payload(self, peer: str, payload: bytes, trusted: bool = True) -> None:
        self._stats["messages_in"] += 1
        try:
            message = decode(payload)
        except MessageError as exc:
            self._stats["malformed"] += 1
            self._warn.warning(
                "malformed message", "dropped a malformed message from %s: %s", peer, exc
            )
            return
        if trusted:  # a decoded message from a connection that proved who sent it
            self._liveness.heard(peer, time.monotonic())
        if isinstance(message, Heartbeat):
            self._send(peer, HeartbeatAck(seq=message.seq))
        elif not isinstance(message, HeartbeatAck):
            self._on_message(peer, message)

    def _tick(self) -> float:
        """Judge time: room time-outs, then (when due) heartbeats and silence. Returns
        how long the next turn may wait for input."""
        now = time.monotonic()
        with self._lock:
            for room, status, limit in list(self._deadlines.expired(now)):
                rec = self._rooms.get(room)
                if rec is not None and rec.state.status is status:
                    self._stats["timeouts"] += 1
                    self._fail(room, rec, f"timed out in {status.name} after {limit:g} s")
            if self._liveness.due(now):
                ping, lost = self._liveness.beat(now, self._unfinished)
                for peer in ping:
                    self._send(peer, Heartbeat(seq=next(self._seq)))
                for verdict in lost:
                    self._lost(verdict)
                for peer in self._liveness.idle(now):  # no room for a long while
                    self._transport.forget(peer)  # its socket, its memory mapped here
            self._on_tick(now)
        return max(0.0, min(0.05, self._liveness.until_due(now)))

    def _unfinished(self, room: int) -> bool:
        rec = self._rooms.get(room)
        return rec is not None and not rec.state.is_final

    def _lost(self, verdict: Lost) -> None:
        """A peer judged silent: its unfinished rooms fail, and it is told (it may be
        alive and merely unreachable for a while: then it fails them too, with the
        same reason, and both sides end the same way)."""
        self._fail_peer_rooms(verdict.peer, verdict.rooms, verdict.why, tell=True)

    def _peer_lost(self, address: str, why: str, *, tell: bool) -> None:
        """``address`` is gone (its transport closed, or another process answers
        there): its unfinished rooms fail; ``tell``: send it their aborts first."""
        self._fail_peer_rooms(address, self._liveness.forget(address), why, tell=tell)

    def _fail_peer_rooms(
        self, address: str, rooms: frozenset[int], why: str, *, tell: bool
    ) -> None:
        affected = [
            r for r in sorted(rooms) if r in self._rooms and not self._rooms[r].state.is_final
        ]
        if affected:
            self._stats["peers_lost"] += 1
            log.warning("peer %s %s: failing %d unfinished rooms", address, why, len(affected))
        else:
            log.debug("peer %s %s", address, why)
        for room in affected:
            # the room's other peers are told in any case; the lost one only if asked
            self._fail(
                room, self._rooms[room], f"peer {address} {why}", exclude=None if tell else address
            )
        self._forget_peer(address)
        self._transport.forget(address)  # no socket kept open to a dead peer (after the aborts)

    # -- room helpers (the lock is held, on the I/O thread) ----------------------------
    def _send(self, peer: str, message: Any) -> None:
        """Send a message; if that fails, the room it concerns fails (no other)."""
        room = getattr(message, "room", None)
        self._send_payload(
            peer, encode(message), room if isinstance(room, int) else None, message.type
        )

    def _send_payload(self, peer: str, payload: bytes, room: int | None, what: str) -> None:
        try:
            self._transport.send(peer, payload)
            self._stats["messages_out"] += 1
        except Exception as exc:  # a transport or socket error: this message is lost
            self._stats["send_errors"] += 1
            self._warn.warning("send failed", "could not send %s to %s: %s", what, peer, exc)
            rec = None if room is None else self._rooms.get(room)
            if room is not None and rec is not None and peer in rec.peers:
                self._fail(room, rec, f"could not send {what} to {peer}: {exc}")

    def _send_payloads(self, peer: str, batch: list[tuple[bytes, int, str]]) -> None:
        """:meth:`_send_payload` for several (payload, room, what) to one peer at once;
        if that fails, each room concerned fails."""
        try:
            self._transport.send_many(peer, [payload for payload, _, _ in batch])
            self._stats["messages_out"] += len(batch)
        except Exception as exc:  # any of them may be lost: each room fails
            self._stats["send_errors"] += 1
            self._warn.warning(
                "send failed", "could not send %d message(s) to %s: %s", len(batch), peer, exc
            )
            for _, room, what in batch:
                rec = self._rooms.get(room)
                if rec is not None and peer in rec.peers:
                    self._fail(room, rec, f"could not send {what} to {peer}: {exc}")

    def _watch(self, room: int, rec: R, peer: str) -> None:
        rec.peers.add(peer)
        self._liveness.watch(peer, room, time.monotonic())

    def _register(self, room: int, rec: R) -> None:
        self._rooms[room] = rec
        self._status[room] = rec.state.status
        self._tombstones.pop(room, None)
        self._deadlines.enter(room, None, rec.state.status, time.monotonic())

    def _step(
        self, room: int, rec: R, event: str, step: Callable[[], object], reason: str | None = None
    ) -> bool:
        """Apply one step of the table; a rejected step fails the room loudly."""
        source = rec.state.status
        try:
            step()
        except IllegalTransition as exc:
            self._stats["illegal"] += 1
            log.error("%s: %s", self.side, exc)
            self._fail(room, rec, f"protocol violation: {exc}")
            return False
        self._moved(room, rec, source, event, reason)
        return True

    def _moved(
        self, room: int, rec: R, source: TransferStatus, event: str, reason: str | None = None
    ) -> None:
        state = rec.state
        now = time.monotonic()
        if rec.ready_at is None and state.status is TransferStatus.WaitingForInput:
            rec.ready_at = now
        self._status[room] = state.status
        self._deadlines.enter(room, source, state.status, now)
        if state.is_final:  # every wait is for an end: other steps wake nobody
            rec.done_at = now
            self._changed.notify_all()
            self._waiter.wake()
        if self._on_status is not None:
            change = StatusChange(
                self.side, room, source, state.status, event, state.sent_tokens, time.time(), reason
            )
            try:
                self._on_status(change)
            except Exception:
                log.exception("an on_status callback failed")
        if state.is_final:
            self._finished(room, rec)

    def _fail(
        self, room: int, rec: R, reason: str, *, tell: bool = True, exclude: str | None = None
    ) -> None:
        if rec.state.is_final:
            return
        source = rec.state.status
        rec.state.failed(reason)
        log.info("%s room %s failed: %s", self.side, room, reason)
        if tell:
            for peer, message in self._abort_messages(room, rec, reason):
                if peer != exclude:
                    self._send(peer, message)
        self._moved(room, rec, source, "failed", reason)

    def _abort(self, room: int, reason: str) -> None:
        rec = self._room(room)
        self._fail(room, rec, reason)

    def _on_abort(self, peer: str, message: Abort) -> None:
        rec = self._rooms.get(message.room)
        if rec is not None and peer in rec.peers and self._session_ok(rec, peer, message):
            self._fail(message.room, rec, f"aborted by {peer}: {message.reason}", exclude=peer)
        else:
            self._stats["late" if message.room in self._tombstones else "unknown"] += 1
        self._send(peer, AbortAck(room=message.room, session=message.session, rank=message.rank))

    def _remove(self, room: int) -> None:
        rec = self._room(room)
        if not rec.state.is_final:
            self._fail(room, rec, "removed by the application")
        self._deadlines.leave(room, rec.state.status)
        del self._rooms[room]
        del self._status[room]
        self._changed.notify_all()
        self._waiter.wake()  # waiters on this room learn it is gone
        self._liveness.unwatch(rec.peers, room)
        self._tombstones[room] = None
        while len(self._tombstones) > _TOMBSTONES:
            self._tombstones.popitem(last=False)
        self._released(room, rec)

    def _drop(self, peer: str, message: Message, why: str) -> None:
        """Count and log a message that is refused without touching any room."""
        room = getattr(message, "room", None)
        if room is not None and room in self._tombstones:
            self._stats["late"] += 1
            log.debug("dropped a late %s for removed room %s from %s", message.type, room, peer)
        else:
            self._stats["rejected"] += 1
            self._warn.warning(
                f"rejected {message.type}", "rejected %s from %s: %s", message.type, peer, why
            )

    def _pool_entry(self, pool: PagedPool) -> Registered:
        entry = self._pools.get(pool.id)
        if entry is None or entry.pool is not pool:
            if entry is not None:
                raise InvalidArgument(f"another pool with id {pool.id} is registered here")
            entry = self._pools[pool.id] = register_pool(self._transport, pool)
        return entry

    def _unregister_pool(self, pool: PagedPool) -> None:
        entry = self._pools.get(pool.id)
        if entry is None or entry.pool is not pool:
            raise InvalidArgument(f"{pool!r} is not registered here")
        for room, rec in list(self._rooms.items()):
            if not rec.state.is_final and self._uses_pool(rec, pool):
                self._fail(room, rec, "its pool was unregistered")
        del self._pools[pool.id]
        entry.release(self._transport)

    def _uses_pool(self, rec: R, pool: PagedPool) -> bool:
        """Whether a room reads or writes ``pool`` (a subclass knows)."""
        return False

    def _room(self, room: int) -> R:
        """The room's record (the lock is held).

        Raises:
            UnknownRoom: the room is not open here.
        """
        rec = self._rooms.get(room)
        if rec is None:
            raise UnknownRoom(room)
        return rec

    # -- hooks -------------------------------------------------------------------------
    def _setup(self) -> None:
        """Prepare a subclass's own state, before the I/O thread starts."""

    def _teardown(self) -> None:
        """Release a subclass's own resources, after the transport closed."""

    def _on_message(self, peer: str, message: Message) -> None:
        raise NotImplementedError

    def _on_write_done(self, room: int, rank: int, done: WriteDone) -> None:
        return None

    def _on_tick(self, now: float) -> None:
        return None

    def _forget_peer(self, address: str) -> None:
        """A peer is gone: drop what was agreed with it (pools offered, ...)."""
        for entry in self._pools.values():
            entry.offered_to.discard(address)

    def _finished(self, room: int, rec: R) -> None:
        """The room reached Success or Failed."""

    def _released(self, room: int, rec: R) -> None:
        """The room was removed."""

    def _abort_messages(self, room: int, rec: R, reason: str) -> list[tuple[str, Abort]]:
        """The abort to send to each peer of the room."""
        raise NotImplementedError

    def _session_ok(self, rec: R, peer: str, message: Abort) -> bool:
        """Whether an abort from ``peer`` belongs to this use of the room."""
        raise NotImplementedError
