"""Type stubs for the compiled core (rust/python/mod.rs). Kept by hand, like the bindings."""

from collections.abc import Buffer, Sequence
from typing import Any, Final, Literal, TypedDict, final

import numpy as np

__version__: Final[str]
HASH_LEN: Final[int]
MAX_READERS: Final[int]

class LmcacheCoreError(ValueError): ...
class InvalidKeyError(LmcacheCoreError): ...
class OutOfMemoryError(LmcacheCoreError): ...
class InconsistentStateError(LmcacheCoreError): ...

# Anything holding token ids: a sequence of ints, a numpy integer array, a CPU torch tensor.
Tokens = Sequence[int] | np.ndarray[Any, Any] | Any

def none_hash() -> bytes: ...
def checksum(data: Buffer) -> bytes: ...
def chunk_hashes(
    tokens: Tokens,
    chunk_size: int = 256,
    start: int = 0,
    end: int | None = None,
    memo: ChainMemo | None = None,
) -> list[bytes]: ...
def extend_chain(tokens: Tokens, prev: bytes | None = None, chunk_size: int = 256) -> list[bytes]: ...
def chunk_hashes_msgpack(raw: bytes, chunk_size: int = 256) -> tuple[list[bytes], int]: ...
def decode_key(
    frame: bytes,
) -> tuple[str, int, int | None, tuple[int, int], bytes, int, int, str, str, bytes | None, int]: ...
def kv_rank(world_size: int, global_rank: int, local_world_size: int, local_rank: int) -> int: ...
def mp_kv_rank(world_size: int, worker_id: int) -> int: ...
def validate_salt(cache_salt: str) -> None: ...
def validate_model(model_name: str) -> None: ...

@final
class ChainMemo:
    """A bounded memo of chunk hashes (at most `capacity`; 0 disables it), for `chunk_hashes`."""

    def __init__(self, capacity: int) -> None: ...
    def stats(self) -> tuple[int, int, int, int, int]:
        """(entries, key_bytes, capacity, hits, misses); hits and misses count chunks."""
    def clear(self) -> None: ...

@final
class KeyScope:
    def __init__(
        self, model_name: str, kv_rank: int, object_group: int = 0, cache_salt: str = ""
    ) -> None: ...
    @property
    def model_name(self) -> str: ...
    @property
    def kv_rank(self) -> int: ...
    @property
    def object_group(self) -> int: ...
    @property
    def cache_salt(self) -> str: ...
    def __hash__(self) -> int: ...
    def __eq__(self, other: object) -> bool: ...

@final
class ObjectKey:
    def __init__(
        self,
        chunk_hash: bytes,
        model_name: str,
        kv_rank: int,
        object_group: int = 0,
        cache_salt: str = "",
    ) -> None: ...
    @property
    def chunk_hash(self) -> bytes: ...
    @property
    def scope(self) -> KeyScope: ...
    def __hash__(self) -> int: ...
    def __eq__(self, other: object) -> bool: ...

@final
class ManualClock:
    def __init__(self) -> None: ...
    def advance(self, seconds: float) -> None: ...

ReserveStatus = Literal["reserved", "resident", "in_flight", "oom"]
FinishStatus = Literal["admitted", "resident", "not_staged", "dropped"]

class ClearReport(TypedDict):
    objects: int
    bytes: int
    pending_objects: int
    pending_bytes: int

class CycleReport(TypedDict):
    expired_read_locks: int
    expired_staging: int
    quota_evicted_objects: int
    quota_evicted_bytes: int
    watermark_evicted_objects: int
    watermark_evicted_bytes: int
    triggered: bool
    used_bytes: int

class SaltStats(TypedDict):
    cache_salt: str
    objects: int
    bytes: int
    staging_bytes: int
    quota_bytes: int | None
    admitted_objects: int
    admitted_bytes: int
    evicted_objects: int
    evicted_bytes: int

class Counters(TypedDict):
    reserved_objects: int
    admitted_objects: int
    admitted_bytes: int
    duplicate_writes: int
    aborted_writes: int
    allocation_failures: int
    lookups: int
    lookup_keys: int
    lookup_hit_keys: int
    read_unlocks: int
    evicted_watermark_objects: int
    evicted_watermark_bytes: int
    evicted_quota_objects: int
    evicted_quota_bytes: int
    evicted_demand_objects: int
    evicted_demand_bytes: int
    deleted_objects: int
    cleared_objects: int
    temporary_dropped: int
    expired_read_locks: int
    expired_staging: int
    eviction_cycles: int
    eviction_triggered: int
    read_leases: int
    dropped_writes: int
    pending_released_objects: int

class L1Stats(TypedDict):
    capacity_bytes: int
    used_bytes: int
    free_bytes: int
    free_blocks: int
    largest_free_block: int
    usage_ratio: float
    total_objects: int
    resident_objects: int
    read_locked_objects: int
    staging_objects: int
    staging_bytes: int
    temporary_objects: int
    read_leases: int
    pending_release_objects: int
    pending_release_bytes: int
    counters: Counters
    salts: list[SaltStats]

@final
class ReadGrant:
    """What `L1Index.lease_read` took: `lease` (0: nothing), `hit` objects and their ranges."""

    @property
    def lease(self) -> int: ...
    @property
    def hit(self) -> int: ...
    @property
    def offsets(self) -> list[int]: ...
    @property
    def sizes(self) -> list[int]: ...

@final
class WriteDone:
    """What `L1Index.finish_write` did: a status per key, the read lease (0: none)."""

    @property
    def statuses(self) -> list[FinishStatus]: ...
    @property
    def lease(self) -> int: ...

@final
class Whereabouts:
    """Where one chunk is (`L1Index.explain`)."""

    @property
    def state(self) -> Literal["resident", "locked", "dropped", "unknown"]: ...
    @property
    def reason(
        self,
    ) -> (
        Literal[
            "evicted_watermark",
            "evicted_quota",
            "evicted_demand",
            "deleted",
            "cleared",
            "released_temporary",
            "write_expired",
        ]
        | None
    ): ...
    @property
    def ago_seconds(self) -> float | None: ...

@final
class L1Index:
    def __init__(
        self,
        capacity_bytes: int,
        *,
        align_bytes: int = 4096,
        policy: Literal["LRU", "IsolatedLRU", "noop"] | str = "LRU",
        trigger_watermark: float = 0.8,
        eviction_ratio: float = 0.2,
        write_ttl_secs: float = 600.0,
        read_ttl_secs: float = 300.0,
        demand_eviction: bool = True,
        drop_log_entries: int = 65536,
        clock: ManualClock | None = None,
    ) -> None: ...
    @property
    def capacity_bytes(self) -> int: ...
    @property
    def policy(self) -> str: ...
    def object_footprint(self, size: int) -> int: ...
    def reserve_write(
        self,
        scope: KeyScope,
        hashes: Sequence[bytes],
        size: int,
        writer: int,
        all_or_nothing: bool = False,
    ) -> list[tuple[ReserveStatus, int, int]]: ...
    def finish_write(
        self,
        scope: KeyScope,
        hashes: Sequence[bytes],
        writer: int,
        lock_readers: int = 0,
        temporary: bool = False,
        lease: int = 0,
    ) -> WriteDone: ...
    def abort_write(self, scope: KeyScope, hashes: Sequence[bytes], writer: int) -> int: ...
    def abort_writer(self, writer: int) -> int: ...
    def lease_read(
        self, scope: KeyScope, hashes: Sequence[bytes], shares: int = 1, lease: int = 0
    ) -> ReadGrant: ...
    def adopt(
        self, items: Sequence[tuple[KeyScope, bytes, int, int]]
    ) -> list[Literal["adopted", "duplicate", "overlap", "invalid"]]: ...
    def release(self, lease: int, start: int = 0, end: int | None = None, n: int | None = None) -> int: ...
    def peek(self, scope: KeyScope, hashes: Sequence[bytes]) -> int: ...
    def resolve(
        self, scope: KeyScope, hashes: Sequence[bytes]
    ) -> list[tuple[int, int, int, bool] | None]: ...
    def explain(self, scope: KeyScope, hashes: Sequence[bytes]) -> list[Whereabouts]: ...
    def list_objects(
        self,
        after: tuple[bytes, str, int, int, str] | None = None,
        limit: int = 500,
        model_name: str | None = None,
    ) -> list[tuple[bytes, str, int, int, str, int, bool]]: ...
    def touch(self, scope: KeyScope, hashes: Sequence[bytes]) -> int: ...
    def delete(self, scope: KeyScope, hashes: Sequence[bytes], force: bool = False) -> int: ...
    def clear(self, force: bool = False) -> ClearReport: ...
    def evict_cycle(self) -> CycleReport: ...
    def set_quota(self, cache_salt: str, limit_bytes: int) -> None: ...
    def remove_quota(self, cache_salt: str) -> bool: ...
    def get_quota(self, cache_salt: str) -> int | None: ...
    def list_quotas(self) -> list[tuple[str, int]]: ...
    def salt_usage(self, cache_salt: str) -> int: ...
    def stats(self) -> L1Stats: ...
    def check_invariants(self) -> None: ...
