"""The SGLang transfer backend against SGLang 0.5.23's real code, on the CPU.

SGLang is installed with --no-deps (the Makefile); triton and torchvision are
stood in for (kvpoll.integrations.sglang.cpu). End-to-end runs start a real prefill and
a real decode scheduler rank (tests/sglang_peers.py) on loopback.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch

from kvpoll.errors import InvalidArgument
from kvpoll.integrations.sglang import SGLANG_VERSION
from kvpoll.integrations.sglang.memory import buffer_view, pool_from_buffers
from tests.conftest import ROOT

try:
    INSTALLED: str | None = metadata.version("sglang")
except metadata.PackageNotFoundError:
    INSTALLED = None


def need_sglang() -> None:
    if INSTALLED == SGLANG_VERSION:
        return
    why = f"sglang=={SGLANG_VERSION} is not installed (found {INSTALLED})"
    if os.environ.get("CI_REQUIRE_ENGINES") == "1":
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def sglang() -> Any:
    """SGLang's disaggregation package, imported for real (GPU-only imports stood in for)."""
    need_sglang()
    from kvpoll.integrations.sglang import cpu as sglang_stubs

    sglang_stubs.install()
    from sglang.srt.disaggregation import utils

    return utils


# -- memory: SGLang's pointers as a pool (no SGLang needed) ------------------------------------
def test_pool_views_sglang_buffers_without_copying() -> None:
    layers = [torch.arange(4 * 6, dtype=torch.int16).reshape(4, 6) + i for i in range(3)]
    aux = torch.zeros(5, 3, dtype=torch.int64)
    pool = pool_from_buffers(
        [t.data_ptr() for t in layers],
        [t.nbytes for t in layers],
        [t[0].nbytes for t in layers],
        aux_ptrs=[aux.data_ptr()],
        aux_lens=[aux.nbytes],
        aux_item_lens=[aux[0].nbytes],
    )
    assert (pool.num_pages, pool.page_size, pool.aux_rows) == (4, 1, 5)
    assert bytes(pool.buffers[1][2].numpy()) == bytes(layers[1][2].numpy())
    layers[2][3] = 99  # the pool is SGLang's memory, not a copy
    assert bytes(pool.buffers[2][3].numpy()) == bytes(layers[2][3].numpy())
    pool.aux[0][4] = 7
    assert aux[4].view(torch.uint8).tolist() == [7] * 24  # bytes of the row


def test_pool_refuses_lists_that_do_not_pair_up() -> None:
    t = torch.zeros(4, 8, dtype=torch.uint8)
    with pytest.raises(InvalidArgument, match="do not pair up"):
        pool_from_buffers([t.data_ptr()], [t.nbytes, t.nbytes], [8])
    with pytest.raises(InvalidArgument, match="hold no item"):
        pool_from_buffers([t.data_ptr()], [4], [8])
    with pytest.raises(InvalidArgument, match="item length"):
        pool_from_buffers([t.data_ptr()], [t.nbytes], [0])
    with pytest.raises(InvalidArgument, match="no KV buffer"):
        pool_from_buffers([], [], [])
    with pytest.raises(InvalidArgument, match="address"):
        buffer_view(0, 8, "cpu")
    with pytest.raises(InvalidArgument, match="not supported"):
        buffer_view(t.data_ptr(), 8, "meta")


# -- the classes against SGLang's interfaces ------------------------------------------------------
PAIRS = [
    ("KvpollKVManager", "CommonKVManager", "BaseKVManager"),
    ("KvpollKVSender", "CommonKVSender", "BaseKVSender"),
    ("KvpollKVReceiver", "CommonKVReceiver", "BaseKVReceiver"),
    ("KvpollKVBootstrapServer", "CommonKVBootstrapServer", "BaseKVBootstrapServer"),
]

# What SGLang's scheduler passes beyond the base signatures (prefill.py, decode.py).
SCHEDULER_KEYWORDS = {
    ("KvpollKVSender", "send"): {"indices_event"},
    ("KvpollKVReceiver", "send_metadata"): {"device_kv_indices"},
    ("KvpollKVReceiver", "ensure_abort_notified"): {"force_arm"},
}


@pytest.mark.parametrize(("ours", "common", "base"), PAIRS, ids=[p[0] for p in PAIRS])
def test_classes_subclass_sglangs_and_accept_every_parameter(
    sglang: Any, ours: str, common: str, base: str
) -> None:
    import sglang.srt.disaggregation.base.conn as base_conn
    import sglang.srt.disaggregation.common.conn as common_conn

    from kvpoll.integrations import sglang as backend

    cls = getattr(backend, ours)
    common_cls, base_cls = getattr(common_conn, common), getattr(base_conn, base)
    assert issubclass(cls, common_cls)
    assert issubclass(cls, base_cls)
    assert not inspect.isabstract(cls), sorted(getattr(cls, "__abstractmethods__", ()))
    for parent in (base_cls, common_cls):
        for name, member in vars(parent).items():
            if not callable(member) or (name.startswith("_") and name != "__init__"):
                continue
            theirs = inspect.signature(member).parameters
            mine = inspect.signature(getattr(cls, name)).parameters
            takes_any = any(p.kind is p.VAR_KEYWORD for p in mine.values())
            missing = [p for p in theirs if p not in mine and p not in ("args", "kwargs")]
            assert takes_any or not missing, f"{ours}.{name} lacks {missing}"
    for (owner, method), keywords in SCHEDULER_KEYWORDS.items():
        if owner == ours:
            params = inspect.signature(getattr(cls, method)).parameters
            accepted = set(params) | (
                keywords if any(p.kind is p.VAR_KEYWORD for p in params.values()) else set()
            )
            assert keywords <= accepted, f"{ours}.{method} refuses {keywords - accepted}"


PLUGIN_CHECK = """
import json, sys
sys.path.insert(0, sys.argv[1])
from kvpoll.integrations.sglang import cpu as sglang_stubs
sglang_stubs.install()
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.arg_groups.choices import DISAGG_TRANSFER_BACKEND_CHOICES
from sglang.srt.disaggregation.utils import KVClassType, TransferBackend, get_kv_class
import sglang.srt.managers.disagg_service as service
out = {"choices": DISAGG_TRANSFER_BACKEND_CHOICES,
       "rebound": (service.TransferBackend is TransferBackend
                   and service.get_kv_class is get_kv_class),
       "backends": {}}
for name in ("kvpoll", "fake", "mooncake", "nixl"):
    try:
        backend = TransferBackend(name)
        out["backends"][name] = {t.value: getattr(get_kv_class(backend, t), "__qualname__", None)
                                 for t in KVClassType}
    except Exception as exc:
        out["backends"][name] = repr(exc)
from sglang.srt.server_args import prepare_server_args
args = prepare_server_args(["--model-path", "dummy", "--device", "cpu", "--disaggregation-mode",
                            "prefill", "--disaggregation-transfer-backend", "kvpoll"])
out["cli"] = args.disaggregation_transfer_backend
print(json.dumps(out))
"""


def test_plugin_makes_kvpoll_a_backend_and_keeps_the_builtin_ones(sglang: Any) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PLUGIN_CHECK, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert "kvpoll" in out["choices"]
    assert out["rebound"]  # modules that imported the names see the new ones
    assert out["cli"] == "kvpoll"  # --disaggregation-transfer-backend kvpoll parses
    assert out["backends"]["kvpoll"] == {
        "kvargs": "KVArgs",
        "manager": "KvpollKVManager",
        "sender": "KvpollKVSender",
        "receiver": "KvpollKVReceiver",
        "bootstrap_server": "KvpollKVBootstrapServer",
    }
    assert out["backends"]["fake"]["sender"] == "FakeKVSender"
    for name in ("mooncake", "nixl"):
        assert out["backends"][name]["manager"] == f"{name.capitalize()}KVManager", out


# -- the bootstrap server --------------------------------------------------------------------
def _free_port() -> int:
    """A free port below the kernel's ephemeral range: one from bind(0) could be
    handed again to a peer's own bind(0) (its kvpoll endpoint) before SGLang's
    bootstrap server binds it ("address already in use", seen once)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


ROW: dict[str, Any] = {
    "attn_tp_size": 1, "attn_tp_rank": 0, "attn_cp_size": 1, "attn_cp_rank": 0,
    "attn_dp_size": 1, "attn_dp_rank": 0, "pp_size": 1, "pp_rank": 0,
    "system_dp_size": 1, "system_dp_rank": 0, "rank_ip": "127.0.0.1", "rank_port": 1,
    "page_size": 16, "kv_cache_dtype": "bfloat16",
}  # fmt: skip


def test_bootstrap_server_hands_out_each_ranks_kvpoll_address(sglang: Any) -> None:
    import requests

    from kvpoll.integrations.sglang import KvpollKVBootstrapServer

    port = _free_port()
    server = KvpollKVBootstrapServer(host="127.0.0.1", port=port)
    try:
        url = f"http://127.0.0.1:{port}/route"
        deadline = time.monotonic() + 20
        while True:
            try:
                refused = requests.put(url, json=ROW, timeout=5)  # a built-in backend's rank
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert refused.status_code == 400
        assert "kvpoll_address" in refused.text
        address = "tcp://127.0.0.1:5555"
        assert requests.put(url, json={**ROW, "kvpoll_address": address}, timeout=5).ok
        query = "prefill_dp_rank=0&prefill_cp_rank=0&target_tp_rank=0&target_pp_rank=0"
        got = requests.get(f"{url}?{query}", timeout=5).json()
        assert got == {
            "rank_ip": "127.0.0.1",
            "rank_port": 1,
            "kvpoll_address": address,
            "kvpoll_state_addresses": [],
        }
        bad = {**ROW, "kvpoll_address": address, "kvpoll_state_addresses": "tcp://x"}
        assert requests.put(url, json=bad, timeout=5).status_code == 400
        info = requests.get(url.replace("/route", "/route?") + query.replace("0", "-1"), timeout=5)
        assert info.ok
        assert info.json()["page_size"] == 16
    finally:
        server.close()


# -- end to end: a prefill and a decode scheduler rank in real processes -----------------------
HEARTBEAT = {"KVPOLL_HEARTBEAT_INTERVAL": "0.2", "KVPOLL_HEARTBEAT_MISSES": "3"}
WINDOW = 0.2 * 3


class Peers:
    """The two scheduler ranks of one scenario; their JSON lines, by event."""

    def __init__(self, scenario: str, room: int, **env_extra: str) -> None:
        port = _free_port()
        env = {**os.environ, **HEARTBEAT, "SGLANG_HOST_IP": "127.0.0.1", **env_extra}
        env.pop("KVPOLL_CONFIG", None)

        def start(role: str) -> subprocess.Popen[str]:
            return subprocess.Popen(
                [sys.executable, "-m", "tests.sglang_peers", role, scenario, str(port), str(room)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

        self.prefill = start("prefill")
        self.decode = start("decode")
        self.lines: dict[str, list[dict[str, Any]]] = {"prefill": [], "decode": []}

    def event(self, role: str, name: str, timeout: float = 90) -> dict[str, Any]:
        proc = self.prefill if role == "prefill" else self.decode
        for seen in self.lines[role]:
            if seen["event"] == name:
                return seen
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            raw = proc.stdout.readline()
            if not raw:
                stderr = proc.stderr.read() if proc.stderr else ""
                raise AssertionError(f"{role} ended before {name!r}:\n{stderr[-4000:]}")
            line: dict[str, Any] = json.loads(raw)
            self.lines[role].append(line)
            if line["event"] == name:
                return line
        raise AssertionError(f"{role} sent no {name!r} within {timeout} s")

    def close(self) -> None:
        for proc in (self.prefill, self.decode):
            try:
                proc.communicate(timeout=20)  # each ends by itself once its request is done
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate(timeout=30)


@pytest.fixture
def peers(sglang: Any) -> Iterator[Any]:
    made: list[Peers] = []

    def start(scenario: str, room: int, **env: str) -> Peers:
        made.append(Peers(scenario, room, **env))
        return made[-1]

    yield start
    for p in made:
        p.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_request_moves_page_by_page_with_its_aux_row(
    peers: Any, tmp_path: Path, kvpoll_cmd: list[str]
) -> None:
    room = 2**62 + 12345
    log = tmp_path / "status-{side}.jsonl"
    run = peers("ok", room, KVPOLL_SGLANG_STATUS_LOG=str(log))
    sent = run.event("prefill", "data")
    got = run.event("decode", "done")
    done = run.event("prefill", "done")
    assert got["status"] == done["status"] == 4, (got, done)
    assert got["pages"] == sent["pages"]  # every page of every layer's K and V, in order
    assert got["aux"] == sent["aux"]
    assert got["room_row"] == room  # the metadata gate's field
    assert got["state"] == sent["state"]  # the mamba-like state slot, on its own lane
    # before init() the prefill saw only Bootstrapping / WaitingForInput; the decode side
    # never saw Transferring (its pages held all the data) nor a step back
    assert set(done["polls_before_init"]) <= {1, 2}
    assert set(done["polls"]) <= {1, 2, 3, 4}  # after a send: on its way, or done already
    assert got["polls"] == [1, 2, 4]
    metric = done["metric"]
    page_bytes = 4 * 2 * 16 * 2 * 8 * 2  # buffers x page: tokens x heads x dim x bf16
    assert metric["transfer_total_bytes"] >= 5 * page_bytes
    assert metric["transfer_latency_s"] > 0
    assert metric["alloc_latency_s"] > 0
    run.close()
    for side, lane in [(s, lane) for s in ("sender", "receiver") for lane in ("", ".state0")]:
        # each rank's status logs (the KV rooms', the state lane's) pass the audit
        path = str(log).format(side=side).replace(".jsonl", f"{lane}.jsonl")
        steps = [json.loads(line) for line in Path(path).read_text().splitlines()]
        assert [s["status"] for s in steps] == ["WaitingForInput", "Success"], steps
        audit = subprocess.run(
            [*kvpoll_cmd, "check-trace", path],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert audit.returncode == 0, audit.stdout + audit.stderr


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_killed_prefill_fails_the_decode_within_the_heartbeat_window(peers: Any) -> None:
    run = peers("kill", 77)
    run.event("prefill", "first_chunk_sent")
    run.prefill.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    got = run.event("decode", "done")
    assert got["status"] == 0
    assert got["pages"] is None
    assert got["failed_at"] - killed_at < WINDOW + 2.0, got["failed_at"] - killed_at
    assert got["reason"].startswith("KVTransferError")
    assert "silent" in got["reason"]


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("side", ["prefill", "decode"])
def test_an_abort_from_either_side_reaches_the_other(peers: Any, side: str) -> None:
    run = peers(f"abort-{side}", 78)
    other = "decode" if side == "prefill" else "prefill"
    theirs, mine = run.event(other, "done"), run.event(side, "done")
    assert theirs["status"] == mine["status"] == 0
    assert f"aborted by the {side} scheduler" in theirs["reason"]
    assert theirs["reason"].startswith("KVTransferError")


def test_host_memory_is_found_on_the_cpu() -> None:
    from kvpoll.integrations.sglang.memory import pointer_device

    t = torch.zeros(16, dtype=torch.uint8)
    assert pointer_device(t.data_ptr()) == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_memory_is_viewed_where_it_lives() -> None:
    from kvpoll.integrations.sglang.memory import pointer_device

    t = torch.arange(64, dtype=torch.uint8, device="cuda")
    assert pointer_device(t.data_ptr()) == f"cuda:{t.device.index or 0}"
    view = buffer_view(t.data_ptr(), 64, pointer_device(t.data_ptr()))
    assert view.device == t.device
    assert torch.equal(view, t)  # the same memory, no copy
    t[0] = 200
    assert int(view[0]) == 200
