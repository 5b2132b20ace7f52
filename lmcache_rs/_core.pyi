"""Type stubs for the compiled core (rust/python/mod.rs). Kept by hand, like the bindings."""

from collections.abc import Sequence
from typing import Any, Final, Literal, Self, TypedDict, final

import numpy as np
from typing_extensions import Buffer  # collections.abc.Buffer is 3.12+; we support 3.11

__version__: Final[str]
HASH_LEN: Final[int]
MAX_READERS: Final[int]
POLL_MS: Final[int]
PING_RETELL_SECONDS: Final[float]

class LmcacheCoreError(ValueError): ...
class InvalidKeyError(LmcacheCoreError): ...
class OutOfMemoryError(LmcacheCoreError): ...
class InconsistentStateError(LmcacheCoreError): ...

class ControlError(Exception):
    """A control operation refused its arguments: `args` is (code, message)."""

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
def chunk_hashes_msgpack(raw: bytes, chunk_size: int = 256) -> ChunkHashes: ...

@final
class ChunkHashes:
    """`chunk_hashes_msgpack`: the hashes of every complete chunk and the number of tokens."""

    @property
    def hashes(self) -> list[bytes]: ...
    @property
    def n_tokens(self) -> int: ...

@final
class DecodedKey:
    """A request key's fields (`decode_key`): `token_start:token_end` is where the token array
    lies in the frame, `token_ids` the ids as native-endian u32 bytes (empty when decoded with
    a memo: `token_chain` holds their chunk hashes instead), `request_configs` raw msgpack;
    integers are as sent."""

    @property
    def model_name(self) -> str: ...
    @property
    def world_size(self) -> int: ...
    @property
    def worker_id(self) -> int | None: ...
    @property
    def token_start(self) -> int: ...
    @property
    def token_end(self) -> int: ...
    @property
    def token_ids(self) -> bytes: ...
    @property
    def token_chain(self) -> TokenChain | None: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def request_id(self) -> str: ...
    @property
    def cache_salt(self) -> str: ...
    @property
    def request_configs(self) -> bytes | None: ...
    @property
    def num_kv_readers(self) -> int: ...

@final
class TokenChain:
    """A request's token ids as their chunk hashes (`decode_key` with a memo)."""

    @property
    def count(self) -> int: ...
    @property
    def chunk_size(self) -> int: ...
    @property
    def hashes(self) -> list[bytes]: ...
    @property
    def reused(self) -> int: ...

def decode_key(frame: bytes, memo: ChainMemo | None = None, chunk_size: int = 256) -> DecodedKey: ...
def kv_rank(world_size: int, global_rank: int, local_world_size: int, local_rank: int) -> int: ...
def mp_kv_rank(world_size: int, worker_id: int) -> int: ...
def validate_salt(cache_salt: str) -> None: ...
def validate_model(model_name: str) -> None: ...

@final
class ChainMemo:
    """A bounded memo of chunk hashes (at most `capacity` in each of its two tables, keyed by
    token ids and by their msgpack bytes; 0 disables it), for `chunk_hashes` and `decode_key`."""

    def __new__(cls, capacity: int) -> Self: ...
    def stats(self) -> MemoStats: ...
    def clear(self) -> None: ...

@final
class MemoStats:
    """`ChainMemo.stats()`; hits and misses count chunks."""

    @property
    def entries(self) -> int: ...
    @property
    def key_bytes(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def hits(self) -> int: ...
    @property
    def misses(self) -> int: ...

@final
class KeyScope:
    def __new__(cls, model_name: str, kv_rank: int, object_group: int = 0, cache_salt: str = "") -> Self: ...
    @property
    def model_name(self) -> str: ...
    @property
    def kv_rank(self) -> int: ...
    @property
    def object_group(self) -> int: ...
    @property
    def cache_salt(self) -> str: ...
    def __hash__(self) -> int: ...
    def __eq__(self, other: object, /) -> bool: ...

@final
class ObjectKey:
    def __new__(
        cls,
        chunk_hash: bytes,
        model_name: str,
        kv_rank: int,
        object_group: int = 0,
        cache_salt: str = "",
    ) -> Self: ...
    @property
    def chunk_hash(self) -> bytes: ...
    @property
    def scope(self) -> KeyScope: ...
    def __hash__(self) -> int: ...
    def __eq__(self, other: object, /) -> bool: ...

@final
class ManualClock:
    def __new__(cls) -> Self: ...
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

# The names of `L1Stats.counters`, for code that picks counters by name (the keys of `Counters`).
CounterName = Literal[
    "reserved_objects",
    "admitted_objects",
    "admitted_bytes",
    "duplicate_writes",
    "aborted_writes",
    "allocation_failures",
    "lookups",
    "lookup_keys",
    "lookup_hit_keys",
    "read_unlocks",
    "evicted_watermark_objects",
    "evicted_watermark_bytes",
    "evicted_quota_objects",
    "evicted_quota_bytes",
    "evicted_demand_objects",
    "evicted_demand_bytes",
    "deleted_objects",
    "cleared_objects",
    "temporary_dropped",
    "expired_read_locks",
    "expired_staging",
    "eviction_cycles",
    "eviction_triggered",
    "read_leases",
    "dropped_writes",
    "pending_released_objects",
]

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
class Reservation:
    """What `L1Index.reserve_write` did for one key: `offset` and `size` are the staged range
    when `status` is "reserved", 0 otherwise."""

    @property
    def status(self) -> ReserveStatus: ...
    @property
    def offset(self) -> int: ...
    @property
    def size(self) -> int: ...

@final
class Slot:
    """A resident object (`L1Index.resolve`)."""

    @property
    def offset(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def read_locks(self) -> int: ...
    @property
    def temporary(self) -> bool: ...

@final
class ListedObject:
    """One resident object of `L1Index.list_objects`."""

    @property
    def chunk_hash(self) -> bytes: ...
    @property
    def model_name(self) -> str: ...
    @property
    def kv_rank(self) -> int: ...
    @property
    def object_group(self) -> int: ...
    @property
    def cache_salt(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def locked(self) -> bool: ...

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
class Quota:
    """A registered quota (`L1Index.list_quotas`): its limit and the bytes the salt holds in L1
    (staging included, as `salt_usage`), read in one snapshot."""

    @property
    def cache_salt(self) -> str: ...
    @property
    def limit_bytes(self) -> int: ...
    @property
    def usage_bytes(self) -> int: ...

@final
class L1Index:
    def __new__(
        cls,
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
    ) -> Self: ...
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
    ) -> list[Reservation]: ...
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
    def resolve(self, scope: KeyScope, hashes: Sequence[bytes]) -> list[Slot | None]: ...
    def explain(self, scope: KeyScope, hashes: Sequence[bytes]) -> list[Whereabouts]: ...
    def list_objects(
        self,
        after: tuple[bytes, str, int, int, str] | None = None,
        limit: int = 500,
        model_name: str | None = None,
    ) -> list[ListedObject]: ...
    def touch(self, scope: KeyScope, hashes: Sequence[bytes]) -> int: ...
    def delete(self, scope: KeyScope, hashes: Sequence[bytes], force: bool = False) -> int: ...
    def clear(self, force: bool = False) -> ClearReport: ...
    def evict_cycle(self) -> CycleReport: ...
    def set_quota(self, cache_salt: str, limit_bytes: int) -> None: ...
    def remove_quota(self, cache_salt: str) -> bool: ...
    def get_quota(self, cache_salt: str) -> int | None: ...
    def list_quotas(self) -> list[Quota]: ...
    def salt_usage(self, cache_salt: str) -> int: ...
    def stats(self) -> L1Stats: ...
    def check_invariants(self) -> None: ...

# ---- the control plane (rust/python/control.rs) -------------------------------------------------

@final
class PrefetchJob:
    """A lookup's L2 prefetch, for the Python L2 tier."""

    @property
    def request_id(self) -> str: ...
    @property
    def generation(self) -> int: ...
    @property
    def model_name(self) -> str: ...
    @property
    def world_size(self) -> int: ...
    @property
    def cache_salt(self) -> str: ...
    @property
    def hashes(self) -> list[bytes]: ...
    @property
    def hit(self) -> int: ...
    @property
    def readers(self) -> int: ...

@final
class SessionView:
    """A request's session (`ControlPlane.session_view`): the chain of its last tokens and the
    scopes (every rank and object group) of the keys it touched."""

    @property
    def hashes(self) -> list[bytes]: ...
    @property
    def scopes(self) -> list[KeyScope]: ...

@final
class ControlPlane:
    """Sessions, worker liveness and layouts, and the one stats registry, shared by the
    native control operations and the Python data path."""

    def __new__(
        cls,
        index: L1Index,
        memo: ChainMemo,
        chunk_size: int,
        *,
        l2_prefetch: bool = False,
        prefetch_queue: int = 64,
        clock: ManualClock | None = None,
    ) -> Self: ...
    def release_share(self, request_id: str, rank: int, c0: int, c1: int) -> int: ...
    def next_prefetch(self, timeout: float) -> PrefetchJob | None: ...
    def prefetch_done(self, job: PrefetchJob, loaded: int, leases: Sequence[int]) -> bool: ...
    def expire_sessions(self, ttl: float) -> int: ...
    @property
    def session_count(self) -> int: ...
    def session_view(self, request_id: str) -> SessionView | None: ...
    def worker_add(self, instance: int) -> None: ...
    def worker_remove(self, instance: int) -> bool: ...
    def worker_touch(self, instance: int, pinged: bool) -> bool: ...
    def last_seen_ago(self, instance: int) -> float | None: ...
    def ping(self, instance: int | None) -> bool: ...
    def silent(self, reap_timeout: float, grace: float) -> list[int]: ...
    def set_layout(
        self, model: str, world_size: int, groups: Sequence[tuple[int, int | None, int]]
    ) -> None: ...
    def drop_layout(self, model: str, world_size: int) -> None: ...
    def count(self, labels: tuple[str, ...], n: int = 1) -> None: ...
    def counters(self) -> dict[tuple[str, ...], int]: ...
    def reset_counters(self) -> None: ...
    def read_start(
        self,
        key: Any,
        instance: int,
        device: str,
        groups: Sequence[tuple[int, int | None, int]],
        *,
        overloaded: str | None = None,
        lease: bool = True,
    ) -> ReadStart: ...
    def read_finish(
        self,
        start: ReadStart,
        end: Literal["done", "prepared", "failed"],
        *,
        corrupt: int = 0,
        missing: int = 0,
    ) -> None: ...
    def store_start(
        self,
        key: Any,
        instance: int,
        device: str,
        mode: Literal["lmcache", "engine"],
        plan: Sequence[tuple[int, Sequence[int], int]] | None,
        *,
        overloaded: str | None = None,
    ) -> StoreStart: ...
    def store_reserve(
        self, key: Any, start: StoreStart, plan: Sequence[tuple[int, Sequence[int], int]]
    ) -> None: ...
    def store_abort(self, start: StoreStart) -> None: ...
    def store_finish(self, start: StoreStart) -> StoreDone: ...

@final
class LeasedRead:
    """One leased read of a retrieve's plan (rust/control/data.rs)."""

    @property
    def group(self) -> int: ...
    @property
    def first(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def first_of_window(self) -> bool: ...
    @property
    def tail(self) -> bool: ...
    @property
    def lease(self) -> int: ...
    @property
    def hit(self) -> int: ...
    @property
    def offsets(self) -> list[int]: ...
    @property
    def sizes(self) -> list[int]: ...

@final
class ReadStart:
    """A retrieve between `ControlPlane.read_start` and `read_finish`."""

    @property
    def c0(self) -> int: ...
    @property
    def n(self) -> int: ...
    @property
    def reads(self) -> list[LeasedRead]: ...
    @property
    def lease(self) -> int: ...

@final
class StagedBatch:
    """One batch of a started store: its reserved chunks (relative to the range's first)."""

    @property
    def scope(self) -> KeyScope: ...
    @property
    def object_group(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def chunks(self) -> list[int]: ...
    @property
    def offsets(self) -> list[int]: ...
    @property
    def sizes(self) -> list[int]: ...

@final
class StoreStart:
    """A store between `ControlPlane.store_start` and `store_finish` / `store_abort`."""

    @property
    def n(self) -> int: ...
    @property
    def want(self) -> int: ...
    @property
    def oom(self) -> int: ...
    @property
    def reserved(self) -> int: ...
    @property
    def batches(self) -> list[StagedBatch]: ...
    def hashes(self, i: int) -> list[bytes]: ...

@final
class StoreDone:
    """What a store's end did."""

    @property
    def admitted(self) -> list[list[bytes]]: ...
    @property
    def admitted_count(self) -> int: ...
    @property
    def expired(self) -> int: ...
    @property
    def dropped(self) -> int: ...

@final
class Request:
    """A data request handed to a Python worker."""

    @property
    def op(self) -> str: ...
    @property
    def uid(self) -> bytes: ...
    @property
    def op_frame(self) -> bytes: ...
    @property
    def identity(self) -> bytes: ...
    @property
    def args(self) -> list[bytes]: ...

@final
class IoStatus:
    @property
    def alive(self) -> bool: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def last_tick_ago(self) -> float | None: ...
    @property
    def requests_received(self) -> int: ...
    @property
    def replies_sent(self) -> int: ...
    @property
    def pending_requests(self) -> int: ...
    @property
    def error(self) -> str | None: ...

@final
class RequestTiming:
    @property
    def op(self) -> str: ...
    @property
    def count(self) -> int: ...
    @property
    def handler_seconds(self) -> float: ...
    @property
    def queue_seconds(self) -> float: ...
    @property
    def buckets(self) -> list[int]: ...

@final
class LogLine:
    """A log line of the I/O thread (`NativeServer.next_log`); `level` is a `logging` level
    number (10 DEBUG, 20 INFO, 30 WARNING, 40 ERROR, 50 CRITICAL)."""

    @property
    def level(self) -> int: ...
    @property
    def message(self) -> str: ...

OpTableRow = tuple[str, int | None, int, str, bytes, bool, str | None]

@final
class NativeServer:
    """The ZMQ ROUTER socket and its Rust I/O thread (rust/control/server.rs)."""

    def __new__(
        cls,
        control: ControlPlane,
        url: str,
        *,
        ops: Sequence[OpTableRow],
        ipv6: bool = False,
        max_message_bytes: int = -1,
        max_pending: int = 4096,
        affinity_lanes: int = 1,
        clock: ManualClock | None = None,
    ) -> Self: ...
    @property
    def url(self) -> str: ...
    @property
    def lanes(self) -> int: ...
    @property
    def normal_lane(self) -> int: ...
    def start(self) -> None: ...
    def stop(self, timeout: float) -> None: ...
    @property
    def stopped(self) -> bool: ...
    def next(self, lane: int, timeout: float) -> Request | None: ...
    def reply(self, req: Request, frames: Sequence[bytes], error: tuple[str, str] | None = None) -> bool: ...
    def next_log(self, timeout: float) -> LogLine | None: ...
    def io_status(self) -> IoStatus: ...
    def timings(self) -> list[RequestTiming]: ...
    def inject_fault(self, kind: Literal["stall", "panic"], message: str = "") -> None: ...
    @property
    def stalled(self) -> bool: ...
    def release_fault(self) -> None: ...
