"""The KV manager: one kvpoll endpoint per SGLang scheduler rank, over SGLang's pool.

A prefill rank runs a :class:`~kvpoll.Sender`, a decode rank a
:class:`~kvpoll.Receiver`; both register SGLang's KV buffers (and aux rows)
as one :class:`~kvpoll.PagedPool` (see :mod:`.memory`). Each state component
(mamba, SWA, ...: ``KVArgs.state_*``) is a *lane* of its own: a pool over its
buffers (one item per index) and an endpoint of its own, so that a request is
one room per lane, all with the request's bootstrap room. The transport is
kvpoll's configuration's (``kvpoll.toml``, ``KVPOLL_*``), as for any kvpoll
program. Discovery stays SGLang's: prefill ranks register at the bootstrap
server (with their kvpoll address added), decode ranks look them up there.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.common.conn import CommonKVManager
from sglang.srt.disaggregation.utils import DisaggregationMode

from kvpoll.errors import InvalidArgument
from kvpoll.integrations.sglang.memory import describe, pool_from_buffers
from kvpoll.protocol import Receiver, Sender, StatusChange

if TYPE_CHECKING:
    from kvpoll.integrations.sglang.receiver import KvpollKVReceiver
    from kvpoll.integrations.sglang.sender import KvpollKVSender
    from kvpoll.memory import PagedPool

__all__ = ["STATUS_LOG_ENV", "KvpollKVManager", "Lane", "UnsupportedByKvpoll"]

MAX_STATE_LANES = 16
"""State components a rank may register (SGLang models have one to three)."""


@dataclass(frozen=True)
class Lane:
    """One kind of memory a request moves: KV pages (with aux rows), or one state component."""

    name: str
    endpoint: Sender | Receiver
    pool: PagedPool


STATUS_LOG_ENV = "KVPOLL_SGLANG_STATUS_LOG"
"""A path: every step of every KV room is appended to it as a JSON line that
``kvpoll check-trace`` reads; each state lane's rooms go to the same path with
``.state<i>`` before the suffix. ``{side}``, ``{rank}`` and ``{pid}`` in it are
replaced (``/var/log/kvpoll-{side}-{rank}.jsonl``)."""

log = logging.getLogger("kvpoll.integrations.sglang")


class UnsupportedByKvpoll(InvalidArgument):
    """A deployment option the kvpoll backend does not support (yet)."""


def _check_device(server_args: Any) -> None:
    device = str(getattr(server_args, "device", None) or "cuda")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise UnsupportedByKvpoll(
            f"the kvpoll backend moves CPU and CUDA memory; --device {device} is not supported"
        )


class KvpollKVManager(CommonKVManager):  # type: ignore[misc]
    """Registers SGLang's KV and aux buffers with a kvpoll endpoint.

    Members the scheduler uses beyond ``BaseKVManager`` (``kv_args``,
    ``prefill_info_table``, ``try_ensure_parallel_info``, ...) come from
    ``CommonKVManager``. Every room's status is kvpoll's: :meth:`check_status`
    reads it and :meth:`update_status` turns the shared code's writes into
    kvpoll steps (only ``Failed`` and the decode handshake are ever written).

    Raises (at construction):
        UnsupportedByKvpoll: host KV destinations, the ``prefill_complete``
            allocation policy, more than 16 state components, or memory kvpoll
            cannot reach.
    """

    kv_status_msg_tag = b"KVPOLL"  # never sent: kvpoll carries every status itself
    reports_transfer_latency = True
    supports_host_destination = False
    supports_role_switch = True

    def __init__(
        self,
        args: Any,
        disaggregation_mode: DisaggregationMode,
        server_args: Any,
        is_mla_backend: bool | None = False,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            log.debug("kvpoll manager ignores keywords %s", sorted(kwargs))
        states = list(getattr(args, "state_types", None) or [])
        if len(states) > MAX_STATE_LANES:
            raise UnsupportedByKvpoll(f"{len(states)} state components: at most {MAX_STATE_LANES}")
        _check_device(server_args)
        self.kv_pool: PagedPool = pool_from_buffers(
            list(args.kv_data_ptrs),
            list(args.kv_data_lens),
            list(args.kv_item_lens),
            aux_ptrs=list(args.aux_data_ptrs),
            aux_lens=list(args.aux_data_lens),
            aux_item_lens=list(args.aux_item_lens),
        )
        if disaggregation_mode not in (DisaggregationMode.PREFILL, DisaggregationMode.DECODE):
            raise UnsupportedByKvpoll(f"no kvpoll side for mode {disaggregation_mode}")
        prefill = disaggregation_mode == DisaggregationMode.PREFILL
        side, rank = ("sender" if prefill else "receiver"), getattr(args, "engine_rank", 0)
        self._status_logs: list[IO[str]] = []

        def endpoint() -> Sender | Receiver:
            on_status = None
            log_file = _open_status_log(side, rank, len(self._status_logs))
            if log_file is not None:  # one file per lane: each lane's rooms have the same ids
                self._status_logs.append(log_file)
                on_status = functools.partial(_log_status, log_file)
            return Sender(on_status=on_status) if prefill else Receiver(on_status=on_status)

        self.endpoint: Sender | Receiver = endpoint()
        self.lanes: list[Lane] = [Lane("kv", self.endpoint, self.kv_pool)]
        self._adapters: dict[int, KvpollKVSender | KvpollKVReceiver] = {}
        self._adapters_lock = threading.Lock()
        try:
            for i, state in enumerate(states):
                pool = pool_from_buffers(
                    list(args.state_data_ptrs[i]),
                    list(args.state_data_lens[i]),
                    list(args.state_item_lens[i]),
                )
                name = str(getattr(state, "value", state))
                self.lanes.append(Lane(f"state {i} ({name})", endpoint(), pool))
            for lane in self.lanes:
                lane.endpoint.register(lane.pool)
            super().__init__(args, disaggregation_mode, server_args, is_mla_backend)
            if self.defer_decode_allocation:
                raise UnsupportedByKvpoll(
                    "the kvpoll backend needs --disaggregation-decode-allocation-policy early"
                )
        except BaseException:
            self.close()
            raise
        for lane in self.lanes:
            log.info(
                "kvpoll %s (%s) on %s: %s",
                lane.endpoint.side,
                lane.name,
                lane.endpoint.address,
                describe(lane.pool),
            )

    @property
    def state_lanes(self) -> list[Lane]:
        """The lanes of the state components, in ``KVArgs.state_types`` order."""
        return self.lanes[1:]

    # -- discovery ------------------------------------------------------------------
    def _register_topology_row(self, url: str, payload: dict[str, Any]) -> None:
        """Register this prefill rank at the bootstrap server, with its kvpoll address."""
        super()._register_topology_row(
            url,
            {
                **payload,
                "kvpoll_address": self.endpoint.address,
                "kvpoll_state_addresses": [lane.endpoint.address for lane in self.state_lanes],
            },
        )

    # -- rooms ----------------------------------------------------------------------
    def attach(self, room: int, adapter: KvpollKVSender | KvpollKVReceiver) -> None:
        """Route the shared code's status writes for ``room`` to ``adapter``."""
        with self._adapters_lock:
            self._adapters[room] = adapter

    def detach(self, room: int, adapter: KvpollKVSender | KvpollKVReceiver) -> None:
        with self._adapters_lock:
            if self._adapters.get(room) is adapter:
                del self._adapters[room]

    def check_status(self, bootstrap_room: int) -> KVPoll:
        with self._adapters_lock:
            adapter = self._adapters.get(bootstrap_room)
        return KVPoll.Failed if adapter is None else adapter.poll()

    def update_status(self, bootstrap_room: int, status: int) -> None:
        """A status written by SGLang's shared code, applied as a kvpoll step.

        Failed fails the room (with the reason recorded by ``record_failure``);
        WaitingForInput ends a decode handshake; anything else is kvpoll's to
        decide and changes nothing. A room not open here is never created.
        """
        with self._adapters_lock:
            adapter = self._adapters.get(bootstrap_room)
        if adapter is None:
            return
        with self.failure_lock:
            reason = self.failure_records.get(bootstrap_room)
        adapter.shared_code_status(int(status), reason)

    # -- life -------------------------------------------------------------------------
    def teardown(self) -> None:
        """Close the kvpoll endpoint (unfinished rooms fail, peers are told)."""
        self.close()

    def close(self) -> None:
        for lane in getattr(self, "lanes", ()):
            lane.endpoint.close()
        socket = getattr(self, "server_socket", None)
        if socket is not None:
            socket.close(linger=0)
        for log_file in getattr(self, "_status_logs", ()):
            log_file.close()


def _log_status(log_file: IO[str], change: StatusChange) -> None:
    """One step, as a line of a status log (on the I/O thread: one small write)."""
    line = {
        "room": change.room,
        "status": change.dest.name,
        "sent_tokens": change.sent_tokens,
        "side": change.side,
        "event": change.event,
        "at": change.at,
    }
    if change.reason:
        line["reason"] = change.reason
    log_file.write(json.dumps(line) + "\n")


def _open_status_log(side: str, rank: int, lane: int) -> IO[str] | None:
    """The status log of lane ``lane`` (0: KV; state lane i: ``.state<i>`` before the suffix)."""
    path = os.environ.get(STATUS_LOG_ENV)
    if not path:
        return None
    file = Path(path.format(side=side, rank=rank, pid=os.getpid()))
    if lane:
        file = file.with_name(f"{file.stem}.state{lane - 1}{file.suffix}")
    return open(file, "a", buffering=1, encoding="utf-8")
