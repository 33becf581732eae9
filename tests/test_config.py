"""Configuration layers, ``kvpoll config show``, and endpoints reading the configuration."""

from __future__ import annotations

import json
import re
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
        "KVPOLL_OTHER": "not ours",  # means nothing here: reported, not used
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
    assert [line.split(":")[0] for line in config.unknown_variables] == [
        "unknown variable KVPOLL_OTHER"
    ]


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
            assert endpoint.heartbeat_interval == 0.25
    # an explicit argument wins over the file
    with Sender(transport_options={"shm": True}, heartbeat_interval=2.0) as tx:
        assert tx.transport.paths() == ["zmq/shm", "zmq/tcp"]
        assert tx.heartbeat_interval == 2.0


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


@pytest.mark.parametrize("text", ["False", "FALSE", "false", "no", "off", "0"])
def test_a_boolean_variable_reads_every_spelling_of_false(text: str) -> None:
    config = load_config(environ={"KVPOLL_ZMQ_SHM": text})
    assert config.options("zmq") == {"shm": False}
    assert config.sources["transports.zmq.shm"] == "env KVPOLL_ZMQ_SHM"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("KVPOLL_TRANSPORT", "ucxx", r"unknown transport 'ucxx'; did you mean 'ucx'\?"),
        ("KVPOLL_ZMQ_SHMM", "false", r"no option 'shmm' .*KVPOLL_ZMQ_SHMM.*did you mean 'shm'"),
        ("KVPOLL_ZMQ_SHM", "maybe", r"KVPOLL_ZMQ_SHM\) takes a boolean \(true/false"),
        ("KVPOLL_ZMQ_WRITE_TIMEOUT", "soon", r"KVPOLL_ZMQ_WRITE_TIMEOUT\) takes a number"),
        ("KVPOLL_ZMQ_PORT", "1.5", r"takes an integer"),
    ],
)
def test_a_bad_variable_is_a_config_error_naming_it(
    variable: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(environ={variable: value})


def test_a_bad_option_in_the_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "kvpoll.toml"
    path.write_text("[transports.zmq]\nshm = 'sometimes'\n")
    with pytest.raises(ConfigError, match=rf"file {re.escape(str(path))}.*takes a boolean"):
        load_config(path, environ={})


def test_options_given_in_code_are_checked_too() -> None:
    from kvpoll.transports import TransportError
    from kvpoll.transports.options import OptionError

    with pytest.raises(OptionError, match=r"no option 'shmm'.*did you mean 'shm'") as info:
        Sender(transport_options={"shmm": False})
    assert isinstance(info.value, TransportError)
    with Sender(transport_options={"shm": "no"}) as tx:  # text is converted as for variables
        assert tx.transport.paths() == ["zmq/tcp"]


def test_misspelled_variables_are_reported(capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(environ={"KVPOLL_TRANSPROT": "ucx"})
    assert config.transport == "zmq"
    assert config.unknown_variables == [
        "unknown variable KVPOLL_TRANSPROT: did you mean KVPOLL_TRANSPORT?"
    ]


def test_config_show_fails_on_a_misspelled_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVPOLL_TRANSPROT", "ucx")
    assert main(["config", "show"]) == 1
    assert "did you mean KVPOLL_TRANSPORT?" in capsys.readouterr().err
    monkeypatch.delenv("KVPOLL_TRANSPROT")
    monkeypatch.setenv("KVPOLL_ZMQ_SHM", "maybe")
    assert main(["config", "show"]) == 2
    assert "takes a boolean" in capsys.readouterr().err


def test_config_show_lists_every_transports_defaults(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import tomllib

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVPOLL_ZMQ_SHM", "no")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    zmq = tomllib.loads(out)["transports"]["zmq"]
    assert zmq["shm"] is False  # set, with its source
    assert zmq["write_timeout"] == 30.0  # defaults
    assert zmq["max_attached"] == 256
    assert "shm = false                              # env KVPOLL_ZMQ_SHM" in out
    assert "[transports.loopback]" in out
