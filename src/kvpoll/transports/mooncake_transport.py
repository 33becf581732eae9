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
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from kvpoll.transports.base import Capabilities, TransportError
from kvpoll.transports.engine import EngineTransport, EngineWrite

os.environ.setdefault("MC_LOG_LEVEL", "ERROR")  # the engine logs every connection at INFO
try:
    from mooncake.engine import TransferEngine
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(str(exc), name="mooncake-transfer-engine-non-cuda") from exc

__all__ = ["MooncakeTransport"]

log = logging.getLogger("kvpoll.transports.mooncake")

_DONE, _PENDING = 1, 0


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
        max_idle_pool_bytes: idle pooled receive buffers kept for reuse.
    """

    name: ClassVar[str] = "mooncake"
    capabilities: ClassVar[Capabilities] = Capabilities(
        zero_copy=True, same_host_only=False, device_memory=False
    )

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
        )

    def _register(self, data: torch.Tensor) -> tuple[Any, dict[str, Any]]:
        address, nbytes = int(data.data_ptr()), data.numel()
        if self._engine.register_memory(address, nbytes) != 0:
            raise TransportError(f"Mooncake could not register {nbytes} bytes at {address:#x}")
        return address, {"mooncake_session": self._session, "addr": address}

    def _unregister(self, handle: Any) -> None:
        if self._engine.unregister_memory(int(handle)) != 0:
            log.warning("Mooncake could not unregister memory at %#x", handle)

    def _start(self, writes: Sequence[EngineWrite]) -> Any:
        """Every range submitted at once, then polled together."""
        handles: list[int] = []
        for write in writes:
            try:
                session = str(write.dst.extra["mooncake_session"])
                remote = int(write.dst.extra["addr"]) + write.dst_offset
            except (KeyError, ValueError, TypeError) as exc:
                raise TransportError(f"{write.dst!r} is not a mooncake region: {exc}") from exc
            batch = self._engine.transfer_submit_write(
                session, write.src_address, remote, write.nbytes
            )
            if batch < 0:
                raise TransportError(f"Mooncake refused a write to {session}")
            handles.append(batch)
        return handles

    def _poll(self, handle: Any) -> tuple[bool, str | None]:
        waiting: list[int] = []
        error = None
        for batch in handle:
            status = self._engine.transfer_check_status(batch)
            if status == _PENDING:
                waiting.append(batch)
            elif status != _DONE:
                error = f"Mooncake reported a write failed (status {status})"
        handle[:] = waiting
        if waiting and error is None:
            return False, None
        return True, error

    def _close_engine(self) -> None:
        del self._engine
