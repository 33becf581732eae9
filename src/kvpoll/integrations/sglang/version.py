"""Which SGLang is installed, and whether this backend was written for it."""

from __future__ import annotations

import functools
import os
from importlib import metadata

from kvpoll.errors import KvpollError

__all__ = ["SGLangVersionError", "check_version", "installed_version"]


class SGLangVersionError(KvpollError, ImportError):
    """SGLang is missing, or a release this backend was not written for."""


@functools.cache
def installed_version() -> str | None:
    """The installed SGLang's version, or None when it is not installed.

    Read once a process: the package metadata lookup took ~3 ms, and the
    scheduler asks for a class on every request (``get_kv_class``)."""
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def check_version() -> None:
    """Refuse an SGLang this backend was not written for.

    ``KVPOLL_SGLANG_ANY_VERSION=1`` skips the version check (at your risk).

    Raises:
        SGLangVersionError: SGLang is not installed, or another release.
    """
    from kvpoll.integrations.sglang import SGLANG_VERSION

    found = installed_version()
    if found is None:
        raise SGLangVersionError(
            f"the kvpoll SGLang backend needs sglang=={SGLANG_VERSION}: "
            "pip install 'kvpoll[sglang]' (see docs/sglang.md)"
        )
    if found != SGLANG_VERSION and os.environ.get("KVPOLL_SGLANG_ANY_VERSION") != "1":
        raise SGLangVersionError(
            f"the kvpoll SGLang backend is written for sglang=={SGLANG_VERSION}, "
            f"not {found} (set KVPOLL_SGLANG_ANY_VERSION=1 to try it anyway)"
        )
