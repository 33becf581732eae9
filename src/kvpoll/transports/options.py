"""A transport's options, typed from its constructor, and the checks every source goes through.

A transport's options are its constructor's keyword parameters; their
annotations say what each takes. Values from a file, a ``KVPOLL_*`` variable,
``--option`` or code arguments all pass :func:`check_options`, which converts
text where the type is clear (``"false"``/``"no"``/``"0"`` to ``False``,
``"7.5"`` to ``7.5``) and refuses the rest with the option, where it came from
and what is accepted.
"""

from __future__ import annotations

import difflib
import inspect
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kvpoll.errors import InvalidArgument
from kvpoll.transports.base import TransportError

__all__ = ["Option", "OptionError", "check_options", "describe_type", "parse_text", "schema"]

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


class OptionError(TransportError, InvalidArgument):
    """A transport option that does not exist, or a value it does not take."""


@dataclass(frozen=True)
class Option:
    """One keyword option of a transport."""

    name: str
    type: Any  # the annotation, evaluated (Any when it cannot be)
    default: Any


def schema(factory: Callable[..., Any]) -> dict[str, Option] | None:
    """The options ``factory`` (a transport class or function) takes, or None
    when it takes ``**kwargs`` (anything goes)."""
    target = factory.__init__ if isinstance(factory, type) else factory  # type: ignore[misc]
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that does not evaluate here: accept any value
        hints = {}
    options: dict[str, Option] = {}
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:
            return None
        if param.name == "self" or param.kind in (param.VAR_POSITIONAL, param.POSITIONAL_ONLY):
            continue
        default = None if param.default is param.empty else param.default
        options[param.name] = Option(param.name, hints.get(param.name, Any), default)
    return options


def parse_text(text: str) -> Any:
    """A value written as text (a variable, ``--option``): TOML when it parses, else the text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def describe_type(kind: Any) -> str:
    """What a type accepts, in words for an error message."""
    if kind is bool:
        return "a boolean (true/false, yes/no, on/off, 1/0)"
    if kind is int:
        return "an integer"
    if kind is float:
        return "a number"
    if kind is str:
        return "a string"
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(kind))
    if origin in (dict, Mapping) or kind in (dict, Mapping):
        return 'a table ({ KEY = "value", ... })'
    if origin in (list, tuple) or kind in (list, tuple):
        return "a list"
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if args and origin is not None:
        return " or ".join(describe_type(a) for a in args)
    return getattr(kind, "__name__", str(kind))


def _convert(kind: Any, value: Any) -> Any:
    """``value`` as ``kind``, or raise ValueError."""
    if kind is Any or kind is object:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise ValueError
    if kind is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value.strip())
        raise ValueError
    if kind is float:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        raise ValueError
    if kind is str:
        if isinstance(value, bool | dict | list):
            raise ValueError
        return str(value)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        if value in args:
            return value
        raise ValueError
    if origin in (dict, Mapping) or kind in (dict, Mapping):
        if isinstance(value, str):
            value = parse_text(value)
        if not isinstance(value, Mapping):
            raise ValueError
        return dict(value)
    if origin in (list, tuple) or kind in (list, tuple):
        if isinstance(value, str):
            value = parse_text(value)
        if not isinstance(value, list | tuple):
            raise ValueError
        return list(value)
    if origin is not None and args:  # a union: the first member that takes it
        if value is None and type(None) in args:
            return None
        for member in args:
            if member is type(None):
                continue
            try:
                return _convert(member, value)
            except (ValueError, TypeError):
                continue
        raise ValueError
    return value


def check_options(
    transport: str,
    options: Mapping[str, Any],
    factory: Callable[..., Any] | None,
    sources: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``options`` checked against what ``factory`` takes, text converted.

    Args:
        transport: its name, for messages.
        options: option -> value.
        factory: the transport class (None: it cannot be loaded here, the
            options are passed on unchecked).
        sources: option -> where it came from (``env KVPOLL_ZMQ_SHM``), for messages.

    Raises:
        OptionError: an unknown option, or a value of the wrong type; the message
            names the option, its source and what is accepted.
    """
    known = schema(factory) if factory is not None else None
    if known is None:
        return dict(options)
    checked: dict[str, Any] = {}
    for name, value in options.items():
        where = f" ({sources[name]})" if sources and name in sources else ""
        spec = known.get(name)
        if spec is None:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise OptionError(
                f"the {transport!r} transport has no option {name!r}{where}{hint} "
                f"(its options: {', '.join(sorted(known)) or 'none'})"
            )
        try:
            checked[name] = _convert(spec.type, value)
        except (ValueError, TypeError):
            raise OptionError(
                f"option {name!r} of the {transport!r} transport{where} takes "
                f"{describe_type(spec.type)}, not {value!r}"
            ) from None
    return checked
