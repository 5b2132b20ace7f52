"""Chunk hashing through the bindings: spec C.1 vectors, dtypes, zero-copy inputs, errors."""

from __future__ import annotations

import array
import struct

import blake3
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lmcache_rs as lm

NONE_HASH = "7e3eff9ef7613a50340eb12677ee03b83ac759fcba9bb32705f07248d56d473b"
CHUNK0 = "084547b6c40ed5b05ba8cd0305db5bf74d5617673948d9ed193ab7d6cbc484d4"
CHUNK1 = "e5ffee45c2b9db326814c9692dc594369887ba3b0df5761817820b60f864c8e0"
CHUNK16 = "32748aa00c5090e4f0e1f149078a07381f4f618d898c1cbac17e36521c3de48f"


def reference_hashes(tokens: list[int], chunk_size: int) -> list[bytes]:
    """Spec C.1 written independently with the `blake3` package."""
    prev = blake3.blake3(struct.pack(">q", 0) + struct.pack(">I", 0)).digest()
    out = []
    for i in range(len(tokens) // chunk_size):
        chunk = tokens[i * chunk_size : (i + 1) * chunk_size]
        prev = blake3.blake3(prev + struct.pack(f">{len(chunk)}I", *chunk)).digest()
        out.append(prev)
    return out


def test_spec_appendix_1_vectors() -> None:
    assert lm.none_hash().hex() == NONE_HASH
    hashes = lm.chunk_hashes(list(range(600)))
    assert [h.hex() for h in hashes] == [CHUNK0, CHUNK1]
    assert [h.hex() for h in lm.chunk_hashes(list(range(600)), start=256)] == [CHUNK1]
    assert [h.hex() for h in lm.chunk_hashes(list(range(16)), chunk_size=16)] == [CHUNK16]


@pytest.mark.parametrize(
    "make",
    [
        lambda n: list(range(n)),
        lambda n: np.arange(n, dtype=np.int64),
        lambda n: np.arange(n, dtype=np.int32),
        lambda n: np.arange(n, dtype=np.uint32),
        lambda n: np.arange(n, dtype=np.uint64),
        lambda n: torch.arange(n, dtype=torch.int64),
        lambda n: torch.arange(n, dtype=torch.int32),
        lambda n: array.array("q", range(n)),
        lambda n: np.arange(2 * n, dtype=np.int64)[::2] // 2,  # non-contiguous view
        lambda n: tuple(range(n)),
    ],
)
def test_every_token_container_hashes_the_same(make) -> None:
    assert [h.hex() for h in lm.chunk_hashes(make(600))] == [CHUNK0, CHUNK1]


def test_end_and_partial_chunks() -> None:
    tokens = list(range(600))
    assert len(lm.chunk_hashes(tokens, end=511)) == 1
    assert len(lm.chunk_hashes(tokens, end=10_000)) == 2
    assert lm.chunk_hashes(tokens[:255]) == []
    assert lm.chunk_hashes([]) == []


def test_extend_chain_matches_full_hash() -> None:
    tokens = [i * 31 % 50_000 for i in range(1024)]
    head = lm.extend_chain(tokens[:512])
    tail = lm.extend_chain(tokens[512:], prev=head[-1])
    assert head + tail == lm.chunk_hashes(tokens)
    with pytest.raises(lm.LmcacheCoreError, match="32 bytes"):
        lm.extend_chain(tokens, prev=b"short")


@pytest.mark.parametrize("bad", [[1, -1], [1, 2**32], np.array([0, -5], dtype=np.int64)])
def test_out_of_range_tokens_are_rejected(bad) -> None:
    with pytest.raises(lm.LmcacheCoreError, match="token id"):
        lm.chunk_hashes(bad, chunk_size=2)


def test_non_integer_input_is_a_clear_error() -> None:
    with pytest.raises(lm.LmcacheCoreError, match="sequence of ints"):
        lm.chunk_hashes("not tokens")  # type: ignore[arg-type]
    with pytest.raises(lm.LmcacheCoreError, match="chunk_size"):
        lm.chunk_hashes([1, 2, 3], chunk_size=0)


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=300),
    chunk_size=st.sampled_from([1, 3, 16, 64]),
)
def test_matches_an_independent_implementation(tokens: list[int], chunk_size: int) -> None:
    assert lm.chunk_hashes(tokens, chunk_size=chunk_size) == reference_hashes(tokens, chunk_size)


@settings(max_examples=40, deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=200), max_size=6),
    capacity=st.sampled_from([0, 1, 4, 1000]),
)
def test_chain_memo_answers_what_blake3_does(prompts: list[list[int]], capacity: int) -> None:
    """Through a memo of any size (evicting or not), prompts sharing prefixes or not, each
    twice, hash exactly as without it; the memo never holds more than its capacity."""
    memo = lm.ChainMemo(capacity)
    shared = prompts[0] if prompts else []
    for p in [*prompts, *(shared + p for p in prompts), *prompts]:
        assert lm.chunk_hashes(p, chunk_size=16, memo=memo) == reference_hashes(p, 16)
        assert lm.chunk_hashes(np.array(p, dtype=np.int64), 16, 32, 150, memo) == lm.chunk_hashes(
            p, 16, start=32, end=150
        )
        st = memo.stats()
        assert st.entries <= st.capacity
        assert st.capacity >= capacity
        assert st.key_bytes >= st.entries * (32 + 16 * 4)


def stats(memo: lm.ChainMemo) -> tuple[int, int, int, int, int]:
    s = memo.stats()
    return (s.entries, s.key_bytes, s.capacity, s.hits, s.misses)


def test_chain_memo_counts_and_clears() -> None:
    memo = lm.ChainMemo(64)
    t = list(range(1000))
    lm.chunk_hashes(t, 256, memo=memo)
    assert stats(memo) == (3, 3 * (32 + 1024), 64, 0, 3)
    lm.chunk_hashes(t, 256, memo=memo)
    lm.chunk_hashes(t[:600] + [7] * 400, 256, memo=memo)  # shares 2 chunks, then a new third
    assert stats(memo) == (4, 4 * (32 + 1024), 64, 5, 4)
    memo.clear()
    assert stats(memo)[:2] == (0, 0)
    with pytest.raises(lm.LmcacheCoreError):
        lm.chunk_hashes([1, -1, 2], 1, memo=memo)


@settings(max_examples=60, deadline=None)
@given(tokens=st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=600))
def test_msgpack_token_arrays_hash_like_lists(tokens: list[int]) -> None:
    """The server hashes `token_ids` straight from their wire encoding."""
    import msgspec  # noqa: PLC0415

    got = lm.chunk_hashes_msgpack(msgspec.msgpack.encode(tokens), chunk_size=16)
    assert isinstance(got, lm.ChunkHashes)
    assert got.n_tokens == len(tokens)
    assert got.hashes == lm.chunk_hashes(tokens, chunk_size=16)
    assert repr(got) == f"ChunkHashes(chunks={len(tokens) // 16}, n_tokens={len(tokens)})"


def test_msgpack_token_errors() -> None:
    import msgspec  # noqa: PLC0415

    with pytest.raises(lm.LmcacheCoreError, match="token id"):
        lm.chunk_hashes_msgpack(msgspec.msgpack.encode([1, -1]))
    with pytest.raises(lm.LmcacheCoreError, match="not a msgpack array"):
        lm.chunk_hashes_msgpack(msgspec.msgpack.encode("abc"))
    with pytest.raises(lm.LmcacheCoreError, match="not an integer"):
        lm.chunk_hashes_msgpack(msgspec.msgpack.encode([1, 2.5]))


@given(st.binary(max_size=5000))
@settings(max_examples=50, deadline=None)
def test_checksum_is_blake3_of_any_buffer(data: bytes) -> None:
    want = blake3.blake3(data).digest()
    assert lm.checksum(data) == want
    assert lm.checksum(memoryview(data)) == want
    assert lm.checksum(np.frombuffer(data, dtype=np.uint8).data) == want


def test_checksum_of_a_tensor_view_and_non_contiguous_buffer() -> None:
    t = torch.arange(1 << 16, dtype=torch.int32).view(torch.uint8)
    view = t[100:5000].numpy()
    assert lm.checksum(memoryview(view)) == blake3.blake3(view.tobytes()).digest()
    strided = np.arange(1000, dtype=np.uint8)[::3]
    assert lm.checksum(strided) == blake3.blake3(strided.tobytes()).digest()
