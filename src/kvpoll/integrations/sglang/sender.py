"""The prefill side of one request: a room of the rank's :class:`~kvpoll.Sender`.

SGLang's calls map onto kvpoll's one to one: construction opens the room
(Bootstrapping) on every lane; the decode rank's ``send_metadata`` bootstraps
them (WaitingForInput); ``send`` hands each prefill chunk's pages, the last
one with the request's aux row and its state indices; the room reaches
Success when everything is written, Transferring while data waits for decode
memory, Failed on a time-out, a dead peer or an abort. ``poll`` reports
kvpoll's status in SGLang's codes (over the lanes: see :mod:`.lanes`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from sglang.srt.disaggregation.base.conn import KVPoll, KVTransferMetric
from sglang.srt.disaggregation.common.conn import CommonKVSender, KVTransferError

from kvpoll.compat.sglang import to_sglang
from kvpoll.errors import DuplicateRoom, KvpollError, UnknownRoom
from kvpoll.integrations.sglang.lanes import LaneRooms
from kvpoll.integrations.sglang.manager import KvpollKVManager
from kvpoll.statemachine import TransferStatus

__all__ = ["KvpollKVSender"]

log = logging.getLogger("kvpoll.integrations.sglang")


class KvpollKVSender(CommonKVSender):  # type: ignore[misc]
    """One request's KV (and state) on the prefill side (SGLang's sender interface)."""

    def __init__(
        self,
        mgr: KvpollKVManager,
        bootstrap_addr: str,
        bootstrap_room: int,
        req_has_disagg_prefill_dp_rank: bool = False,
        **kwargs: Any,
    ) -> None:
        # CommonKVSender's constructor writes statuses into its own table: not called.
        self.kv_mgr = mgr
        self.bootstrap_room = bootstrap_room
        self.bootstrap_server_url = bootstrap_addr
        self.aux_index: int | None = None
        self.num_kv_indices: int | None = None
        self.curr_idx = 0
        self.conclude_state: int | None = None
        self.init_time: float | None = None
        self._early_send_wait_event: Any = None
        self._transfer_metric = KVTransferMetric()
        self._reason: str | None = None
        self.rooms = LaneRooms(mgr.lanes, bootstrap_room)
        try:
            for lane in range(len(mgr.lanes)):
                self._add(lane)
        except KvpollError as exc:
            self.rooms.remove()
            self._conclude_failed(f"cannot open room {bootstrap_room}: {exc}")
            return
        mgr.attach(bootstrap_room, self)

    def _add(self, lane: int) -> None:
        endpoint, room = self.rooms.endpoint(lane), self.bootstrap_room
        try:
            endpoint.add(room)
        except DuplicateRoom:
            if not endpoint.poll(room).is_final:
                raise
            endpoint.remove(room)  # left by an earlier request
            endpoint.add(room)
        self.rooms.open[lane] = True

    # -- SGLang's interface --------------------------------------------------------------
    def init(self, num_kv_indices: int, aux_index: int | None = None, **kwargs: Any) -> None:
        self.num_kv_indices = int(num_kv_indices)
        self.aux_index = aux_index
        self.init_time = time.time()

    def send(
        self,
        kv_indices: Any,
        state_indices: Any = None,
        num_kv_tokens: int | None = None,
        **kwargs: Any,
    ) -> None:
        if self.conclude_state is not None:
            return
        if self.num_kv_indices is None:
            self._fail("send() before init(): SGLang's call order was not followed")
            return
        pages = np.asarray(kv_indices, dtype=np.int64).reshape(-1)
        self.curr_idx += len(pages)
        is_last = self.curr_idx >= self.num_kv_indices
        room = self.bootstrap_room
        try:
            if len(pages) or is_last:
                self.rooms.endpoint(0).send(
                    room,
                    pages=pages.tolist(),
                    pool=self.kv_mgr.kv_pool,
                    is_last=is_last,
                    aux_index=self.aux_index if is_last else None,
                )
            if is_last:
                self._send_state(state_indices)
        except KvpollError as exc:
            self._fail(f"send() of {len(pages)} pages refused: {exc}")

    def _send_state(self, state_indices: Any) -> None:
        """Each state component's indices, on its lane; a lane without any is closed."""
        given = list(state_indices) if state_indices is not None else []
        lanes = self.kv_mgr.state_lanes
        if len(given) > len(lanes):
            raise KvpollError(
                f"{len(given)} state components sent, but {len(lanes)} were registered"
            )
        for i, lane in enumerate(lanes, start=1):
            indices = given[i - 1] if i - 1 < len(given) else None
            flat: list[int] = (
                [] if indices is None else np.asarray(indices, dtype=np.int64).ravel().tolist()
            )
            if not flat:
                self.rooms.remove(i)  # nothing of this component for this request
                continue
            self.rooms.endpoint(i).send(
                self.bootstrap_room, pages=flat, pool=lane.pool, is_last=True
            )

    def poll(self) -> int:
        if self.conclude_state is not None:
            return int(self.conclude_state)
        try:
            kv = self.rooms.endpoint(0).poll(self.bootstrap_room)
        except UnknownRoom:
            self._conclude_failed(self._reason or "the room was removed")
            return int(KVPoll.Failed)
        status = self.rooms.combined(kv)
        if status.is_final:
            self._conclude(status)
        return to_sglang(status)

    def poll_pp_consensus(self) -> int:
        return self.poll()

    def should_send_kv_chunk(self, num_pages: int, last_chunk: bool) -> bool:
        return num_pages > 0 or last_chunk

    def get_max_transfer_tokens(self) -> int | None:
        return None

    def pop_decode_prefix_len(self) -> int:
        return 0

    def mark_prefill_complete(self) -> None:
        """Nothing to publish: decode allocates early with this backend."""

    def get_transfer_metric(self) -> KVTransferMetric:
        return self._transfer_metric

    def failure_exception(self) -> None:
        reason = self.reason()
        self.conclude_state = KVPoll.Failed
        self.clear()
        raise KVTransferError(self.bootstrap_room, reason)

    def abort(self) -> None:
        """Fail the request here and at the decode rank (it is told at once)."""
        self._fail("aborted by the prefill scheduler (AbortReq)")

    def clear(self) -> None:
        """Forget the rooms (records and table entries); late messages are dropped."""
        if self.conclude_state is None:
            self.poll()
        self.kv_mgr.detach(self.bootstrap_room, self)
        self.rooms.remove()

    # -- kvpoll's side ---------------------------------------------------------------------
    def reason(self) -> str:
        """Why the request failed (kvpoll's reason, or SGLang's recorded one)."""
        with self.kv_mgr.failure_lock:
            recorded = self.kv_mgr.failure_records.pop(self.bootstrap_room, None)
        self._reason = self._reason or self.rooms.failure()
        return self._reason or recorded or "the transfer failed"

    def shared_code_status(self, status: int, reason: str | None) -> None:
        if status == KVPoll.Failed:
            self._fail(reason or "failed by SGLang's shared code")

    def _fail(self, reason: str) -> None:
        """Fail the request (telling the decode rank) unless it is final already."""
        if self.conclude_state is not None:
            return
        self._reason = reason
        self.rooms.abort(reason)
        self.poll()

    def _conclude(self, status: TransferStatus) -> None:
        self.conclude_state = to_sglang(status)
        if status is TransferStatus.Failed:
            self._reason = self._reason or self.rooms.failure()
            self.rooms.abort(self._reason or "another lane of the request failed")
        moved, bootstrap, transfer = self.rooms.totals()
        self._transfer_metric = KVTransferMetric(
            transfer_latency_s=transfer,
            alloc_latency_s=bootstrap,
            transfer_total_bytes=moved,
        )

    def _conclude_failed(self, reason: str) -> None:
        self._reason = self._reason or reason
        self.conclude_state = KVPoll.Failed
