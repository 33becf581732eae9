"""The per-room messages written without their models: the models' bytes, always."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kvpoll.protocol.messages import MAX_TOKEN_CHARS, Bootstrap, Chunk, decode, encode
from kvpoll.protocol.payloads import bootstrap_payload, chunk_payload
from kvpoll.transports.base import RegionDescriptor

COUNT = st.integers(0, 2**62 - 1)
POSITIVE = st.integers(1, 2**40 - 1)
ROOM = st.integers(-(2**63), 2**63 - 1)
ANY_TEXT = st.text(max_size=40)  # quotes, backslashes, control and non-ASCII characters too
PLAIN = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)

CHUNKS = st.fixed_dictionaries(
    {
        "room": ROOM,
        "session": COUNT,
        "rank": COUNT,
        "sent_tokens": COUNT,
        "chunk_tokens": COUNT,
        "is_last": st.booleans(),
        "total_tokens": st.none() | COUNT,
        "aux": st.none() | st.binary(max_size=64),
        "transport": st.none() | PLAIN.filter(lambda s: len(s) <= 64) | ANY_TEXT,
    }
)

DESCRIPTORS = st.builds(
    RegionDescriptor,
    transport=st.sampled_from(["zmq", "ucx", "nixl"]),
    endpoint=st.just("tcp://127.0.0.1:5555"),
    region_id=st.integers(0, 2**63 - 1),
    nbytes=st.integers(0, 2**40),
    extra=st.dictionaries(PLAIN, st.integers() | ANY_TEXT | st.booleans(), max_size=4),
)
COMMON = {
    "room": ROOM,
    "session": COUNT,
    "rank": COUNT,
    "transports": st.lists(PLAIN | ANY_TEXT, max_size=4),
    "host": PLAIN.filter(lambda s: len(s) <= 128),
    "token": st.none() | PLAIN.filter(bool) | ANY_TEXT.filter(bool),
    "ack_with_chunk": st.booleans(),
    "whole": st.booleans(),
    "aux_index": st.none() | COUNT,
}
POOL_FORM = st.fixed_dictionaries(
    {
        **COMMON,
        "pool": COUNT,
        "pages": st.lists(st.tuples(st.integers(0, 2**40 - 1), POSITIVE), min_size=1, max_size=8),
    }
)
INLINE_FORM = st.fixed_dictionaries(
    {
        **COMMON,
        "region": DESCRIPTORS,
        "allocated_tokens": POSITIVE,
        "row_bytes": POSITIVE,
        "dtype": st.sampled_from(["bfloat16", "float32", "uint8"]),
        "row_shape": st.lists(COUNT, max_size=8),
    }
)


def _model_bytes(model: type[Chunk] | type[Bootstrap], fields: dict[str, Any]) -> bytes:
    return encode(model(**fields))


@settings(max_examples=300, deadline=None)
@given(CHUNKS)
def test_a_chunk_is_written_as_its_model_writes_it(fields: dict[str, Any]) -> None:
    payload = chunk_payload(**fields)
    assert payload == _model_bytes(Chunk, fields)
    assert decode(payload) == Chunk(**fields)


@settings(max_examples=300, deadline=None)
@given(POOL_FORM | INLINE_FORM)
def test_a_bootstrap_is_written_as_its_model_writes_it(fields: dict[str, Any]) -> None:
    payload = bootstrap_payload(**fields)
    assert payload == _model_bytes(Bootstrap, fields)
    assert decode(payload) == Bootstrap(**fields)


GOOD_CHUNK: dict[str, Any] = {
    "room": 1,
    "session": 2,
    "rank": 0,
    "sent_tokens": 4,
    "chunk_tokens": 4,
    "is_last": True,
    "total_tokens": 4,
    "aux": None,
    "transport": "zmq/shm",
}
GOOD_BOOTSTRAP: dict[str, Any] = {
    "room": 1,
    "session": 2,
    "rank": 0,
    "transports": ["zmq/shm"],
    "host": "abc",
    "token": None,
    "ack_with_chunk": True,
    "pool": 3,
    "pages": [(0, 1)],
}


@pytest.mark.parametrize(
    "change",
    [
        {"session": -1},
        {"rank": 2**62},
        {"room": 2**63},
        {"transport": "x" * 65},
        {"aux": b"x" * ((1 << 20) + 1)},
    ],
)
def test_a_chunk_the_model_refuses_raises_as_the_model(change: dict[str, Any]) -> None:
    fields = {**GOOD_CHUNK, **change}
    with pytest.raises(ValidationError):
        Chunk(**fields)
    with pytest.raises(ValidationError):
        chunk_payload(**fields)


@pytest.mark.parametrize("change", [{"sent_tokens": "4"}, {"is_last": 1}, {"total_tokens": 4.0}])
def test_a_value_the_model_converts_gives_the_models_bytes(change: dict[str, Any]) -> None:
    fields = {**GOOD_CHUNK, **change}
    assert chunk_payload(**fields) == encode(Chunk(**fields)) == chunk_payload(**GOOD_CHUNK)


@pytest.mark.parametrize(
    "change",
    [
        {"pages": []},
        {"pages": [(0, 0)]},
        {"pool": -1},
        {"host": "h" * 129},
        {"token": "t" * (MAX_TOKEN_CHARS + 1)},
        {"transports": ["zmq"] * 17},
        {"allocated_tokens": 4},  # both forms at once
        {"pool": None, "pages": None},  # neither form
        {"aux_index": -1},
    ],
)
def test_a_bootstrap_the_model_refuses_raises_as_the_model(change: dict[str, Any]) -> None:
    fields = {**GOOD_BOOTSTRAP, **change}
    with pytest.raises(ValidationError):
        Bootstrap(**fields)
    with pytest.raises(ValidationError):
        bootstrap_payload(**fields)
