"""The cluster secret and what the control channel derives from it.

With a secret (``secret_file`` in ``kvpoll.toml``, ``KVPOLL_SECRET_FILE``),
every ZMQ socket of an endpoint speaks CURVE (CurveZMQ: X25519 key exchange,
every frame encrypted and authenticated, replays refused). All endpoints of a
cluster derive one key pair from the secret: a ROUTER is a CURVE server with
it, a DEALER a CURVE client with it, and the ROUTER's handshake is checked by
a ZAP handler (:class:`ZapGate`) that admits a client only when it proved it
holds the derived secret key. A process without the secret can then neither
connect to an endpoint nor be connected to by one: its messages never reach
kvpoll, and nothing kvpoll sends is readable by it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from kvpoll.transports.base import TransportError

__all__ = ["MIN_SECRET_BYTES", "ClusterKeys", "SecretError", "ZapGate", "read_secret"]

MIN_SECRET_BYTES = 16
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_DOMAIN = b"kvpoll"


class SecretError(TransportError):
    """The secret file is missing, unreadable, too short, or readable by others."""


def read_secret(path: str | os.PathLike[str]) -> bytes:
    """The secret in ``path``: a regular file of this user, mode 0600 or stricter,
    with at least :data:`MIN_SECRET_BYTES` bytes (surrounding whitespace ignored).

    Raises:
        SecretError: which of those it is not.
    """
    file = Path(path)
    try:
        info = file.stat()
        data = file.read_bytes().strip()
    except OSError as exc:
        raise SecretError(f"cannot read the secret file {file}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise SecretError(f"the secret file {file} is not a regular file")
    if info.st_uid != os.getuid():
        raise SecretError(f"the secret file {file} belongs to uid {info.st_uid}, not to this user")
    if info.st_mode & 0o077:
        raise SecretError(
            f"the secret file {file} is readable by others (mode {info.st_mode & 0o777:o}): "
            f"chmod 600 {file}"
        )
    if len(data) < MIN_SECRET_BYTES:
        raise SecretError(
            f"the secret file {file} holds {len(data)} bytes; at least {MIN_SECRET_BYTES} "
            "are needed (for example: head -c 32 /dev/urandom | base64 > secret)"
        )
    return data


@dataclass(frozen=True)
class ClusterKeys:
    """The CURVE key pair every endpoint of a cluster derives from its secret (Z85)."""

    public: bytes
    secret: bytes

    @classmethod
    def derive(cls, secret: bytes) -> ClusterKeys:
        raw = hashlib.blake2b(secret, digest_size=32, person=b"kvpoll-curve-v1").digest()
        secret_key = z85.encode(raw)
        return cls(zmq.curve_public(secret_key), secret_key)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ClusterKeys:
        return cls.derive(read_secret(path))

    def serve(self, socket: zmq.Socket[bytes]) -> None:
        """Make ``socket`` (a ROUTER) a CURVE server whose clients the ZAP gate checks."""
        socket.setsockopt(zmq.CURVE_SERVER, 1)
        socket.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        socket.setsockopt(zmq.ZAP_DOMAIN, _DOMAIN)

    def connect(self, socket: zmq.Socket[bytes]) -> None:
        """Make ``socket`` (a DEALER) a CURVE client of an endpoint of this cluster."""
        socket.setsockopt(zmq.CURVE_SERVERKEY, self.public)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        socket.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


class ZapGate:
    """The ZAP handler of one ZMQ context: admits CURVE clients holding the cluster key.

    Driven by the transport's owner thread: :attr:`socket` is polled with the
    others and :meth:`handle` answers what arrived. Anything but a CURVE
    handshake with the cluster's public key is refused (and counted).
    """

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], keys: ClusterKeys) -> None:
        self._public = z85.decode(keys.public)
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(_ZAP_ENDPOINT)
        self.admitted = 0
        self.refused = 0

    def handle(self) -> None:
        """Answer every pending ZAP request (never blocks)."""
        for _ in range(256):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # [routing id, empty, version, request id, domain, address, identity,
            #  mechanism, credentials...]
            if len(frames) < 8 or frames[2] != b"1.0":
                self.refused += 1
                continue
            request_id, mechanism, credentials = frames[3], frames[7], frames[8:]
            ok = (
                frames[4] == _DOMAIN
                and mechanism == b"CURVE"
                and len(credentials) == 1
                and credentials[0] == self._public
            )
            if ok:
                self.admitted += 1
            else:
                self.refused += 1
            code, text = (b"200", b"OK") if ok else (b"400", b"not a member of this cluster")
            self.socket.send_multipart(
                [frames[0], b"", b"1.0", request_id, code, text, b"kvpoll" if ok else b"", b""]
            )

    def close(self) -> None:
        self.socket.close(0)
