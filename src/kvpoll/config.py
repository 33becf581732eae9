"""Configuration: which transport a cluster uses, its options, and the endpoints' timings.

Values come from four layers; a later layer wins over an earlier one:

1. kvpoll's defaults;
2. a TOML file: the path in ``KVPOLL_CONFIG``, else ``./kvpoll.toml``, else
   ``$XDG_CONFIG_HOME/kvpoll/config.toml`` (``~/.config/...``); the first that
   exists (a path given explicitly must exist);
3. environment variables: ``KVPOLL_TRANSPORT``, ``KVPOLL_SECRET_FILE``,
   ``KVPOLL_HEARTBEAT_INTERVAL``,
   ``KVPOLL_HEARTBEAT_MISSES``, ``KVPOLL_COMMAND_TIMEOUT``,
   ``KVPOLL_TIMEOUT_<STATUS>`` (``KVPOLL_TIMEOUT_TRANSFERRING=60``) and
   ``KVPOLL_<TRANSPORT>_<OPTION>`` for a transport's options
   (``KVPOLL_UCX_PROGRESS=polling``). Values are read as TOML values where
   they parse as one (``5``, ``true``, ``["a"]``), else as strings, then as
   the type the setting takes (``False``, ``no``, ``0`` are false); any other
   ``KVPOLL_*`` variable is reported (a warning, and in ``kvpoll config show``);
4. arguments given in code (``load_config(overrides=...)``, or a
   ``Sender(transport="ucx")`` argument).

The file::

    transport = "ucx"            # the transport every endpoint opens
    secret_file = "/etc/kvpoll/secret"  # the cluster secret (docs/security.md)
    heartbeat_interval = 1.0
    heartbeat_misses = 3
    command_timeout = 30.0

    [timeouts]                   # seconds per non-final status; 0 = no limit
    Transferring = 60

    [transports.ucx]             # keyword options of the transport
    progress = "polling"
    ucx = { TLS = "tcp" }

:func:`load_config` returns a :class:`Config` that remembers where each value
came from; ``kvpoll config show`` prints it. Every value is checked when it is
read: the transport's name against the transports known here, each transport
option against what the transport's constructor takes (name and type); a bad
one is a :class:`ConfigError` naming the file or variable and what is accepted.
"""

from __future__ import annotations

import difflib
import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpoll.errors import InvalidArgument
from kvpoll.statemachine.status import parse_status

__all__ = ["KNOWN_VARIABLES", "Config", "ConfigError", "default_config_paths", "load_config"]

log = logging.getLogger("kvpoll.config")

ENV_PREFIX = "KVPOLL_"
KNOWN_VARIABLES = frozenset(
    {
        "KVPOLL_CONFIG",  # the configuration file
        "KVPOLL_SGLANG_STATUS_LOG",  # kvpoll.integrations.sglang
        "KVPOLL_SGLANG_ANY_VERSION",
    }
)
"""``KVPOLL_*`` variables read elsewhere than the configuration's layers."""
_warned: set[str] = set()
_TOP: dict[str, Any] = {
    "transport": "zmq",
    "secret_file": None,
    "heartbeat_interval": 1.0,
    "heartbeat_misses": 3,
    "command_timeout": 30.0,
}
_NON_FINAL = ("Bootstrapping", "WaitingForInput", "Transferring")
_DEFAULT_TIMEOUT = 300.0


class ConfigError(InvalidArgument):
    """A configuration file or variable is malformed; the message names it."""


@dataclass
class Config:
    """The effective configuration and where each value came from.

    ``sources`` maps a dotted key (``transport``, ``timeouts.Transferring``,
    ``transports.ucx.progress``) to ``default``, ``file <path>``, ``env
    <VARIABLE>`` or ``argument``.
    """

    transport: str = "zmq"
    secret_file: str | None = None
    """The cluster secret's file (relative paths in a file are relative to it);
    None: connections are not authenticated (see docs/security.md)."""
    heartbeat_interval: float = 1.0
    heartbeat_misses: int = 3
    command_timeout: float = 30.0
    timeouts: dict[str, float | None] = field(
        default_factory=lambda: dict.fromkeys(_NON_FINAL, _DEFAULT_TIMEOUT)
    )
    transports: dict[str, dict[str, Any]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    file: Path | None = None
    unknown_variables: list[str] = field(default_factory=list)
    """``KVPOLL_*`` variables that mean nothing to kvpoll (misspelled?), with a hint."""

    def options(self, transport: str | None = None) -> dict[str, Any]:
        """Keyword options for ``transport`` (default: the selected one)."""
        return dict(self.transports.get(transport or self.transport, {}))

    def endpoint_arguments(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~kvpoll.Sender` / :class:`~kvpoll.Receiver`."""
        return {
            "transport": self.transport,
            "transport_options": self.options(),
            "timeouts": dict(self.timeouts),
            "heartbeat_interval": self.heartbeat_interval,
            "heartbeat_misses": self.heartbeat_misses,
            "command_timeout": self.command_timeout,
        }

    def items(self) -> list[tuple[str, Any, str]]:
        """(dotted key, value, source) of every value, in a stable order."""
        rows: list[tuple[str, Any, str]] = [
            (key, getattr(self, key), self.sources.get(key, "default")) for key in _TOP
        ]
        for status in _NON_FINAL:
            key = f"timeouts.{status}"
            rows.append((key, self.timeouts.get(status), self.sources.get(key, "default")))
        for name in sorted(self.transports):
            for option, value in sorted(self.transports[name].items()):
                key = f"transports.{name}.{option}"
                rows.append((key, value, self.sources.get(key, "default")))
        return rows

    def to_dict(self) -> dict[str, Any]:
        """The values as plain data (TOML/JSON shaped), without sources."""
        return {
            **{key: getattr(self, key) for key in _TOP},
            "timeouts": dict(self.timeouts),
            "transports": {k: dict(v) for k, v in self.transports.items()},
        }


def default_config_paths(environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where a configuration file is looked for, in order, when none is named."""
    env = os.environ if environ is None else environ
    xdg = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [Path("kvpoll.toml"), xdg / "kvpoll" / "config.toml"]


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    report_unknown: bool = True,
) -> Config:
    """Read the configuration from every layer (see the module docstring).

    Args:
        path: a TOML file (must exist); default: ``KVPOLL_CONFIG`` or the first
            of :func:`default_config_paths` that exists.
        environ: the environment to read (default ``os.environ``).
        overrides: values given in code, shaped like the file
            (``{"transport": "ucx", "transports": {"ucx": {...}}}``).
        report_unknown: log a warning (logger ``kvpoll.config``, once per
            process) for each ``KVPOLL_*`` variable that means nothing here;
            they are in :attr:`Config.unknown_variables` either way.

    Raises:
        ConfigError: an unreadable or malformed file, an unknown key, a value of
            the wrong type; the message names the file or variable.
    """
    env = os.environ if environ is None else environ
    config = Config()
    file = _find_file(path, env)
    if file is not None:
        try:
            data = tomllib.loads(file.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read the configuration file {file}: {exc}") from exc
        config.file = file
        _apply(config, data, f"file {file}")
    from_env, config.unknown_variables = _from_environment(env)
    _apply(config, from_env, None)
    if overrides:
        _apply(config, dict(overrides), "argument")
    _check(config)
    for line in config.unknown_variables if report_unknown else ():
        if line not in _warned:
            _warned.add(line)
            log.warning("%s", line)
    return config


def _check(config: Config) -> None:
    """The transport's name and every transport option, checked (and text converted)."""
    from kvpoll.transports import TransportUnavailable, available, resolve
    from kvpoll.transports.options import OptionError, check_options

    known = available()
    if config.transport not in known:
        close = difflib.get_close_matches(config.transport, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"transport in {config.sources.get('transport', 'default')}: unknown transport "
            f"{config.transport!r}{hint} (known: {', '.join(known)})"
        )
    for name, options in config.transports.items():
        if not options or name not in known:
            continue
        try:
            factory = resolve(name)
        except TransportUnavailable:
            continue  # not installed here: its options cannot be checked
        sources = {o: config.sources.get(f"transports.{name}.{o}", "?") for o in options}
        try:
            config.transports[name] = check_options(name, options, factory, sources)
        except OptionError as exc:
            raise ConfigError(str(exc)) from None


def _find_file(path: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path | None:
    named = path if path is not None else env.get(f"{ENV_PREFIX}CONFIG")
    if named:
        file = Path(named)
        if not file.is_file():
            raise ConfigError(f"the configuration file {file} does not exist")
        return file
    return next((p for p in default_config_paths(env) if p.is_file()), None)


def _from_environment(env: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The environment's values, shaped like a file, each tagged with its variable;
    and a line on each ``KVPOLL_*`` variable that means nothing here."""
    from kvpoll.transports import available
    from kvpoll.transports.options import parse_text

    transports = available()
    data: dict[str, Any] = {}
    unknown: list[str] = []
    for variable in sorted(env):
        if not variable.startswith(ENV_PREFIX) or variable in KNOWN_VARIABLES:
            continue
        rest = variable[len(ENV_PREFIX) :].lower()
        value = (parse_text(env[variable]), f"env {variable}")
        name, _, option = rest.partition("_")
        if rest in _TOP:
            data[rest] = value
        elif rest.startswith("timeout_"):
            data.setdefault("timeouts", {})[rest.removeprefix("timeout_")] = value
        elif name in transports and option:
            data.setdefault("transports", {}).setdefault(name, {})[option] = value
        else:
            unknown.append(_unknown_variable(variable, transports))
    return data, unknown


def _unknown_variable(variable: str, transports: list[str]) -> str:
    names = [f"{ENV_PREFIX}{key.upper()}" for key in _TOP]
    names += [f"{ENV_PREFIX}TIMEOUT_{s.upper()}" for s in _NON_FINAL]
    names += sorted(KNOWN_VARIABLES)
    close = difflib.get_close_matches(variable, names, n=1, cutoff=0.8)
    hint = (
        f"did you mean {close[0]}?"
        if close
        else (
            f"kvpoll reads {ENV_PREFIX}<SETTING>, {ENV_PREFIX}TIMEOUT_<STATUS> and "
            f"{ENV_PREFIX}<TRANSPORT>_<OPTION> ({', '.join(transports)})"
        )
    )
    return f"unknown variable {variable}: {hint}"


def _unwrap(value: Any, source: str | None) -> tuple[Any, str]:
    if source is None:  # environment values carry their own source
        return value[0], value[1]
    return value, source


def _apply(config: Config, data: Mapping[str, Any], source: str | None) -> None:
    where = source or "the environment"
    for key, raw in data.items():
        if key == "timeouts":
            _apply_timeouts(config, _table(raw, key, where), source)
        elif key == "transports":
            for name, options in _table(raw, key, where).items():
                table = config.transports.setdefault(str(name), {})
                for option, item in _table(options, f"transports.{name}", where).items():
                    value, origin = _unwrap(item, source)
                    table[str(option)] = value
                    config.sources[f"transports.{name}.{option}"] = origin
        elif key == "secret_file":
            value, origin = _unwrap(raw, source)
            config.secret_file = _secret_path(value, origin, config.file if source else None)
            config.sources[key] = origin
        elif key in _TOP:
            value, origin = _unwrap(raw, source)
            setattr(config, key, _typed(key, value, origin))
            config.sources[key] = origin
        else:
            known = ", ".join([*_TOP, "timeouts", "transports"])
            raise ConfigError(f"unknown key {key!r} in {where}; known: {known}")


def _apply_timeouts(config: Config, table: Mapping[str, Any], source: str | None) -> None:
    for key, item in table.items():
        value, origin = _unwrap(item, source)
        try:
            status = parse_status(str(key)).name
        except InvalidArgument:
            status = _status_from_snake(str(key))
        if status not in _NON_FINAL:
            raise ConfigError(
                f"timeouts.{key} in {origin}: only {', '.join(_NON_FINAL)} take a time-out"
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"timeouts.{key} in {origin} must be seconds >= 0, not {value!r}")
        config.timeouts[status] = float(value) or None
        config.sources[f"timeouts.{status}"] = origin


def _status_from_snake(key: str) -> str:
    joined = key.replace("_", "").lower()
    return next((s for s in _NON_FINAL if s.lower() == joined), key)


def _table(raw: Any, key: str, where: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{key} in {where} must be a table, not {raw!r}")
    return raw


def _secret_path(value: Any, origin: str, file: Path | None) -> str | None:
    """The secret file's path (checked: it must hold a usable secret), or None for ""."""
    from kvpoll.transports.auth import SecretError, read_secret

    if not isinstance(value, str):
        raise ConfigError(f"secret_file in {origin} must be a path, not {value!r}")
    if not value:
        return None
    path = Path(value).expanduser()
    if file is not None and origin.startswith("file ") and not path.is_absolute():
        path = file.parent / path
    try:
        read_secret(path)
    except SecretError as exc:
        raise ConfigError(f"secret_file in {origin}: {exc}") from None
    return str(path)


def _typed(key: str, value: Any, origin: str) -> Any:
    default = _TOP[key]
    if isinstance(default, str):
        ok = isinstance(value, str) and bool(value)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        value = float(value) if ok else value
    if not ok:
        raise ConfigError(f"{key} in {origin} has a bad value {value!r}")
    return value
