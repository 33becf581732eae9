"""Shared memory that peers on one host can write into, and nothing else can.

A segment is an anonymous, sealed ``memfd``: it has no name in ``/dev/shm``, it
cannot be shrunk or grown once made (so a mapping of it can never raise
SIGBUS), and the kernel frees it when the last process holding it exits, so a
crash leaves nothing behind. A peer on the same host reaches it through
``/proc/<pid>/fd/<fd>`` of the owner and must find, on the file it opened:
a sealed memfd made by kvpoll, owned by this user, readable by no one else, with
the inode it was told and at least the size it needs (taken from ``fstat``).
Anything else is refused with :class:`SegmentError` before a byte is written.

A peer may only name memory of its own: after the data, each segment holds a
small table of *claims*, the addresses of the endpoints that registered it
(:meth:`Segment.claim`, written by the owner process). A writer checks that
the peer offering a segment is among them (:meth:`Segment.claimed_by`), so a
descriptor naming another process's segment, or the writer's own, is refused
even when it points at real kvpoll memory: no process but the owner can
write the table.

Views handed to applications stay valid as long as they exist: a segment is
never unmapped while a tensor over it is alive (the mapping goes away with the
last view), whatever happens to rooms, pools or endpoints.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import functools
import mmap
import os
import stat
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from kvpoll import errors
from kvpoll.errors import KvpollError

__all__ = [
    "MEMFD_NAME",
    "Attachments",
    "ResourceExhausted",
    "Segment",
    "SegmentError",
    "SegmentInfo",
    "boot_id",
    "find_shared",
]

MEMFD_NAME = "kvpoll"
CLAIMS_BYTES = 4096
"""The table of claims after a segment's data: 32 slots of an address (<= 126 bytes)."""
_SLOT = 128
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_MAX_ID = 2**62
_PUBLISHED: dict[int, Segment] = {}  # start address -> segment (pools' memory, this process)
_STARTS: list[int] = []
_LOCK = threading.Lock()


class SegmentError(KvpollError):
    """Shared memory named by a peer cannot be used (missing, foreign, too small, ...)."""


class ResourceExhausted(SegmentError, errors.ResourceExhausted):
    """Out of file descriptors or mappings while making or attaching shared memory."""


@functools.cache
def boot_id() -> str:
    """An id of this host's running kernel: equal ids mean one host."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return os.uname().nodename


def _os_error(what: str, exc: OSError) -> SegmentError:
    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        return ResourceExhausted(f"{what}: {exc.strerror} (file descriptors or memory exhausted)")
    return SegmentError(f"{what}: {exc.strerror or exc}")


class SegmentInfo:
    """What a peer needs to find a segment: owner pid, fd, inode, size (all checked)."""

    __slots__ = ("fd", "inode", "pid", "size")

    def __init__(self, pid: int, fd: int, inode: int, size: int) -> None:
        for name, value in (("pid", pid), ("fd", fd), ("inode", inode), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_ID:
                raise SegmentError(f"a shared memory {name} must be an int >= 0, not {value!r}")
        self.pid, self.fd, self.inode, self.size = pid, fd, inode, size

    def as_dict(self) -> dict[str, int]:
        return {
            "shm_pid": self.pid,
            "shm_fd": self.fd,
            "shm_inode": self.inode,
            "shm_size": self.size,
        }

    @classmethod
    def from_dict(cls, extra: dict[str, object]) -> SegmentInfo:
        """Read the fields :meth:`as_dict` wrote (from a peer: every field checked)."""
        try:
            return cls(*(extra[k] for k in ("shm_pid", "shm_fd", "shm_inode", "shm_size")))  # type: ignore[arg-type]
        except KeyError as exc:
            raise SegmentError(f"no shared memory {exc.args[0]} in the descriptor") from None

    def key(self) -> tuple[int, int, int]:
        return (self.pid, self.fd, self.inode)


class Segment:
    """One mapped shared-memory segment.

    Attributes:
        size: bytes.
        data: the whole segment as a uint8 tensor (views of it keep it mapped).
        info: what a peer on this host needs to attach it.
    """

    __slots__ = ("_claims", "_closed", "_fd", "data", "info", "owner", "size")

    def __init__(self, fd: int, size: int, info: SegmentInfo, *, owner: bool) -> None:
        # torch maps the file itself and keeps no descriptor: the mapping belongs to
        # the tensor storage and goes away with its last view (never earlier).
        whole = size + CLAIMS_BYTES
        try:
            mapped = torch.from_file(
                f"/proc/self/fd/{fd}", shared=True, size=whole, dtype=torch.uint8
            )
        except RuntimeError as exc:
            raise ResourceExhausted(
                f"cannot map {whole} bytes of shared memory (file descriptors, mappings or "
                f"memory exhausted): {exc}"
            ) from exc
        self.data = mapped[:size]
        self._claims = mapped[size:]
        self._fd = fd
        self._closed = False
        self.size = size
        self.info = info
        self.owner = owner

    def claim(self, address: str) -> None:
        """Record that the endpoint at ``address`` may offer this segment to peers
        (the owner's process only; idempotent).

        Raises:
            SegmentError: not this process's segment, an address over 126
                bytes, or every slot taken.
        """
        raw = address.encode()
        if not self.owner or len(raw) >= _SLOT - 1:
            raise SegmentError(f"cannot claim this shared memory for {address!r}")
        if self.claimed_by(address):
            return
        table = self._claims.numpy()
        for at in range(0, CLAIMS_BYTES, _SLOT):
            if table[at] == 0:
                table[at + 1 : at + 1 + len(raw)] = memoryview(raw)
                table[at] = len(raw)  # last: a reader never sees half a slot as filled
                return
        raise SegmentError(
            f"this shared memory is claimed by {CLAIMS_BYTES // _SLOT} endpoints already"
        )

    def claimed_by(self, address: str) -> bool:
        """Whether the owner recorded ``address`` as an endpoint that may offer it."""
        raw = address.encode()
        table = self._claims.numpy()
        for at in range(0, CLAIMS_BYTES, _SLOT):
            n = int(table[at])
            if n == 0:
                return False
            if n == len(raw) and bytes(table[at + 1 : at + 1 + n]) == raw:
                return True
        return False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (its mapping may live on in views)."""
        return self._closed

    @classmethod
    def create(cls, size: int) -> Segment:
        """A new sealed segment of ``size`` bytes, owner-only, every page touched.

        Raises:
            ResourceExhausted: no file descriptor or memory left.
            SegmentError: the system refused otherwise.
        """
        if size < 0:
            raise SegmentError(f"cannot make a segment of {size} bytes")
        try:
            fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:
            raise _os_error("cannot create shared memory", exc) from exc
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, size + CLAIMS_BYTES)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            st = os.fstat(fd)
            segment = cls(fd, size, SegmentInfo(os.getpid(), fd, st.st_ino, size), owner=True)
        except OSError as exc:
            os.close(fd)
            raise _os_error(f"cannot set up {size} bytes of shared memory", exc) from exc
        except BaseException:
            os.close(fd)
            raise
        if size:
            segment.data.numpy()[:: mmap.PAGESIZE] = 0  # touch every page now, not on the data path
        return segment

    @classmethod
    def attach(cls, info: SegmentInfo) -> Segment:
        """Map a segment another process made, after checking it is one.

        Raises:
            SegmentError: gone, not a sealed kvpoll memfd, another user's,
                readable by others, another file, or smaller than announced.
            ResourceExhausted: no file descriptor or mapping left.
        """
        where = f"/proc/{info.pid}/fd/{info.fd}"
        try:
            target = os.readlink(where)
        except OSError as exc:
            raise _os_error(f"shared memory {where} is gone", exc) from exc
        if not target.startswith(f"/memfd:{MEMFD_NAME} "):
            raise SegmentError(f"{where} is not kvpoll shared memory (it is {target[:80]!r})")
        try:
            fd = os.open(where, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            raise _os_error(f"cannot open shared memory {where}", exc) from exc
        try:
            st = os.fstat(fd)
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            why = None
            if not stat.S_ISREG(st.st_mode):
                why = "not a regular file"
            elif st.st_uid != os.getuid():
                why = f"owned by uid {st.st_uid}, not {os.getuid()}"
            elif st.st_mode & 0o077:
                why = f"mode {stat.S_IMODE(st.st_mode):o} lets others in"
            elif st.st_ino != info.inode:
                why = "another file than the one described (replaced, or another host)"
            elif seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) != (
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
            ):
                why = "not sealed against resizing"
            elif st.st_size - CLAIMS_BYTES < info.size:
                why = f"{st.st_size - CLAIMS_BYTES} bytes, not the {info.size} announced"
            if why is not None:
                raise SegmentError(f"refused shared memory {where}: {why}")
            segment = cls(fd, st.st_size - CLAIMS_BYTES, info, owner=False)
        except OSError as exc:
            raise _os_error(f"cannot inspect shared memory {where}", exc) from exc
        finally:
            os.close(fd)  # the mapping needs no descriptor
        segment._fd = -1
        return segment

    def publish(self) -> None:
        """Let :func:`find_shared` find tensors inside this segment (pool memory)."""
        if self.size and self.owner:
            start = int(self.data.data_ptr())
            with _LOCK:
                if start not in _PUBLISHED:
                    bisect.insort(_STARTS, start)
                _PUBLISHED[start] = self

    def _unpublish(self) -> None:
        if self.size and self.owner and self.data.numel():
            start = int(self.data.data_ptr())
            with _LOCK:
                if _PUBLISHED.get(start) is self:
                    del _PUBLISHED[start]
                    _STARTS.remove(start)

    def close(self) -> None:
        """Close the descriptor and drop this object's mapping.

        The mapping itself lives on while any tensor view of it does (so a view
        an application holds never dangles); then the kernel frees it.
        """
        self._unpublish()
        self._closed = True
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        self.data = torch.empty(0, dtype=torch.uint8)
        self._claims = torch.zeros(CLAIMS_BYTES, dtype=torch.uint8)


def find_shared(address: int, nbytes: int) -> tuple[Segment, int] | None:
    """The published segment holding ``nbytes`` at ``address``, and the offset there."""
    with _LOCK:
        i = bisect.bisect_right(_STARTS, address) - 1
        if i < 0:
            return None
        segment = _PUBLISHED[_STARTS[i]]
        offset = address - _STARTS[i]
    if offset + nbytes > segment.size:
        return None
    return segment, offset


class Attachments:
    """Peers' segments this process has mapped: each once, at most ``limit`` at a time.

    The least recently used one is dropped when a new one would pass the limit,
    so descriptors and mappings are bounded by peers' pools, not by rooms.
    """

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._segments: OrderedDict[tuple[int, int, int], Segment] = OrderedDict()

    def __len__(self) -> int:
        return len(self._segments)

    def __contains__(self, key: object) -> bool:
        return key in self._segments

    def get(self, info: SegmentInfo) -> Segment:
        """The mapped segment ``info`` describes (attached now if it was not).

        Raises:
            SegmentError: see :meth:`Segment.attach`.
        """
        key = info.key()
        segment = self._segments.get(key)
        if segment is not None and segment.size >= info.size:
            self._segments.move_to_end(key)
            return segment
        if segment is not None:
            self.forget(key)
        while len(self._segments) >= self.limit:
            _, oldest = self._segments.popitem(last=False)
            oldest.close()
        segment = Segment.attach(info)
        self._segments[key] = segment
        return segment

    def forget(self, key: tuple[int, int, int]) -> None:
        segment = self._segments.pop(key, None)
        if segment is not None:
            segment.close()

    def close(self) -> None:
        for segment in self._segments.values():
            segment.close()
        self._segments.clear()
