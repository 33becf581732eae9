"""Transports: adapters behind one small interface (:class:`Transport`).

Find one by name with :func:`create`; names are resolved lazily, so an
optional dependency is imported only when its transport is used. Built in:

* ``loopback``: in-process reference transport (tests, examples).
* ``zmq``: ZMQ control channel; shared memory on one host, ZMQ TCP across hosts.
* ``ucx``: UCX through UCXX (shared memory, cma, TCP, RDMA where built in).
* ``nixl``: NVIDIA's NIXL with its UCX backend (the RDMA path of real clusters).
* ``mooncake``: Mooncake's transfer engine (TCP here; RDMA where built in).

The engine transports keep ZMQ for their control messages and hand the bytes
to the engine.

Third parties add transports through the entry-point group
``kvpoll.transports``: the entry point's name is the transport's name and its
object a :class:`Transport` subclass (or a factory taking keyword options).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from kvpoll.transports.base import (
    Capabilities,
    MessageReceived,
    PeerActive,
    PeerClosed,
    Region,
    RegionBoundsError,
    RegionDescriptor,
    Transport,
    TransportClosed,
    TransportError,
    TransportEvent,
    TransportUnavailable,
    WriteDone,
)
from kvpoll.transports.spans import SpanBatch

__all__ = [
    "Capabilities",
    "MessageReceived",
    "PeerActive",
    "PeerClosed",
    "Region",
    "RegionBoundsError",
    "RegionDescriptor",
    "SpanBatch",
    "Transport",
    "TransportClosed",
    "TransportError",
    "TransportEvent",
    "TransportUnavailable",
    "WriteDone",
    "available",
    "create",
    "resolve",
]

ENTRY_POINT_GROUP = "kvpoll.transports"

# name -> (module, attribute, the extra that installs its dependencies)
_BUILTIN: dict[str, tuple[str, str, str | None]] = {
    "loopback": ("kvpoll.transports.loopback", "LoopbackTransport", None),
    "zmq": ("kvpoll.transports.zmq_transport", "ZmqTransport", None),
    "ucx": ("kvpoll.transports.ucx_transport", "UcxTransport", "ucx"),
    "nixl": ("kvpoll.transports.nixl_transport", "NixlTransport", "nixl"),
    "mooncake": ("kvpoll.transports.mooncake_transport", "MooncakeTransport", "mooncake"),
}


# system libraries the engines' wheels link against, and the Debian/Ubuntu package of each
_SYSTEM_PACKAGES = {
    lib: f" (on Debian/Ubuntu: apt-get install {pkg})"
    for lib, pkg in {
        "libibverbs.so.1": "libibverbs1",
        "libnl-3.so.200": "libnl-3-200",
        "libnl-route-3.so.200": "libnl-route-3-200",
        "librdmacm.so.1": "librdmacm1",
        "libnuma.so.1": "libnuma1",
    }.items()
}


def _missing_library(exc: ImportError) -> str | None:
    """The shared library an ImportError says could not be loaded, if that is what failed."""
    found = re.search(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object file", str(exc))
    return found.group(1) if found else None


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Names of every known transport (built in and registered), installed or not."""
    return sorted(set(_BUILTIN) | set(_entry_points()))


def resolve(name: str) -> Callable[..., Transport]:
    """The class (or factory) of the transport called ``name``.

    Raises:
        TransportUnavailable: no such transport, or its dependency is missing
            (the message names the extra to install).
    """
    if name in _BUILTIN:
        module_name, attr, extra = _BUILTIN[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            library = _missing_library(exc)
            if library is not None:
                raise TransportUnavailable(
                    f"the {name!r} transport's package is installed but cannot load the "
                    f"system library {library}{_SYSTEM_PACKAGES.get(library, '')}: {exc}"
                ) from exc
            hint = f": pip install 'kvpoll[{extra}]'" if extra else ""
            raise TransportUnavailable(
                f"the {name!r} transport needs a package that is not installed ({exc.name}){hint}"
            ) from exc
        factory: Callable[..., Transport] = getattr(module, attr)
        return factory
    ep = _entry_points().get(name)
    if ep is None:
        raise TransportUnavailable(f"unknown transport {name!r}; known: {', '.join(available())}")
    try:
        loaded: Callable[..., Transport] = ep.load()
    except ImportError as exc:
        raise TransportUnavailable(
            f"the {name!r} transport ({ep.value}) cannot be imported: {exc}"
        ) from exc
    return loaded


def create(name: str, **options: Any) -> Transport:
    """Open a transport by name, passing ``options`` to it.

    Raises:
        TransportUnavailable: see :func:`resolve`.
        TransportError: the transport could not start (a bad option, a busy port).
    """
    from kvpoll.transports.options import OptionError, check_options

    factory = resolve(name)
    try:
        checked = check_options(name, options, factory, {k: "argument" for k in options})
    except OptionError as exc:
        raise OptionError(f"bad options for the {name!r} transport: {exc}") from None
    try:
        return factory(**checked)
    except TypeError as exc:
        raise TransportError(f"bad options for the {name!r} transport: {exc}") from exc
