"""lmcache-rs: a KV-cache server for LLM inference with a Rust core.

The compiled core lives in :mod:`lmcache_rs._core`; this package re-exports what the rest of
the code base (and users) need from it.
"""

from lmcache_rs._core import (
    HASH_LEN,
    MAX_READERS,
    ChainMemo,
    InconsistentStateError,
    InvalidKeyError,
    KeyScope,
    L1Index,
    LmcacheCoreError,
    ManualClock,
    ObjectKey,
    OutOfMemoryError,
    ReadGrant,
    Whereabouts,
    WriteDone,
    checksum,
    chunk_hashes,
    chunk_hashes_msgpack,
    decode_key,
    extend_chain,
    kv_rank,
    mp_kv_rank,
    none_hash,
    validate_model,
    validate_salt,
)
from lmcache_rs._core import __version__ as __version__

__all__ = [
    "HASH_LEN",
    "MAX_READERS",
    "ChainMemo",
    "InconsistentStateError",
    "InvalidKeyError",
    "KeyScope",
    "L1Index",
    "LmcacheCoreError",
    "ManualClock",
    "ObjectKey",
    "OutOfMemoryError",
    "ReadGrant",
    "Whereabouts",
    "WriteDone",
    "checksum",
    "chunk_hashes",
    "chunk_hashes_msgpack",
    "decode_key",
    "extend_chain",
    "kv_rank",
    "mp_kv_rank",
    "none_hash",
    "validate_model",
    "validate_salt",
]
