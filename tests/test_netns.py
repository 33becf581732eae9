"""Sender and receiver in two network namespaces joined by a veth pair.

The test makes the namespaces and removes them; where that is not permitted
it is skipped with the reason. Namespaces share /dev/shm, so the transport is
told to use TCP: the data crosses the veth link between two addresses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import need_transport

ROOT = Path(__file__).resolve().parent.parent
NODE = Path(__file__).resolve().parent / "netns_node.py"
TAG = f"kvp{os.getpid() % 100000}"
A, B = f"{TAG}a", f"{TAG}b"
ADDR_A, ADDR_B = "10.213.77.1", "10.213.77.2"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture
def namespaces() -> Iterator[None]:
    if shutil.which("ip") is None:
        pytest.skip("iproute2's ip command is not installed")
    probe = ip("netns", "add", A, check=False)
    if probe.returncode != 0:
        pytest.skip(f"creating a network namespace is not permitted here: {probe.stderr.strip()}")
    try:
        ip("netns", "add", B)
        ip("link", "add", f"{TAG}va", "type", "veth", "peer", "name", f"{TAG}vb")
        ip("link", "set", f"{TAG}va", "netns", A)
        ip("link", "set", f"{TAG}vb", "netns", B)
        for ns, dev, addr in ((A, f"{TAG}va", ADDR_A), (B, f"{TAG}vb", ADDR_B)):
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield
    finally:
        for ns in (A, B):
            ip("netns", "del", ns, check=False)
        ip("link", "del", f"{TAG}va", check=False)


def in_ns(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, str(NODE), *args]


@pytest.mark.netns
@pytest.mark.parametrize("transport", ["zmq", "ucx"])
def test_transfer_between_two_namespaces_over_tcp(namespaces: None, transport: str) -> None:
    if transport == "ucx":
        need_transport("ucx")
    sizes = ["100", "700", "1500"]
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}")
    sender = subprocess.Popen(
        in_ns(A, transport, "sender", ADDR_A, *sizes),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert sender.stdout is not None
        assert sender.stderr is not None
        address = sender.stdout.readline().strip()
        assert address.startswith(f"tcp://{ADDR_A}:"), address or sender.stderr.read()
        receiver = subprocess.run(
            in_ns(B, transport, "receiver", address, ADDR_B, *sizes),
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
        assert receiver.returncode == 0, receiver.stderr[-3000:]
        rooms = json.loads(receiver.stdout)
        assert [r["status"] for r in rooms] == ["Success"] * 3, rooms
        assert all(r["matched"] for r in rooms)
        report = json.loads(sender.stdout.readline())
        assert report["finals"] == ["Success"] * 3
        writes = 1 + 3 + 6  # chunks of 256 tokens
        assert report["stats"]["shm_writes"] == 0
        if transport == "zmq":
            assert report["stats"]["tcp_writes"] == writes
            assert report["paths"] == ["zmq/tcp"]  # different hosts: never shared memory
        else:
            assert report["stats"]["ucx_writes"] == writes
            assert report["stats"]["tcp_writes"] == 0
            assert report["paths"] == ["ucx"]
        assert sender.wait(30) == 0
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(10)
