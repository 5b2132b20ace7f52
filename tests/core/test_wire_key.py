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
from lmcache_rs.protocol.ops import KeyDecoder, KeyHashing

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


HASHING = KeyHashing(ChainMemo(256), 16)


@settings(max_examples=300, deadline=None)
@given(key_maps(), st.integers(0, 3))
def test_hashed_keys_carry_the_chain_of_their_ids(m: dict[str, Any], repeat: int) -> None:
    """Decoded with a memo (as the server decodes data ops' keys), a key carries its ids'
    chunk hashes instead of the ids: the same fields, and the chain of exactly the ids sent,
    whether its chunks were found by their bytes (seen before) or parsed."""
    frame = msgspec.msgpack.encode(m)
    want = REFERENCE.decode(frame)
    for _ in range(1 + repeat):
        got = DECODER.decode(frame, HASHING)
        assert fields(got) == fields(want)
        assert got.token_u32 == b""
        chain = got.token_chain
        assert chain is not None
        assert (chain.count, chain.chunk_size) == (len(m["token_ids"]), 16)
        assert chain.hashes == chunk_hashes(m["token_ids"], 16)
    if repeat and len(m["token_ids"]) >= 16:
        assert chain.reused == len(m["token_ids"]) // 16


def test_hashed_keys_never_reuse_across_other_bytes() -> None:
    """Adversarial neighbours of a prompt seen before: one id changed (same and other widths),
    one inserted, the same ids in wider encodings, a longer and a shorter array. Each gets the
    chain of its own ids."""
    base = [(i * 7919) % 70_000 for i in range(40 * 16 + 5)]
    hashing = KeyHashing(ChainMemo(4096), 16)

    def decode(ids: list[int], raw: bytes | None = None) -> list[bytes]:
        m = {"model_name": "m", "world_size": 1, "worker_id": None, "token_ids": ids, "start": 0}
        frame = msgspec.msgpack.encode(m | {"end": len(ids), "request_id": "r"})
        if raw is not None:
            frame = frame.replace(msgspec.msgpack.encode(ids), raw)
        chain = DECODER.decode(frame, hashing).token_chain
        assert chain is not None
        return chain.hashes

    assert decode(base) == chunk_hashes(base, 16)
    variants = [[*base[:i], v, *base[i + 1 :]] for i, v in ((300, base[300] ^ 1), (301, 5), (17, 90_000))]
    variants += [[*base[:100], 3, *base[100:]], base + [1, 2, 3] * 20, base[:200]]
    for ids in variants:
        assert decode(ids) == chunk_hashes(ids, 16)
    # The same ids with one element as uint32 instead of its smallest encoding.
    wide = bytearray(msgspec.msgpack.encode(base))
    at = 3 + sum(1 if v < 128 else 2 if v < 256 else 3 if v < 65536 else 5 for v in base[:50])
    assert base[50] < 65536
    assert base[50] >= 256
    wide[at : at + 3] = b"\xce" + base[50].to_bytes(4, "big")
    assert decode(base, bytes(wide)) == chunk_hashes(base, 16)
    assert decode(base) == chunk_hashes(base, 16)


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
