"""Object keys: validation rules (spec C.1/C.2) and kv_rank packing."""

from __future__ import annotations

import pytest

import lmcache_rs as lm


def test_kv_rank_packing() -> None:
    assert lm.mp_kv_rank(2, 1) == 33620481 == 0x02010201
    assert lm.kv_rank(1, 0, 1, 0) == 0x01000100
    with pytest.raises(lm.InvalidKeyError, match="world_size=256"):
        lm.mp_kv_rank(256, 0)
    with pytest.raises(lm.InvalidKeyError):
        lm.mp_kv_rank(2, 2)


@pytest.mark.parametrize("salt", ["a@b", "a/b", "a\\b", "a\0b", "x" * 129])
def test_bad_salts(salt: str) -> None:
    with pytest.raises(lm.InvalidKeyError):
        lm.validate_salt(salt)
    with pytest.raises(lm.InvalidKeyError):
        lm.KeyScope("model", 0x01000100, 0, salt)


def test_good_keys_and_equality() -> None:
    lm.validate_salt("é" * 128)
    scope = lm.KeyScope("meta-llama/Llama-3.1-8B", lm.mp_kv_rank(1, 0), 0, "tenant")
    assert scope == lm.KeyScope("meta-llama/Llama-3.1-8B", 0x01000100, 0, "tenant")
    assert scope != lm.KeyScope("meta-llama/Llama-3.1-8B", 0x01000100, 0, "other")
    assert len({scope, lm.KeyScope("meta-llama/Llama-3.1-8B", 0x01000100, 0, "tenant")}) == 1
    key = lm.ObjectKey(bytes(32), "m", 0x01000100, 0, "")
    assert key.chunk_hash == bytes(32)
    assert key.scope.model_name == "m"
    assert "0x01000100" in repr(scope)


def test_bad_models_and_hashes() -> None:
    with pytest.raises(lm.InvalidKeyError, match="'@'"):
        lm.KeyScope("m@1", 0x01000100)
    with pytest.raises(lm.InvalidKeyError, match="chunk_hash"):
        lm.ObjectKey(b"", "m", 0x01000100)
    with pytest.raises(lm.InvalidKeyError, match="chunk_hash"):
        lm.ObjectKey(bytes(33), "m", 0x01000100)
