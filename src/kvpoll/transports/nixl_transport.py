"""``nixl``: NVIDIA's NIXL transfer library (its UCX backend) as a kvpoll transport.

NIXL writes one-sided into a peer's registered memory; with the UCX it bundles,
that is shared memory or cma on one host, TCP across hosts, and InfiniBand
RDMA where the cluster has it. Control messages and write grants travel over
ZMQ (see :mod:`kvpoll.transports.engine`).

Each region's descriptor carries the NIXL agent name and that region's partial
agent metadata (connection info included), so a writer loads exactly what it
needs the first time it writes to a region, with no separate exchange.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from kvpoll.transports.base import Capabilities, TransportError
from kvpoll.transports.engine import EngineTransport
from kvpoll.transports.inflight import Limits
from kvpoll.transports.spans import SpanBatch

os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
if not any(Path("/sys/class/infiniband").glob("*")):
    # No RDMA device here. NIXL's bundled UCX would still load its EFA module
    # wherever the system has libefa (Debian's libibverbs1, which Mooncake
    # needs): that pulls the system's libibverbs and libnl beside NIXL's own
    # copies, and the process then crashes at exit (SIGSEGV in libnl-route's
    # destructor). With no device, the module has nothing to offer.
    os.environ.setdefault("UCX_MODULES", "^efa")
try:
    try:
        import nixl_cu12._api as nixl_api
        import nixl_cu12._bindings as nixl_bindings
    except ImportError:
        import nixl._api as nixl_api  # type: ignore[no-redef]
        import nixl._bindings as nixl_bindings
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(str(exc), name="nixl-cu12") from exc

__all__ = ["NixlTransport", "make_agent"]

log = logging.getLogger("kvpoll.transports.nixl")
_CONSTRUCTING = threading.Lock()


@contextlib.contextmanager
def _progress_delay(microseconds: int) -> Iterator[None]:
    """Make agents built inside use ``microseconds`` between progress-thread rounds.

    NIXL's Python wrapper hard-codes a delay of 0, so its progress thread spins
    a whole core even when idle (measured: 2.0 s of CPU in 2 s idle; 0.04 s
    with 100 us). The wrapper offers no option, so the config class it builds
    is swapped, for the duration of one construction, for one that keeps ours.
    """
    bindings = nixl_bindings  # the module the wrapper knows as nixlBind
    base = bindings.nixlAgentConfig

    class _Config(base):  # type: ignore[misc, valid-type]
        @property
        def pthrDelay(self) -> int:  # noqa: N802 - NIXL's attribute name
            return int(base.pthrDelay.__get__(self))

        @pthrDelay.setter
        def pthrDelay(self, _value: int) -> None:  # noqa: N802
            base.pthrDelay.__set__(self, microseconds)

    with _CONSTRUCTING:
        bindings.nixlAgentConfig = _Config
        try:
            yield
        finally:
            bindings.nixlAgentConfig = base


def make_agent(
    name: str,
    *,
    backends: list[str] | None = None,
    progress_thread: bool = True,
    progress_delay_us: int = 100,
) -> Any:
    """A NIXL agent whose progress thread (if any) sleeps between rounds.

    Raises:
        TransportError: NIXL could not start.
    """
    try:
        config = nixl_api.nixl_agent_config(
            enable_prog_thread=progress_thread, backends=list(backends or ["UCX"])
        )
        with _progress_delay(progress_delay_us):
            return nixl_api.nixl_agent(name, config)
    except Exception as exc:  # NIXL raises its own classes (nixlBackendError, ...)
        raise TransportError(f"NIXL could not start: {exc}") from exc


class NixlTransport(EngineTransport):
    """NIXL (UCX backend) data path, ZMQ control channel.

    Args:
        host, port, advertise: where the control channel listens (as for ``zmq``).
        backends: NIXL backends to create (default ``["UCX"]``).
        progress_thread: let NIXL run its own progress thread (needed for
            transports where the target must make progress, such as TCP).
        progress_delay_us: microseconds the progress thread sleeps between
            rounds (NIXL's Python default, 0, spins a core even when idle).
        write_timeout: seconds before a write that has not finished fails.
        max_peers, max_queued, secret_file: the control channel's limits and
            cluster secret (as for ``zmq``; see docs/security.md).
        max_idle_pool_bytes: idle pooled receive buffers kept for reuse.
    """

    name: ClassVar[str] = "nixl"
    capabilities: ClassVar[Capabilities] = Capabilities(
        zero_copy=True, same_host_only=False, device_memory=False, notices=True
    )
    in_flight: ClassVar[Limits] = Limits(
        peer_ranges=16384, peer_bytes=1 << 30, ranges=65536, bytes=4 << 30
    )
    """Descriptors of NIXL transfers posted at once (each batch is one transfer
    whose descriptor list holds its ranges). Measured here (nixl-cu12 1.5.1,
    UCX backend, 64-byte ranges): 1,000 transfers of 1,000 descriptors posted
    at once all landed, over shared memory and over TCP: no queue of NIXL's
    overflowed. The bound keeps what a burst pins in NIXL and UCX (and the
    poll of running transfers each turn) small, not an engine limit."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise: str | None = None,
        backends: list[str] | None = None,
        progress_thread: bool = True,
        progress_delay_us: int = 100,
        write_timeout: float = 30.0,
        max_idle_pool_bytes: int = 4 << 30,
        max_peers: int = 1024,
        max_queued: int = 10_000,
        secret_file: str | None = None,
    ) -> None:
        if progress_delay_us < 0:
            raise TransportError(f"progress_delay_us must be >= 0, not {progress_delay_us}")
        self._agent_name = f"kvpoll-{os.getpid()}-{secrets.token_hex(6)}"
        self._agent = make_agent(
            self._agent_name,
            backends=backends,
            progress_thread=progress_thread,
            progress_delay_us=progress_delay_us,
        )
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
        self._loaded: set[tuple[str, int]] = set()  # (agent, region id) metadata loaded
        self._remote_agents: set[str] = set()

    def _register(self, data: torch.Tensor) -> tuple[Any, dict[str, Any]]:
        address, nbytes = int(data.data_ptr()), data.numel()
        try:
            registration = self._agent.register_memory([(address, nbytes, 0, "")], "DRAM")
            metadata = self._agent.get_partial_agent_metadata(registration, inc_conn_info=True)
        except Exception as exc:
            raise TransportError(f"NIXL could not register {nbytes} bytes: {exc}") from exc
        reach = {"nixl_agent": self._agent_name, "nixl_metadata": metadata.hex(), "addr": address}
        return registration, reach

    def _unregister(self, handle: Any) -> None:
        try:
            self._agent.deregister_memory(handle)
        except Exception as exc:
            log.warning("NIXL could not deregister memory: %s", exc)

    def _start(self, batch: SpanBatch) -> Any:
        """One NIXL transfer whose descriptor lists hold every range of the batch."""
        first = batch[0].dst
        try:
            agent = str(first.extra["nixl_agent"])
            for at in batch.used:
                dst = batch.pairs[at][1]
                extra = dst.extra
                if str(extra["nixl_agent"]) != agent:
                    raise ValueError("the ranges of one batch name two NIXL agents")
                key = (agent, dst.region_id)
                if key not in self._loaded:
                    self._agent.add_remote_agent(bytes.fromhex(str(extra["nixl_metadata"])))
                    self._loaded.add(key)
                    self._remote_agents.add(agent)
            src, dst, nbytes = self._addresses(batch)
            zeros = [0] * len(batch)  # the device id of host memory
            local = np.array([src, nbytes, zeros], dtype=np.uint64).T.copy()
            remote = np.array([dst, nbytes, zeros], dtype=np.uint64).T.copy()
            handle = self._agent.initialize_xfer(
                "WRITE",
                self._agent.get_xfer_descs(local, "DRAM"),
                self._agent.get_xfer_descs(remote, "DRAM"),
                agent,
            )
            state = self._agent.transfer(handle)
        except (KeyError, ValueError, TypeError, OverflowError) as exc:
            raise TransportError(f"{first!r} is not a nixl region: {exc}") from exc
        except Exception as exc:
            raise TransportError(f"NIXL refused the write: {exc}") from exc
        if state == "ERR":
            self._agent.release_xfer_handle(handle)
            raise TransportError("NIXL could not post the write")
        return handle

    def _poll(self, handle: Any) -> tuple[bool, str | None]:
        try:
            state = self._agent.check_xfer_state(handle)
        except Exception as exc:
            state, error = "ERR", str(exc)
        else:
            error = "NIXL reported the write failed"
        if state == "PROC":
            return False, None
        try:
            self._agent.release_xfer_handle(handle)
        except Exception as exc:
            log.warning("NIXL could not release a transfer handle: %s", exc)
        return True, None if state == "DONE" else error

    def _close_engine(self) -> None:
        for agent in self._remote_agents:
            try:
                self._agent.remove_remote_agent(agent)
            except Exception as exc:
                log.debug("NIXL could not forget %s: %s", agent, exc)
        self._remote_agents.clear()
        self._loaded.clear()
        del self._agent
