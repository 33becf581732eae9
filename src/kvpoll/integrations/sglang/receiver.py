"""The decode side of one request: a room of the rank's :class:`~kvpoll.Receiver`.

A decode request lives in two phases, each stepped by kvpoll's table:

1. The handshake, before SGLang has pages for the request: a
   :class:`~kvpoll.TransferState` that is Bootstrapping until ``init()`` has
   found the prefill rank (through SGLang's bootstrap server), then
   WaitingForInput; or Failed.
2. The rooms, from ``send_metadata()``: the receiver's room over the offered
   pages and aux row, and one room per state component with state indices
   (see :mod:`.lanes`). The KV room's own Bootstrapping (its offer on the way
   to the prefill rank) is still "waiting for input" to SGLang; from there the
   status is reported as it is: Transferring, Success once every page, the
   aux row and the state are written, Failed on a time-out, a dead prefill
   rank or an abort.

A status never moves back: phase 1 ends in WaitingForInput (or Failed, and
then there is no phase 2), and phase 2 starts there.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import numpy as np
from sglang.srt.disaggregation.base.conn import KVPoll, KVTransferDestination
from sglang.srt.disaggregation.common.conn import CommonKVReceiver, KVTransferError

from kvpoll.compat.sglang import to_sglang
from kvpoll.errors import DuplicateRoom, IllegalTransition, KvpollError, UnknownRoom
from kvpoll.integrations.sglang.lanes import LaneRooms
from kvpoll.integrations.sglang.manager import KvpollKVManager
from kvpoll.statemachine import TransferState, TransferStatus

__all__ = ["KvpollKVReceiver"]

log = logging.getLogger("kvpoll.integrations.sglang")


def _flat(indices: Any) -> list[int]:
    flat: list[int] = np.asarray(indices, dtype=np.int64).ravel().tolist()
    return flat


class KvpollKVReceiver(CommonKVReceiver):  # type: ignore[misc]
    """One request's KV on the decode side (SGLang's receiver interface)."""

    def __init__(
        self,
        mgr: KvpollKVManager,
        bootstrap_addr: str,
        bootstrap_room: int | None = None,
        **kwargs: Any,
    ) -> None:
        # CommonKVReceiver's constructor writes statuses into its own table: not called.
        self.kv_mgr = mgr
        self.bootstrap_room = bootstrap_room
        self.bootstrap_addr = bootstrap_addr
        self.conclude_state: int | None = None
        self.require_staging = False
        self.abort_notified = False
        self.bootstrap_infos: list[dict[str, Any]] | None = None
        self.init_time: float | None = None
        self._prefill_wait_start: float | None = None
        self._abort_generation: int | None = None
        self._connection_pool_entries: dict[str, list[dict[str, Any]]] = {}
        self._handshake = TransferState(int(bootstrap_room or 0))
        self._opened = False
        self._reason: str | None = None
        self.rooms = LaneRooms(mgr.lanes, int(bootstrap_room or 0))
        self.kvpoll_state_addresses: list[str] = []
        if bootstrap_room is None:
            self._handshake_failed("a kvpoll transfer needs a bootstrap room")
            return
        mgr.attach(bootstrap_room, self)

    @property
    def _receiver(self) -> Any:
        return self.kv_mgr.endpoint

    # -- SGLang's interface --------------------------------------------------------------
    def init(self, prefill_dp_rank: int, **kwargs: Any) -> None:
        """Find the prefill rank(s) for this request at the bootstrap server."""
        if self._handshake.is_final:
            return
        try:
            super().init(prefill_dp_rank)  # SGLang's rank mapping and look-up
        except Exception as exc:  # a look-up that raises must not take the scheduler down
            self._handshake_failed(f"bootstrap look-up failed: {exc}")
            return
        if self._handshake.is_final:
            return
        real = [info for info in self.bootstrap_infos or () if not info.get("is_dummy")]
        if len(real) != 1:
            self._handshake_failed(
                f"this decode rank would receive from {len(real)} prefill ranks; the kvpoll "
                "backend needs exactly one (the same attention TP size on both sides, PP 1)"
            )
            return
        address = real[0].get("kvpoll_address")
        if not isinstance(address, str) or not address:
            self._handshake_failed(
                f"the bootstrap server at {self.bootstrap_addr} gave no kvpoll address: "
                "is the prefill server running the kvpoll transfer backend?"
            )
            return
        states = real[0].get("kvpoll_state_addresses") or []
        if len(states) != len(self.kv_mgr.state_lanes):
            self._handshake_failed(
                f"the prefill rank registered {len(states)} state components and this decode "
                f"rank {len(self.kv_mgr.state_lanes)}: both must serve the same model"
            )
            return
        self.kvpoll_address = address
        self.kvpoll_state_addresses = [str(a) for a in states]
        if self._handshake.status is TransferStatus.Bootstrapping:
            self._handshake.bootstrapped()

    def send_metadata(
        self,
        kv_indices: Any,
        aux_index: int | None = None,
        state_indices: Any = None,
        decode_prefix_len: int | None = None,
        destination: Any = KVTransferDestination.DEVICE,
        **kwargs: Any,
    ) -> None:
        """Open the room over these pages and this aux row: the prefill may write."""
        if self.conclude_state is not None or self._handshake.is_final or self._opened:
            return
        if self._handshake.status is not TransferStatus.WaitingForInput:
            self._handshake_failed("send_metadata() before init() found the prefill rank")
            return
        unsupported = self._unsupported(decode_prefix_len, destination)
        if unsupported:
            self._handshake_failed(unsupported)
            return
        given = list(state_indices) if state_indices is not None else []
        if len(given) > len(self.kv_mgr.state_lanes):
            self._handshake_failed(
                f"{len(given)} state components offered, {len(self.kv_mgr.state_lanes)} registered"
            )
            return
        room = int(self.bootstrap_room)  # type: ignore[arg-type]
        offers: list[tuple[int, list[int], int | None]] = [(0, _flat(kv_indices), aux_index)]
        for i, indices in enumerate(given, start=1):
            if indices is not None and len(_flat(indices)):
                offers.append((i, _flat(indices), None))
        try:
            for lane, pages, aux in offers:
                self._open(lane, room, pages, aux)
        except KvpollError as exc:
            self.rooms.abort(f"cannot open room {room}: {exc}")
            self.rooms.remove()
            self._handshake_failed(f"cannot open room {room}: {exc}")
            return
        self._opened = True
        self.init_time = time.time()

    def poll(self) -> int:
        if self.conclude_state is not None:
            return self.conclude_state
        if not self._opened:
            status = self._handshake.status
        else:
            try:
                status = self._receiver.poll(self.bootstrap_room)
            except UnknownRoom:
                self._reason = self._reason or "the room was removed"
                status = TransferStatus.Failed
            if status is TransferStatus.Bootstrapping:
                status = TransferStatus.WaitingForInput  # the offer is on its way (phase 2)
            status = self.rooms.combined(status)
        if status.is_final:
            self.conclude_state = to_sglang(status)
            if status is TransferStatus.Failed and self._opened:
                self._reason = self._reason or self.rooms.failure()
                self.rooms.abort(self._reason or "another lane of the request failed")
        return to_sglang(status)

    def failure_exception(self) -> None:
        reason = self.reason()
        self.conclude_state = KVPoll.Failed
        self.clear()
        raise KVTransferError(self.bootstrap_room, reason)

    def abort(self) -> None:
        """Fail the request here and at the prefill rank (it is told at once)."""
        self._fail("aborted by the decode scheduler (AbortReq)")
        self.abort_notified = True

    def ensure_abort_notified(self, *, force_arm: bool = False) -> None:
        """The prefill rank hears of every failure from kvpoll itself: nothing more to send."""
        self.abort_notified = True

    def is_abort_release_safe(self) -> bool:
        """True once the room is final: kvpoll writes only device pages it was offered."""
        return self.poll() in (KVPoll.Failed, KVPoll.Success)

    @property
    def supports_host_destination(self) -> bool:
        return False

    def clear(self) -> None:
        """Forget the room (its record and table entry); late messages are dropped."""
        if self.conclude_state is None:
            self.poll()
        if self.bootstrap_room is not None:
            self.kv_mgr.detach(self.bootstrap_room, self)
        self.rooms.remove()

    # -- SGLang's shared code ---------------------------------------------------------------
    def _register_kv_args(self) -> bool:
        """Nothing to register: kvpoll offers the pool with the first room."""
        return bool(self.bootstrap_infos is not None)

    def shared_code_status(self, status: int, reason: str | None) -> None:
        if status == KVPoll.Failed:
            self._fail(reason or "failed by SGLang's shared code")

    # -- kvpoll's side -------------------------------------------------------------------------
    def reason(self) -> str:
        """Why the request failed (kvpoll's reason, or SGLang's recorded one)."""
        with self.kv_mgr.failure_lock:
            recorded = self.kv_mgr.failure_records.pop(self.bootstrap_room, None)
        if self._reason is None and self._opened:
            self._reason = self.rooms.failure()
        return self._reason or self._handshake.reason or recorded or "the transfer failed"

    def _open(self, lane: int, room: int, pages: list[int], aux_index: int | None) -> None:
        """Open the room on ``lane`` toward the prefill rank's endpoint of that lane."""
        endpoint = self.rooms.endpoint(lane)
        sender = self.kvpoll_address if lane == 0 else self.kvpoll_state_addresses[lane - 1]
        pool = self.kv_mgr.lanes[lane].pool
        try:
            endpoint.open(room, sender, pool=pool, pages=pages, aux_index=aux_index)
        except DuplicateRoom:
            if not endpoint.poll(room).is_final:
                raise
            endpoint.remove(room)  # left by an earlier request
            endpoint.open(room, sender, pool=pool, pages=pages, aux_index=aux_index)
        self.rooms.open[lane] = True

    @staticmethod
    def _unsupported(decode_prefix_len: int | None, destination: Any) -> str:
        if decode_prefix_len:
            return "a decode-side prefix cache hit is not supported by the kvpoll backend yet"
        if destination != KVTransferDestination.DEVICE:
            return "host KV destinations are not supported by the kvpoll backend"
        return ""

    def _fail(self, reason: str) -> None:
        """Fail the request (and its room, telling the prefill) unless it is final."""
        if not self._opened:
            self._handshake_failed(reason)
            return
        self._reason = reason
        self.rooms.abort(reason)
        self.poll()

    def _handshake_failed(self, reason: str) -> None:
        with contextlib.suppress(IllegalTransition):  # final already: keeps its outcome
            self._handshake.failed(reason)
        self._reason = self._reason or reason
        self.poll()
