"""``kvpoll config show``: the effective configuration and where each value came from."""

from __future__ import annotations

import json
import math
from typing import Any, TextIO

from kvpoll.config import Config

__all__ = ["render", "render_json", "toml_value"]


def toml_value(value: Any) -> str:
    """``value`` written as a TOML value (None, which TOML lacks, as 0: no limit)."""
    if value is None:
        return "0"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    return json.dumps(str(value))


def _key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def transport_defaults() -> dict[str, dict[str, Any] | None]:
    """Each known transport's options and their defaults (None: not loadable here)."""
    from kvpoll.transports import TransportUnavailable, available, resolve
    from kvpoll.transports.options import schema

    found: dict[str, dict[str, Any] | None] = {}
    for name in available():
        try:
            options = schema(resolve(name))
        except TransportUnavailable:
            found[name] = None
            continue
        found[name] = {o.name: o.default for o in (options or {}).values()}
    return found


def render(config: Config, out: TextIO) -> None:
    """Write ``config`` as a TOML file, each value commented with its source; every
    transport's options that are not set are listed with their defaults."""
    file = str(config.file) if config.file else "none found"
    print(f"# kvpoll configuration (file: {file})", file=out)
    table = None
    for key, value, source in config.items():
        section, _, name = key.rpartition(".")
        if section.startswith("transports."):
            break
        if section != (table or ""):
            table = section
            print(f"\n[{'.'.join(_key(p) for p in section.split('.'))}]", file=out)
        if key == "secret_file" and value is None:
            line, note = "# secret_file = (unset)", f"{source}: connections are not authenticated"
        else:
            line = f"{_key(name)} = {toml_value(value)}"
            note = f"{source}; 0 = no limit" if value is None else source
        print(f"{line:<40} # {note}", file=out)
    defaults = transport_defaults()
    for transport in sorted(set(defaults) | set(config.transports)):
        print(f"\n[transports.{_key(transport)}]", file=out)
        given = config.transports.get(transport, {})
        for name, value in sorted(given.items()):
            line = f"{_key(name)} = {toml_value(value)}"
            print(f"{line:<40} # {config.sources.get(f'transports.{transport}.{name}')}", file=out)
        known = defaults.get(transport)
        if known is None:
            print("# (not installed here: its defaults are unknown)", file=out)
            continue
        for name, value in sorted(known.items()):
            if name in given:
                continue
            if value is None:
                print(f"{'# ' + _key(name) + ' = (unset)':<40} # default", file=out)
            else:
                print(f"{_key(name) + ' = ' + toml_value(value):<40} # default", file=out)
    ucx = ucx_settings(config)
    if ucx is not None:
        print("\n# What the ucx transport hands UCX (UCX's variables, not kvpoll keys):", file=out)
        for key, value, source in ucx:
            print(f"{'#   UCX_' + key + ' = ' + value:<40} # {source}", file=out)


def ucx_settings(config: Config) -> list[tuple[str, str, str]] | None:
    """What the ``ucx`` transport would give UCX, when ucx is the selected transport."""
    if config.transport != "ucx":
        return None
    try:
        from kvpoll.transports.ucx_transport import settings_with_sources
    except ImportError:
        return None
    options = config.options("ucx")
    explicit = options.get("ucx") if isinstance(options.get("ucx"), dict) else None
    return settings_with_sources(str(options.get("host", "127.0.0.1")), explicit)


def render_json(config: Config, out: TextIO) -> None:
    """Write ``config`` as JSON: values and sources."""
    data = {
        "file": str(config.file) if config.file else None,
        "values": config.to_dict(),
        "sources": {key: source for key, _, source in config.items()},
        "transport_defaults": transport_defaults(),
        "unknown_variables": config.unknown_variables,
    }
    ucx = ucx_settings(config)
    if ucx is not None:
        data["ucx_settings"] = {f"UCX_{k}": {"value": v, "source": s} for k, v, s in ucx}
    print(json.dumps(data, indent=2), file=out)
