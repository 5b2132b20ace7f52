"""The one-pass key decoder (Rust, `_core.decode_key` via `protocol.ops.KeyDecoder`) agrees
with msgspec's decoding of the `IPCCacheServerKey` Struct on every key, and refuses what it
refuses."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_rs import ChainMemo, chunk_hashes, chunk_hashes_msgpack
from lmcache_rs.protocol.messages import IPCCacheServerKey, encode_tokens
from lmcache_rs.protocol.ops import KeyDecoder

REFERENCE = msgspec.msgpack.Decoder(IPCCacheServerKey)
DECODER = KeyDecoder()
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
texts = st.text(max_size=20)
configs = st.none() | st.dictionaries(
    texts, st.none() | st.booleans() | ints | texts | st.floats(allow_nan=False)
)


@st.composite
def key_maps(draw: st.DrawFn) -> dict[str, Any]:
    m: dict[str, Any] = {
        "model_name": draw(texts),
        "world_size": draw(ints),
        "worker_id": draw(st.none() | ints),
        "token_ids": draw(st.lists(st.integers(0, 2**32 - 1), max_size=600)),
        "start": draw(ints),
        "end": draw(ints),
        "request_id": draw(texts),
    }
    if draw(st.booleans()):
        m["cache_salt"] = draw(texts)
    if draw(st.booleans()):
        m["request_configs"] = draw(configs)
    if draw(st.booleans()):
        m["num_kv_readers"] = draw(ints)
    if draw(st.booleans()):
        m["some_future_field"] = draw(st.none() | ints | texts | st.lists(ints, max_size=3))
    order = draw(st.permutations(list(m)))
    return {k: m[k] for k in order}


def fields(k: IPCCacheServerKey) -> dict[str, Any]:
    return {f: getattr(k, f) for f in IPCCacheServerKey.__struct_fields__ if f != "token_ids"} | {
        "token_ids": bytes(k.token_ids)
    }


MEMO = ChainMemo(64)


@settings(max_examples=300, deadline=None)
@given(key_maps())
def test_same_fields_as_msgspec(m: dict[str, Any]) -> None:
    frame = msgspec.msgpack.encode(m)
    want, got = REFERENCE.decode(frame), DECODER.decode(frame)
    assert fields(got) == fields(want)
    ids = np.frombuffer(got.token_u32, dtype=np.uint32).tolist()
    assert ids == m["token_ids"]
    # The parsed ids hash (through a memo, as sessions do) to the same chain as the wire bytes.
    parsed = np.frombuffer(got.token_u32, dtype=np.uint32)
    got_hashes = chunk_hashes_msgpack(bytes(want.token_ids), 16)
    assert (chunk_hashes(parsed, 16, memo=MEMO), len(parsed)) == (got_hashes.hashes, got_hashes.n_tokens)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.integers(0, 127) | st.integers(128, 2**16 - 1) | st.integers(2**16, 2**32 - 1),
        min_size=1024,
        max_size=4096,
    ),
    st.binary(max_size=16),
)
def test_large_token_arrays_decode_like_msgspec(ids: list[int], trailer: bytes) -> None:
    """Arrays of 1024+ ids take the interleaved parser: same ids, and whatever follows the
    array is still read as the next field."""
    m = {"model_name": "m", "world_size": 1, "worker_id": None, "token_ids": ids, "start": 0, "end": len(ids)}
    m["request_id"] = trailer.hex()
    got = DECODER.decode(msgspec.msgpack.encode(m))
    assert np.frombuffer(got.token_u32, dtype=np.uint32).tolist() == ids
    assert (got.end, got.request_id) == (len(ids), trailer.hex())


@pytest.mark.parametrize(
    "change",
    [
        {"world_size": "2"},
        {"worker_id": 1.5},
        {"start": None},
        {"model_name": 3},
        {"request_configs": [1]},
        {"token_ids": [1, -2]},
        {"token_ids": [1, 2**32]},
        {"token_ids": "abc"},
    ],
)
def test_refuses_bad_fields(change: dict[str, Any]) -> None:
    m = {
        "model_name": "m",
        "world_size": 1,
        "worker_id": 0,
        "token_ids": [1, 2, 3],
        "start": 0,
        "end": 3,
        "request_id": "r",
    } | change
    with pytest.raises(ValueError):  # noqa: PT011 - the messages are the decoders' own
        DECODER.decode(msgspec.msgpack.encode(m))


def test_refuses_missing_fields_truncation_and_non_maps() -> None:
    good = msgspec.msgpack.encode(
        IPCCacheServerKey(
            model_name="m",
            world_size=1,
            worker_id=None,
            token_ids=encode_tokens(list(range(1000))),
            start=0,
            end=1000,
            request_id="r",
        )
    )
    assert DECODER.decode(good).end == 1000
    for bad in (good[:-1], good + b"\xc0", b"\x90", b"", msgspec.msgpack.encode({"model_name": "m"})):
        with pytest.raises(ValueError, match=r"key|token"):
            DECODER.decode(bad)
