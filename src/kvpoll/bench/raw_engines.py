"""Single writes: each engine used directly, and each kvpoll transport alone.

The baselines (``raw-ucxx``, ``raw-nixl``, ``raw-mooncake``) are minimal direct
uses of an engine, with the same settings as the kvpoll transport that wraps it
(UCX's from :func:`kvpoll.transports.ucx_transport.effective_settings`). The
``<path>.write`` measurements are one :meth:`Transport.write` of the kvpoll
transport, without rooms or messages: they split an adapter's cost from the
protocol's.

Each has a receiving half (in the measuring process: a pre-touched buffer the
bytes land in) and a sending half (in the child process). The receiving half's
``setup`` returns what the sending half needs (plain data for the pipe); one
``send`` moves ``nbytes`` once and returns when the bytes are in the receiver's
buffer; the receiving half's ``wait(sent)`` does what the receiver must do until
``sent()`` says the sender is done.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["RAW", "WRITE_OPTIONS", "receiving_half", "sending_half"]

RAW = {"ucx": "raw-ucxx", "nixl": "raw-nixl", "mooncake": "raw-mooncake"}
"""kvpoll transport -> the baseline that uses its engine directly."""

_DEADLINE = 120.0


def _buffer(nbytes: int) -> torch.Tensor:
    return torch.ones(nbytes, dtype=torch.uint8)  # touched: no page faults in the timing


def _ucx_worker() -> tuple[Any, Any, Any]:
    # kvpoll's module first: it takes UCXX's defaults back out of the environment
    # (where NIXL's UCX, later in this process, would read them) and hands them
    # to the context instead
    from kvpoll.transports.ucx_transport import effective_settings

    libucxx = importlib.import_module("ucxx._lib.libucxx")

    context = libucxx.UCXContext(
        effective_settings("127.0.0.1"), feature_flags=(libucxx.Feature.TAG,)
    )
    return libucxx, context, libucxx.UCXWorker(context)


class _UcxReceiver:
    def __init__(self, nbytes: int) -> None:
        self.libucxx, self.context, self.worker = _ucx_worker()
        self.buffer = _buffer(nbytes)
        self.tag = 0

    def setup(self) -> Any:
        return self.worker.address.tobytes()

    def arm(self) -> None:
        """Post the receive for the next send (before the sender is told to go)."""
        from ucxx._lib.arr import Array

        self.tag += 1
        self.request = self.worker.tag_recv(
            Array(self.buffer.numpy()), self.libucxx.UCXXTag(self.tag)
        )

    def wait(self, sent: Callable[[], bool]) -> None:
        deadline = time.monotonic() + _DEADLINE
        while not self.request.completed:
            self.worker.progress()
            if time.monotonic() > deadline:
                raise RuntimeError("raw ucxx: the receive did not complete")
        self.request.check_error()

    def close(self) -> None:
        del self.worker, self.context


class _UcxSender:
    def __init__(self, setup: Any, nbytes: int) -> None:
        self.libucxx, self.context, self.worker = _ucx_worker()
        address = self.libucxx.UCXAddress.create_from_buffer(setup)
        self.endpoint = self.worker.create_endpoint_from_worker_address(address, True)
        self.buffer = _buffer(nbytes)
        self.tag = 0

    def send(self) -> None:
        from ucxx._lib.arr import Array

        self.tag += 1
        request = self.endpoint.tag_send(Array(self.buffer.numpy()), self.libucxx.UCXXTag(self.tag))
        deadline = time.monotonic() + _DEADLINE
        while not request.completed:
            self.worker.progress()
            if time.monotonic() > deadline:
                raise RuntimeError("raw ucxx: the send did not complete")
        request.check_error()

    def close(self) -> None:
        self.endpoint.close()
        del self.endpoint, self.worker, self.context


def _nixl() -> Any:
    from kvpoll.transports.nixl_transport import make_agent

    name = f"raw-{os.getpid()}-{time.monotonic_ns()}"
    return make_agent(name), name  # kvpoll's defaults: a progress thread, 100 us apart


class _NixlReceiver:
    def __init__(self, nbytes: int) -> None:
        self.agent, self.name = _nixl()
        self.buffer = _buffer(nbytes)
        self.registration = self.agent.register_memory(
            [(self.buffer.data_ptr(), nbytes, 0, "")], "DRAM"
        )

    def setup(self) -> Any:
        return (self.agent.get_agent_metadata(), self.buffer.data_ptr())

    def arm(self) -> None:
        pass

    def wait(self, sent: Callable[[], bool]) -> None:
        pass  # one-sided: the sender's completion is the signal

    def close(self) -> None:
        self.agent.deregister_memory(self.registration)


class _NixlSender:
    def __init__(self, setup: Any, nbytes: int) -> None:
        metadata, self.remote = setup
        self.agent, _ = _nixl()
        self.peer = self.agent.add_remote_agent(metadata)
        self.buffer = _buffer(nbytes)
        self.nbytes = nbytes
        self.registration = self.agent.register_memory(
            [(self.buffer.data_ptr(), nbytes, 0, "")], "DRAM"
        )

    def send(self) -> None:
        local = self.agent.get_xfer_descs([(self.buffer.data_ptr(), self.nbytes, 0)], "DRAM")
        target = self.agent.get_xfer_descs([(self.remote, self.nbytes, 0)], "DRAM")
        handle = self.agent.initialize_xfer("WRITE", local, target, self.peer)
        state = self.agent.transfer(handle)
        deadline = time.monotonic() + _DEADLINE
        while state not in ("DONE", "ERR"):
            state = self.agent.check_xfer_state(handle)
            if time.monotonic() > deadline:
                raise RuntimeError("raw nixl: the write did not complete")
        self.agent.release_xfer_handle(handle)
        if state == "ERR":
            raise RuntimeError("raw nixl: the write failed")

    def close(self) -> None:
        self.agent.deregister_memory(self.registration)
        self.agent.remove_remote_agent(self.peer)


def start_mooncake() -> Any:
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    if engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
        raise RuntimeError("raw mooncake: the engine did not start")
    return engine


class _MooncakeReceiver:
    def __init__(self, nbytes: int) -> None:
        self.engine = start_mooncake()
        self.buffer = _buffer(nbytes)
        self.engine.register_memory(self.buffer.data_ptr(), nbytes)

    def setup(self) -> Any:
        return (f"127.0.0.1:{self.engine.get_rpc_port()}", self.buffer.data_ptr())

    def arm(self) -> None:
        pass

    def wait(self, sent: Callable[[], bool]) -> None:
        pass

    def close(self) -> None:
        self.engine.unregister_memory(self.buffer.data_ptr())


class _MooncakeSender:
    def __init__(self, setup: Any, nbytes: int) -> None:
        self.session, self.remote = setup
        self.engine = start_mooncake()
        self.buffer = _buffer(nbytes)
        self.nbytes = nbytes
        self.engine.register_memory(self.buffer.data_ptr(), nbytes)

    def send(self) -> None:
        status = self.engine.transfer_sync_write(
            self.session, self.buffer.data_ptr(), self.remote, self.nbytes
        )
        if status != 0:
            raise RuntimeError(f"raw mooncake: the write failed ({status})")

    def close(self) -> None:
        self.engine.unregister_memory(self.buffer.data_ptr())


WRITE_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "zmq-shm.write": ("zmq", {"shm": True}),
    "zmq-tcp.write": ("zmq", {"shm": False}),
    "ucx.write": ("ucx", {}),
    "nixl.write": ("nixl", {}),
    "mooncake.write": ("mooncake", {}),
}
"""One Transport.write of a kvpoll transport: name -> (transport, options)."""


class _WriteReceiver:
    """The destination transport, driven by its own thread as an endpoint drives it."""

    def __init__(self, name: str, nbytes: int) -> None:
        from kvpoll.transports import create

        transport, options = WRITE_OPTIONS[name]
        self.transport = create(transport, **options)
        self.region = self.transport.allocate(nbytes)
        self.region.data.fill_(1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kvpoll-bench-write", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.transport.progress(0.05)

    def setup(self) -> Any:
        return self.region.descriptor.model_dump_json()

    def arm(self) -> None:
        pass

    def wait(self, sent: Callable[[], bool]) -> None:
        pass  # the thread answers grants and requests; the sender says when it is done

    def close(self) -> None:
        self.stop.set()
        self.transport.wakeup()
        self.thread.join(30)
        self.transport.close()


class _WriteSender:
    def __init__(self, name: str, setup: Any, nbytes: int) -> None:
        from kvpoll.transports import RegionDescriptor, create

        transport, options = WRITE_OPTIONS[name]
        self.transport = create(transport, **options)
        self.target = RegionDescriptor.model_validate_json(setup)
        self.source = self.transport.register(_buffer(nbytes))
        self.nbytes = nbytes

    def send(self) -> None:
        from kvpoll.transports import WriteDone

        write_id = self.transport.write(self.source, 0, self.target, 0, self.nbytes)
        deadline = time.monotonic() + _DEADLINE
        while True:
            for event in self.transport.progress(0.05):
                if isinstance(event, WriteDone) and event.write_id == write_id:
                    if not event.ok:
                        raise RuntimeError(f"a kvpoll write failed: {event.error}")
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("a kvpoll write did not complete")

    def close(self) -> None:
        self.transport.close()


_RECEIVERS: dict[str, Any] = {
    "raw-ucxx": _UcxReceiver,
    "raw-nixl": _NixlReceiver,
    "raw-mooncake": _MooncakeReceiver,
}
_SENDERS: dict[str, Any] = {
    "raw-ucxx": _UcxSender,
    "raw-nixl": _NixlSender,
    "raw-mooncake": _MooncakeSender,
}


def receiving_half(name: str, nbytes: int) -> Any:
    """The receiving half of ``name`` (setup, arm, wait, close)."""
    if name in WRITE_OPTIONS:
        return _WriteReceiver(name, nbytes)
    return _RECEIVERS[name](nbytes)


def sending_half(name: str, setup: Any, nbytes: int) -> Any:
    """The sending half of ``name`` (send, close)."""
    if name in WRITE_OPTIONS:
        return _WriteSender(name, setup, nbytes)
    return _SENDERS[name](setup, nbytes)
