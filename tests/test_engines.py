"""The engine transports (ucx, nixl, mooncake): the kit, real transfers, the demo.

Each engine is an optional extra. Where one is not installed its tests skip
with the reason, except under ``CI_REQUIRE_ENGINES=1`` (set by ``.ci/run``),
where a missing engine fails: CI never skips them silently.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvpoll.cli import main
from kvpoll.protocol import Receiver, Sender
from kvpoll.testing import check_transport, wait_for_write
from kvpoll.transports import Transport, TransportError, TransportUnavailable, resolve
from tests.test_demo import demo

ENGINES = ["ucx", "nixl", "mooncake"]


def engine(name: str) -> Callable[..., Transport]:
    try:
        return resolve(name)
    except TransportUnavailable as exc:
        if os.environ.get("CI_REQUIRE_ENGINES") == "1":
            pytest.fail(f"CI requires every engine, and {name} is missing: {exc}")
        pytest.skip(str(exc))


@pytest.mark.parametrize("name", ENGINES)
def test_engine_passes_the_kit(name: str) -> None:
    cls = engine(name)
    check_transport(lambda: (cls(write_timeout=5), cls(write_timeout=5)))


@pytest.mark.parametrize("name", ENGINES)
def test_engine_rooms_end_to_end(name: str) -> None:
    """Several chunks with resumes through Sender/Receiver, data bit for bit."""
    engine(name)
    fast: dict[str, Any] = {"heartbeat_interval": 0.2, "heartbeat_misses": 5}
    with Sender(name, **fast) as tx, Receiver(name, **fast) as rx:
        gen = torch.Generator().manual_seed(3)
        data = torch.randn(700, 256, generator=gen).to(torch.bfloat16)
        tx.add(1)
        tx.send(1, data)
        rx.open(1, tx.address, row_shape=(256,), dtype=torch.bfloat16, allocated_tokens=256)
        assert rx.wait(1, 30).name == "Success", rx.info(1).reason
        assert tx.wait(1, 30).name == "Success", tx.info(1).reason
        got = rx.result(1)
        assert len(got.chunks) == 3
        assert torch.equal(got.tensor().view(torch.uint8), data.view(torch.uint8))
        assert rx.info(1).paths == (name,)
        assert tx.info(1).paths == (name,)


@pytest.mark.parametrize("name", ENGINES)
def test_engine_refuses_a_region_of_another_transport(name: str) -> None:
    cls = engine(name)
    with cls() as a, resolve("zmq")() as b:
        region = b.allocate(64)
        src = a.register(torch.zeros(64, dtype=torch.uint8))
        with pytest.raises(TransportError, match="zmq"):
            a.write(src, 0, region.descriptor, 0, 64)


def test_ucx_settings_defaults_environment_and_explicit() -> None:
    engine("ucx")
    from kvpoll.transports.ucx_transport import effective_settings, net_device_for

    assert net_device_for("127.0.0.1") == "lo"
    assert net_device_for("0.0.0.0") == "all"
    assert net_device_for("no-such-host.invalid") == "all"
    base = effective_settings("127.0.0.1", environ={})
    assert base["MM_ERROR_HANDLING"] == "y"
    assert "tcp" in base["TLS"].split(",")
    assert base["NET_DEVICES"] == "lo"
    # the rendezvous scheme follows the path: loopback peers are on this host
    # (shared memory, cma: UCX's own choice), others may be across TCP (put)
    assert base["RNDV_SCHEME"] == "auto"
    assert effective_settings("0.0.0.0", environ={})["RNDV_SCHEME"] == "put_zcopy"
    assert effective_settings("0.0.0.0", {"RNDV_SCHEME": "get_zcopy"}, {})["RNDV_SCHEME"] == (
        "get_zcopy"
    )
    assert "RNDV_SCHEME" not in effective_settings("127.0.0.1", environ={"UCX_RNDV_SCHEME": "am"})
    # the user's environment wins over a default: the key is left to UCX to read
    env = effective_settings("127.0.0.1", environ={"UCX_TLS": "tcp"})
    assert "TLS" not in env
    assert env["MM_ERROR_HANDLING"] == "y"
    # explicit settings win over both, with or without the UCX_ prefix
    explicit = effective_settings("127.0.0.1", {"UCX_TLS": "sm", "net_devices": "eth9"}, {})
    assert explicit["TLS"] == "sm"
    assert explicit["NET_DEVICES"] == "eth9"


def test_ucx_refuses_a_bad_progress_mode_and_bad_settings() -> None:
    cls = engine("ucx")
    with pytest.raises(TransportError, match="progress"):
        cls(progress="sometimes")
    with pytest.raises(TransportError, match="UCX could not start"):
        cls(ucx={"TLS": "no-such-transport-layer"})


def test_ucx_polling_mode_moves_data() -> None:
    cls = engine("ucx")
    with cls(progress="polling") as a, cls(progress="polling") as b:
        dst = b.allocate(1 << 20)
        src = a.register(torch.arange(1 << 20, dtype=torch.int64).to(torch.uint8))
        assert wait_for_write(a, b, a.write(src, 0, dst.descriptor, 0, 1 << 20)).ok
        assert torch.equal(dst.data, src.data)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here: device memory untested")
def test_ucx_device_memory() -> None:  # pragma: no cover - needs a GPU
    cls = engine("ucx")
    with cls() as a, cls() as b:
        src_tensor = torch.arange(4096, device="cuda", dtype=torch.uint8)
        try:
            src = a.register(src_tensor)
        except TransportError as exc:
            pytest.skip(f"this UCX cannot reach GPU memory: {exc}")
        dst = b.register(torch.zeros(4096, device="cuda", dtype=torch.uint8))
        assert wait_for_write(a, b, a.write(src, 0, dst.descriptor, 0, 4096)).ok
        assert torch.equal(dst.data.cpu(), src_tensor.cpu())


@pytest.mark.slow
@pytest.mark.parametrize("name", ENGINES)
def test_the_demo_over_each_engine(name: str) -> None:
    engine(name)
    out = demo("--transport", name, "--json", "--hidden", "512")
    assert out.returncode == 0, out.stderr[-3000:]
    summary: dict[str, Any] = json.loads(out.stdout)
    assert summary["ok"], summary["problems"]
    finals = [room["sides"]["lm rank 0"]["final"] for room in summary["rooms"]]
    assert finals == ["Success", "Success", "Success", "Failed"]
    assert all(room["sides"]["lm rank 0"]["data_matched"] for room in summary["rooms"][:3])


@pytest.mark.parametrize("name", ENGINES)
def test_engine_one_tensor_sent_in_many_rooms(name: str) -> None:
    """Engines refuse to register one range twice: regions over it share one registration."""
    engine(name)
    fast: dict[str, Any] = {"heartbeat_interval": 0.2, "heartbeat_misses": 5}
    data = torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32)
    with Sender(name, **fast) as tx, Receiver(name, **fast) as rx:
        for room in range(1, 6):
            tx.add(room)
            tx.send(room, data)
        for room in range(1, 6):
            rx.open(room, tx.address, row_shape=(32,), dtype=torch.float32, allocated_tokens=64)
        for room in range(1, 6):
            assert rx.wait(room, 30).name == "Success", rx.info(room).reason
            assert torch.equal(rx.result(room).tensor(), data)


def test_config_show_lists_what_ucx_hands_to_ucx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engine("ucx")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("KVPOLL_TRANSPORT", "ucx")
    monkeypatch.setenv("KVPOLL_UCX_UCX", '{ RNDV_SCHEME = "get_zcopy" }')
    monkeypatch.setenv("UCX_TLS", "tcp")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split("#")[1].strip(): line.rsplit("#", 1)[1].strip()
        for line in out.splitlines()
        if line.startswith("#   UCX_")
    }
    assert rows["UCX_TLS = tcp"] == "env UCX_TLS"
    assert rows["UCX_MM_ERROR_HANDLING = y"] == "kvpoll default"
    assert rows["UCX_RNDV_SCHEME = get_zcopy"] == "explicit"
    assert rows["UCX_NET_DEVICES = lo"] == "kvpoll default"
    tomllib.loads(out)  # still a valid file: the UCX lines are comments
    assert main(["config", "show", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ucx_settings"]["UCX_TLS"] == {"value": "tcp", "source": "env UCX_TLS"}


@pytest.mark.parametrize("name", ENGINES)
def test_a_process_that_used_the_engine_exits_cleanly(name: str) -> None:
    """Found here: NIXL's bundled UCX beside Debian's libefa crashed every process at exit."""
    engine(name)
    code = (
        "from kvpoll.transports import create\n"
        f"a, b = create({name!r}), create({name!r})\n"
        "a.close(); b.close()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])


_ENV_PROBE = """
import json, os
before = {k: v for k, v in os.environ.items() if k.startswith("UCX_")}
from kvpoll.transports import ucx_transport as u
after = {k: v for k, v in os.environ.items() if k.startswith("UCX_")}
print(json.dumps({
    "added": sorted(set(after) - set(before)),
    "kept": after,
    "ucxx": dict(u.UCXX_SETTINGS),
    "effective": u.effective_settings("127.0.0.1"),
}))
"""


def _probe_ucx_environment(**env: str) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UCX_")}
    out = subprocess.run(
        [sys.executable, "-c", _ENV_PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_ucxx_defaults_stay_out_of_the_environment_other_ucx_users_read() -> None:
    # UCXX writes its defaults into os.environ on import; NIXL's UCX, started later
    # in the same process, read them and moved 16 MiB ~10x slower
    engine("ucx")
    result = _probe_ucx_environment()
    assert result["added"] == ["UCX_WARN_UNUSED_ENV_VARS"]  # kvpoll's own, harmless
    assert result["ucxx"]["RNDV_THRESH"] == "8192"
    # kvpoll's own contexts still get them, below kvpoll's settings
    assert result["effective"]["RNDV_THRESH"] == "8192"
    assert result["effective"]["RNDV_SCHEME"] == "auto"  # bound to loopback
    # a variable the user set is the user's: left in place, read by UCX itself
    mine = _probe_ucx_environment(UCX_RNDV_THRESH="4096")
    assert mine["kept"]["UCX_RNDV_THRESH"] == "4096"
    assert "RNDV_THRESH" not in mine["ucxx"]
    assert "RNDV_THRESH" not in mine["effective"]


@pytest.mark.parametrize("name", ["nixl", "mooncake"])
@pytest.mark.parametrize("addr", [-4096, 1 << 70, "nowhere", None])
def test_a_destination_without_a_usable_address_fails_its_write_only(name: str, addr: Any) -> None:
    """A peer's descriptor whose engine address is missing, negative or absurd (the
    grant still passes: region and range are its own) fails that write with its
    reason, never an exception out of progress(); the next write lands."""
    cls = engine(name)
    a, b = cls(write_timeout=5), cls(write_timeout=5)
    try:
        src = a.register(torch.arange(4096, dtype=torch.int32).view(torch.uint8)[:4096].clone())
        dst = b.allocate(4096)
        extra = {k: v for k, v in dst.descriptor.extra.items() if k != "addr"}
        if addr is not None:
            extra["addr"] = addr
        forged = dst.descriptor.model_copy(update={"extra": extra})
        done = wait_for_write(a, b, a.write(src, 0, forged, 0, 4096))
        assert not done.ok
        assert f"is not a {name} region" in (done.error or "")
        assert wait_for_write(a, b, a.write(src, 0, dst.descriptor, 0, 4096)).ok
        assert torch.equal(dst.data, src.data)
    finally:
        a.close()
        b.close()
