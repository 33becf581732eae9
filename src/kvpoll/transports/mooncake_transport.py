"""``mooncake``: Mooncake's transfer engine as a kvpoll transport.

The engine writes one-sided into a peer's registered memory over the protocol
it is given (``tcp`` here; ``rdma`` on clusters with verbs devices). Its peers
find each other by the engine's own handshake (``P2PHANDSHAKE``: no metadata
server). Control messages and write grants travel over ZMQ (see
:mod:`kvpoll.transports.engine`).

The ``mooncake-transfer-engine-non-cuda`` wheel needs Debian's ``libibverbs1
libnl-3-200 libnl-route-3-200`` even when it only speaks TCP.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from kvpoll.transports.base import Capabilities, TransportError
from kvpoll.transports.engine import EngineTransport
from kvpoll.transports.inflight import Limits
from kvpoll.transports.spans import SpanBatch

os.environ.setdefault("MC_LOG_LEVEL", "ERROR")  # the engine logs every connection at INFO
try:
    from mooncake.engine import TransferEngine
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(str(exc), name="mooncake-transfer-engine-non-cuda") from exc

__all__ = ["MooncakeTransport"]

log = logging.getLogger("kvpoll.transports.mooncake")

_DONE, _PENDING = 1, 0
IN_FLIGHT = 256
"""Ranges of one batch submitted to the engine at once."""


@dataclass
class _Batch:
    todo: list[tuple[str, int, int, int]]  # session, source and remote address, bytes
    running: list[int] = field(default_factory=list)
    error: str | None = None

    def __post_init__(self) -> None:
        self.todo.reverse()  # popped from the end: submitted in order


class MooncakeTransport(EngineTransport):
    """Mooncake transfer-engine data path, ZMQ control channel.

    Args:
        host, port, advertise: where the control channel listens (as for ``zmq``);
            the engine listens on ``advertise or host`` too, on a port of its own.
        protocol: the engine's protocol (``tcp``, or ``rdma`` where verbs exist).
        device_name: RDMA devices for ``rdma`` (empty: the engine's choice).
        metadata_server: ``P2PHANDSHAKE`` (peers handshake directly) or the
            address of a Mooncake metadata server.
        write_timeout: seconds before a write that has not finished fails.
        max_peers, max_queued, secret_file: the control channel's limits and
            cluster secret (as for ``zmq``; see docs/security.md).
        max_idle_pool_bytes: idle pooled receive buffers kept for reuse.
    """

    name: ClassVar[str] = "mooncake"
    capabilities: ClassVar[Capabilities] = Capabilities(
        zero_copy=True, same_host_only=False, device_memory=False, notices=True
    )
    in_flight: ClassVar[Limits] = Limits(
        peer_ranges=1024, peer_bytes=1 << 30, ranges=4096, bytes=4 << 30
    )
    """The engine's TCP transport queues a peer's transfers and fails those past
    its queue ("TCP lane queue-full rejection"); measured here (0.3.13.post1,
    one process writing to another engine, 4 KiB to 256 KiB each): 2,048 at
    once always landed, 3,072 to 3,584 at once began to fail, and 4,096 failed
    1,631 and left 1,024 pending for good. A writer keeps half of the safe
    figure in flight to a peer (a batch larger than that goes alone, submitted
    ``IN_FLIGHT`` ranges at a time)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise: str | None = None,
        protocol: str = "tcp",
        device_name: str = "",
        metadata_server: str = "P2PHANDSHAKE",
        write_timeout: float = 30.0,
        max_idle_pool_bytes: int = 4 << 30,
        max_peers: int = 1024,
        max_queued: int = 10_000,
        secret_file: str | None = None,
    ) -> None:
        engine_host = advertise or host
        self._engine = TransferEngine()
        status = self._engine.initialize(engine_host, metadata_server, protocol, device_name)
        if status != 0:
            raise TransportError(
                f"the Mooncake engine could not start ({protocol} on {engine_host}, "
                f"metadata {metadata_server}): status {status}"
            )
        self._session = f"{engine_host}:{self._engine.get_rpc_port()}"
        super().__init__(
            host=host,
            port=port,
            advertise=advertise,
            write_timeout=write_timeout,
            max_idle_pool_bytes=max_idle_pool_bytes,
            max_peers=max_peers,
            max_queued=max_queued,
            secret_file=secret_file,
        )

    def _register(self, data: torch.Tensor) -> tuple[Any, dict[str, Any]]:
        address, nbytes = int(data.data_ptr()), data.numel()
        if self._engine.register_memory(address, nbytes) != 0:
            raise TransportError(f"Mooncake could not register {nbytes} bytes at {address:#x}")
        return address, {"mooncake_session": self._session, "addr": address}

    def _unregister(self, handle: Any) -> None:
        if self._engine.unregister_memory(int(handle)) != 0:
            log.warning("Mooncake could not unregister memory at %#x", handle)

    def _start(self, batch: SpanBatch) -> Any:
        """Submit the batch's ranges, at most ``IN_FLIGHT`` at once (the engine
        fails writes beyond its own limit), and poll them together."""
        try:
            sessions = {at: str(batch.pairs[at][1].extra["mooncake_session"]) for at in batch.used}
            sources, remote, nbytes = self._addresses(batch)
        except (KeyError, ValueError, TypeError, OverflowError) as exc:
            raise TransportError(f"{batch[0].dst!r} is not a mooncake region: {exc}") from exc
        todo = [
            (sessions[p], src, dst, n)
            for p, src, dst, n in zip(
                batch.pair.tolist(), _ints(sources), _ints(remote), _ints(nbytes), strict=True
            )
        ]
        running = _Batch(todo)
        self._submit(running)
        return running

    def _submit(self, batch: _Batch) -> None:
        while batch.todo and len(batch.running) < IN_FLIGHT:
            session, src, remote, nbytes = batch.todo.pop()
            handle = self._engine.transfer_submit_write(session, src, remote, nbytes)
            if handle < 0:
                raise TransportError(f"Mooncake refused a write to {session}")
            batch.running.append(handle)

    def _poll(self, handle: Any) -> tuple[bool, str | None]:
        batch: _Batch = handle
        waiting: list[int] = []
        for submitted in batch.running:
            status = self._engine.transfer_check_status(submitted)
            if status == _PENDING:
                waiting.append(submitted)
            elif status != _DONE and batch.error is None:
                batch.error = f"Mooncake reported a write failed (status {status})"
        batch.running = waiting
        if batch.error is None and batch.todo:
            try:
                self._submit(batch)
            except TransportError as exc:
                batch.error = str(exc)
        if batch.running or (batch.todo and batch.error is None):
            return False, None
        return True, batch.error

    def _close_engine(self) -> None:
        del self._engine


def _ints(column: Any) -> list[int]:
    """A column of :meth:`EngineTransport._addresses` as Python ints."""
    return column.tolist() if isinstance(column, np.ndarray) else list(column)
