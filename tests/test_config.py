"""Configuration layers, ``kvpoll config show``, and endpoints reading the configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvpoll.cli import main
from kvpoll.config import ConfigError, load_config
from kvpoll.protocol import Receiver, Sender

FILE = """\
transport = "zmq"
heartbeat_interval = 0.25

[timeouts]
Transferring = 60
WaitingForInput = 0

[transports.zmq]
shm = false
write_timeout = 7.5
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "kvpoll.toml"
    path.write_text(FILE)
    return path


def test_defaults_when_nothing_is_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(environ={"XDG_CONFIG_HOME": str(tmp_path)})
    assert config.transport == "zmq"
    assert config.heartbeat_interval == 1.0
    assert config.timeouts == {
        "Bootstrapping": 300.0,
        "WaitingForInput": 300.0,
        "Transferring": 300.0,
    }
    assert config.file is None
    assert {source for _, _, source in config.items()} == {"default"}


def test_file_then_environment_then_arguments(config_file: Path) -> None:
    env = {
        "KVPOLL_TRANSPORT": "ucx",
        "KVPOLL_UCX_PROGRESS": "polling",
        "KVPOLL_ZMQ_WRITE_TIMEOUT": "9",
        "KVPOLL_TIMEOUT_BOOTSTRAPPING": "12.5",
        "KVPOLL_OTHER": "not ours",  # no underscore after the prefix part: ignored
    }
    config = load_config(config_file, environ=env, overrides={"heartbeat_misses": 5})
    assert config.transport == "ucx"
    assert config.sources["transport"] == "env KVPOLL_TRANSPORT"
    assert config.heartbeat_interval == 0.25
    assert config.sources["heartbeat_interval"] == f"file {config_file}"
    assert config.heartbeat_misses == 5
    assert config.sources["heartbeat_misses"] == "argument"
    assert config.timeouts["Transferring"] == 60.0
    assert config.timeouts["WaitingForInput"] is None  # 0: no limit
    assert config.timeouts["Bootstrapping"] == 12.5
    assert config.options("zmq") == {"shm": False, "write_timeout": 9}
    assert config.sources["transports.zmq.write_timeout"] == "env KVPOLL_ZMQ_WRITE_TIMEOUT"
    assert config.options() == {"progress": "polling"}  # the selected transport's


def test_kvpoll_config_names_the_file(config_file: Path) -> None:
    config = load_config(environ={"KVPOLL_CONFIG": str(config_file)})
    assert config.file == config_file
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(environ={"KVPOLL_CONFIG": str(config_file) + ".missing"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("transport = ", "cannot read"),
        ("colour = 'blue'", "unknown key 'colour'"),
        ("heartbeat_misses = 0", "heartbeat_misses"),
        ("heartbeat_interval = 'soon'", "heartbeat_interval"),
        ("[timeouts]\nSuccess = 3", "only Bootstrapping"),
        ("[timeouts]\nTransferring = -1", "seconds >= 0"),
        ("transports = 3", "must be a table"),
    ],
)
def test_a_malformed_file_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, environ={})
    assert str(path) in str(info.value) or message == "cannot read"


def test_a_malformed_variable_names_it() -> None:
    with pytest.raises(ConfigError, match="KVPOLL_HEARTBEAT_MISSES"):
        load_config(environ={"KVPOLL_HEARTBEAT_MISSES": "many"})


def test_config_show_prints_values_and_sources(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KVPOLL_HEARTBEAT_MISSES", "4")
    assert main(["config", "show", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert f"# kvpoll configuration (file: {config_file})" in out
    lines = {
        line.split("#")[0].strip(): line.split("#", 1)[1].strip()
        for line in out.splitlines()
        if "=" in line
    }
    assert lines['transport = "zmq"'] == f"file {config_file}"
    assert lines["heartbeat_misses = 4"] == "env KVPOLL_HEARTBEAT_MISSES"
    assert lines["command_timeout = 30.0"] == "default"
    assert lines["WaitingForInput = 0"].endswith("0 = no limit")
    assert "[transports.zmq]" in out
    import tomllib

    reread = tomllib.loads(out)  # what it prints is a valid file
    assert reread["transports"]["zmq"]["write_timeout"] == 7.5


def test_config_show_json_and_errors(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--json", "--config", str(config_file)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["values"]["transports"]["zmq"]["shm"] is False
    assert data["sources"]["timeouts.Transferring"] == f"file {config_file}"
    assert main(["config", "show", "--config", str(config_file) + ".missing"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["config"]) == 2


def test_endpoints_read_the_configuration(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVPOLL_CONFIG", str(config_file))
    with Sender() as tx, Receiver(config=load_config(config_file, environ={})) as rx:
        for endpoint in (tx, rx):
            assert endpoint.transport.name == "zmq"
            assert endpoint.transport.paths() == ["zmq/tcp"]  # shm = false in the file
            assert endpoint._interval == 0.25
    # an explicit argument wins over the file
    with Sender(transport_options={"shm": True}, heartbeat_interval=2.0) as tx:
        assert tx.transport.paths() == ["zmq/shm", "zmq/tcp"]
        assert tx._interval == 2.0


def test_demo_reads_the_configuration_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "none.toml"
    assert main(["demo", "--config", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('transport = "smoke-signals"\n')
    assert main(["demo", "--config", str(bad), "--no-failure"]) == 2
    assert "unknown transport 'smoke-signals'" in capsys.readouterr().err
