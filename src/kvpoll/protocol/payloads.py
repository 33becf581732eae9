"""The two messages every room sends, as wire bytes without building their models.

A receiver sends a ``bootstrap`` per room and a sender a ``chunk`` per chunk.
Building the pydantic model (which validates every field) and dumping it cost
5.4 us (chunk) and 9.9 us (a pool-form bootstrap) in a loop here, more inside a
running pair; these functions write the same JSON from the values in 2.1 and
5.5 us, checking each value against the model's bounds on the way. The
models in :mod:`kvpoll.protocol.messages` stay the schema: every peer still
reads these bytes through :func:`~kvpoll.protocol.messages.decode`, and the
tests check that each function gives exactly the bytes of
``encode(Model(...))`` for the same fields.

A value these functions do not write themselves (a string with characters JSON
escapes, a non-int where an int belongs) goes through the model instead, so
the bytes are the model's and a bad value raises as it would there.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from kvpoll.protocol.messages import (
    MAX_AUX_BYTES,
    MAX_RUNS,
    MAX_TOKEN_CHARS,
    Bootstrap,
    Chunk,
    encode,
)
from kvpoll.transports.base import RegionDescriptor

__all__ = ["bootstrap_payload", "chunk_payload"]


_COUNT = 1 << 62  # the models' Count: 0 <= n < 2**62
_POSITIVE = 1 << 40  # their Positive: 1 <= n < 2**40


def _plain(text: object, limit: int) -> bool:
    """A string of at most ``limit`` characters that JSON writes as it is."""
    return (
        type(text) is str
        and len(text) <= limit
        and text.isascii()
        and text.isprintable()
        and '"' not in text
        and "\\" not in text
    )


def _count(value: object) -> bool:
    return type(value) is int and 0 <= value < _COUNT


def _positive(value: object) -> bool:
    return type(value) is int and 1 <= value < _POSITIVE


def _room(value: object) -> bool:
    return type(value) is int and -(1 << 63) <= value < 1 << 63


def _runs(pages: Sequence[tuple[int, int]] | None) -> str | None:
    """Pool pages as JSON, or None where the model would refuse them."""
    if pages is None or not 0 < len(pages) <= MAX_RUNS:
        return None
    parts = []
    for first, count in pages:
        if not (type(first) is int and type(count) is int and 0 <= first < _POSITIVE):
            return None
        if not 1 <= count < _POSITIVE:
            return None
        parts.append(f"[{first},{count}]")
    return f"[{','.join(parts)}]"


_ABOUT: dict[tuple[tuple[str, ...], str], str | None] = {}


def _about(transports: Sequence[str], host: str) -> str | None:
    """The ``transports`` and ``host`` fields as JSON (None: not written here).
    The same few values come with every bootstrap of an endpoint: kept once made."""
    key = (tuple(transports), host)
    found = _ABOUT.get(key, "")
    if found != "":
        return found
    fragment = None
    plain = all(_plain(t, 1 << 20) for t in transports) and _plain(host, 128)
    if plain and len(transports) <= 16:
        paths = ",".join(f'"{t}"' for t in transports)
        fragment = f'"transports":[{paths}],"host":"{host}"'
    if len(_ABOUT) >= 64:
        _ABOUT.clear()
    _ABOUT[key] = fragment
    return fragment


def _inline_form(
    allocated_tokens: object, row_bytes: object, dtype: object, row_shape: object
) -> bool:
    """A region's size and layout as the model takes them."""
    return (
        _positive(allocated_tokens)
        and _positive(row_bytes)
        and _plain(dtype, 32)
        and isinstance(row_shape, list | tuple)
        and len(row_shape) <= 8
        and all(_count(n) for n in row_shape)
    )


def _opt(value: int | None) -> str:
    return "null" if value is None else str(value)


def _string(value: str | None) -> str:
    return "null" if value is None else f'"{value}"'


def _flag(value: bool) -> str:
    return "true" if value else "false"


def chunk_payload(
    *,
    room: int,
    session: int,
    rank: int,
    sent_tokens: int,
    chunk_tokens: int,
    is_last: bool,
    total_tokens: int | None,
    aux: bytes | None,
    transport: str | None,
) -> bytes:
    """``encode(Chunk(...))`` of these fields."""
    if not (
        _room(room)
        and _count(session)
        and _count(rank)
        and _count(sent_tokens)
        and _count(chunk_tokens)
        and type(is_last) is bool
        and (total_tokens is None or _count(total_tokens))
        and (aux is None or (type(aux) is bytes and len(aux) <= MAX_AUX_BYTES))
        and (transport is None or _plain(transport, 64))
    ):
        return encode(
            Chunk(
                room=room,
                session=session,
                rank=rank,
                sent_tokens=sent_tokens,
                chunk_tokens=chunk_tokens,
                is_last=is_last,
                total_tokens=total_tokens,
                aux=aux,
                transport=transport,
            )
        )
    encoded_aux = "null" if aux is None else f'"{base64.urlsafe_b64encode(aux).decode()}"'
    return (
        f'{{"v":1,"room":{room},"session":{session},"rank":{rank},"type":"chunk",'
        f'"sent_tokens":{sent_tokens},"chunk_tokens":{chunk_tokens},'
        f'"is_last":{_flag(is_last)},"total_tokens":{_opt(total_tokens)},'
        f'"aux":{encoded_aux},"transport":{_string(transport)}}}'
    ).encode()


def bootstrap_payload(
    *,
    room: int,
    session: int,
    rank: int,
    transports: Sequence[str],
    host: str,
    token: str | None,
    ack_with_chunk: bool,
    region: RegionDescriptor | None = None,
    allocated_tokens: int | None = None,
    row_bytes: int | None = None,
    dtype: str | None = None,
    row_shape: Sequence[int] | None = None,
    pool: int | None = None,
    pages: Sequence[tuple[int, int]] | None = None,
    aux_index: int | None = None,
    whole: bool = False,
) -> bytes:
    """``encode(Bootstrap(...))`` of these fields (either form: pool pages, or a
    region inline; the model's check of the form runs when a value is not one
    written here)."""
    runs = _runs(pages)
    if pool is not None or pages is not None:
        form = runs is not None and _count(pool) and region is None
        form = form and allocated_tokens is None and row_bytes is None
        form = form and dtype is None and row_shape is None
    else:
        form = region is not None and _inline_form(allocated_tokens, row_bytes, dtype, row_shape)
    about = _about(transports, host)
    if not (
        form
        and about is not None
        and _room(room)
        and _count(session)
        and _count(rank)
        and (token is None or _plain(token, MAX_TOKEN_CHARS))
        and type(ack_with_chunk) is bool
        and type(whole) is bool
        and (aux_index is None or _count(aux_index))
    ):
        return encode(
            Bootstrap(
                room=room,
                session=session,
                rank=rank,
                transports=list(transports),
                host=host,
                token=token,
                ack_with_chunk=ack_with_chunk,
                region=region,
                allocated_tokens=allocated_tokens,
                row_bytes=row_bytes,
                dtype=dtype,
                row_shape=None if row_shape is None else list(row_shape),
                pool=pool,
                pages=None if pages is None else list(pages),
                aux_index=aux_index,
                whole=whole,
            )
        )
    encoded_region = "null" if region is None else region.model_dump_json()
    shape = "null" if row_shape is None else f"[{','.join(map(str, row_shape))}]"
    return (
        f'{{"v":1,"room":{room},"session":{session},"rank":{rank},"type":"bootstrap",'
        f'"region":{encoded_region},"allocated_tokens":{_opt(allocated_tokens)},'
        f'"row_bytes":{_opt(row_bytes)},"dtype":{_string(dtype)},"row_shape":{shape},'
        f'"pool":{_opt(pool)},"pages":{runs or "null"},"aux_index":{_opt(aux_index)},'
        f'"whole":{_flag(whole)},{about},'
        f'"token":{_string(token)},"ack_with_chunk":{_flag(ack_with_chunk)}}}'
    ).encode()
