"""The prefill side of one request: a room of the rank's :class:`~kvpoll.Sender`.

SGLang's calls map onto kvpoll's one to one: construction opens the room
(Bootstrapping); the decode rank's ``send_metadata`` bootstraps it
(WaitingForInput); ``send`` hands each prefill chunk's pages, the last one
with the request's aux row; the room reaches Success when everything is
written, Transferring while data waits for decode memory, Failed on a
time-out, a dead peer or an abort. ``poll`` reports kvpoll's status in
SGLang's codes and nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import numpy as np
from sglang.srt.disaggregation.base.conn import KVPoll, KVTransferMetric
from sglang.srt.disaggregation.common.conn import CommonKVSender, KVTransferError

from kvpoll.compat.sglang import to_sglang
from kvpoll.errors import DuplicateRoom, KvpollError, UnknownRoom
from kvpoll.integrations.sglang.manager import KvpollKVManager
from kvpoll.statemachine import TransferStatus

__all__ = ["KvpollKVSender"]

log = logging.getLogger("kvpoll.integrations.sglang")


class KvpollKVSender(CommonKVSender):  # type: ignore[misc]
    """One request's KV on the prefill side (SGLang's sender interface)."""

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
        endpoint = self._sender
        try:
            try:
                endpoint.add(bootstrap_room)
            except DuplicateRoom:
                if endpoint.poll(bootstrap_room).is_final:  # left by an earlier request
                    endpoint.remove(bootstrap_room)
                    endpoint.add(bootstrap_room)
                else:
                    raise
        except KvpollError as exc:
            self._conclude_failed(f"cannot open room {bootstrap_room}: {exc}")
            return
        mgr.attach(bootstrap_room, self)

    @property
    def _sender(self) -> Any:
        return self.kv_mgr.endpoint

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
        if state_indices is not None and any(s is not None and len(s) for s in state_indices):
            self._fail("state indices were sent, but the kvpoll backend moves no state buffers")
            return
        if not len(pages) and not is_last:
            return
        try:
            self._sender.send(
                self.bootstrap_room,
                pages=pages.tolist(),
                pool=self.kv_mgr.kv_pool,
                is_last=is_last,
                aux_index=self.aux_index if is_last else None,
            )
        except KvpollError as exc:
            self._fail(f"send() of {len(pages)} pages refused: {exc}")

    def poll(self) -> int:
        if self.conclude_state is not None:
            return int(self.conclude_state)
        try:
            status = self._sender.poll(self.bootstrap_room)
        except UnknownRoom:
            self._conclude_failed(self._reason or "the room was removed")
            return int(KVPoll.Failed)
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
        """Fail the room here and at the decode rank (it is told at once)."""
        self._fail("aborted by the prefill scheduler (AbortReq)")

    def clear(self) -> None:
        """Forget the room (its record and table entry); late messages are dropped."""
        if self.conclude_state is None:
            self.poll()
        self.kv_mgr.detach(self.bootstrap_room, self)
        with contextlib.suppress(UnknownRoom, KvpollError):
            self._sender.remove(self.bootstrap_room)

    # -- kvpoll's side ---------------------------------------------------------------------
    def reason(self) -> str:
        """Why the room failed (kvpoll's reason, or SGLang's recorded one)."""
        with self.kv_mgr.failure_lock:
            recorded = self.kv_mgr.failure_records.pop(self.bootstrap_room, None)
        if self._reason is None:
            with contextlib.suppress(UnknownRoom):
                self._reason = self._sender.info(self.bootstrap_room).reason
        return self._reason or recorded or "the transfer failed"

    def shared_code_status(self, status: int, reason: str | None) -> None:
        if status == KVPoll.Failed:
            self._fail(reason or "failed by SGLang's shared code")

    def _fail(self, reason: str) -> None:
        """Fail the room (telling the decode rank) unless it is final already."""
        if self.conclude_state is not None:
            return
        self._reason = reason
        try:
            if not self._sender.poll(self.bootstrap_room).is_final:
                self._sender.abort(self.bootstrap_room, reason)
        except UnknownRoom:
            pass
        self.poll()

    def _conclude(self, status: TransferStatus) -> None:
        self.conclude_state = to_sglang(status)
        try:
            info = self._sender.info(self.bootstrap_room)
        except UnknownRoom:
            return
        if status is TransferStatus.Failed:
            self._reason = self._reason or info.reason
        metrics = info.metrics
        self._transfer_metric = KVTransferMetric(
            transfer_latency_s=metrics.transfer_s,
            alloc_latency_s=metrics.bootstrap_s,
            transfer_total_bytes=metrics.bytes_moved,
        )

    def _conclude_failed(self, reason: str) -> None:
        self._reason = self._reason or reason
        self.conclude_state = KVPoll.Failed
