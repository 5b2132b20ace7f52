"""What the data services of the engine share (engine/engine.py composes them).

`Shared` is the small typed context every service gets instead of a back reference to the
engine: the config, L1 (store and index), the control plane (sessions, workers, the one stats
registry; rust/control/), the registered worker contexts and the L2 tier once the runtime set
it. The functions below are the request checks the services have in common: a key's scope and
first chunk, the worker context a key may use, and the done event of a reply that copied
nothing. They raise `ProtocolError` with the code of the error reply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from lmcache_rs import ChainMemo, ControlError, ControlPlane, InvalidKeyError, KeyScope, L1Index, mp_kv_rank
from lmcache_rs.config import ServerConfig
from lmcache_rs.engine.contexts import AnyContext, ContextRegistry, EngineDrivenContext, KVContext
from lmcache_rs.protocol.codec import ProtocolError
from lmcache_rs.protocol.messages import STUB_EVENT, IPCCacheServerKey
from lmcache_rs.storage.l1 import L1Store
from lmcache_rs.storage.l2.tier import L2Tier

log = logging.getLogger(__name__)

Ctx = TypeVar("Ctx", KVContext, EngineDrivenContext)

#: Picks and checks the worker context of a request (`worker_context` or `engine_context`).
ContextOf = Callable[["Shared", IPCCacheServerKey, int], Ctx]


class EngineStats:
    """The counters the metrics layer reads, labels in the key tuples: a view of the one stats
    registry (`ControlPlane.count`, atomics in rust/control/stats.rs) that the Rust control
    operations update too."""

    def __init__(self, control: ControlPlane) -> None:
        self._control = control

    def add(self, *key: str, n: int = 1) -> None:
        self._control.count(key, n)

    def snapshot(self) -> dict[tuple[str, ...], int]:
        return self._control.counters()

    def reset(self) -> None:
        self._control.reset_counters()


@dataclass
class Shared:
    """The state the data services share; built once by `Engine`."""

    cfg: ServerConfig
    l1: L1Store
    index: L1Index
    #: Chunk hashes shared by all requests: a prompt seen before is not hashed again.
    chain_memo: ChainMemo
    #: Sessions, worker liveness, layouts and stats, shared with the native control ops.
    control: ControlPlane
    contexts: ContextRegistry
    stats: EngineStats
    #: The L2 tier, set by the runtime when adapters are configured.
    l2: L2Tier | None = None

    @property
    def chunk_size(self) -> int:
        return self.cfg.mp.chunk_size

    @property
    def null_block_id(self) -> int:
        return self.cfg.mp.null_block_id


def scope(key: IPCCacheServerKey, rank: int, object_group: int = 0) -> KeyScope:
    try:
        return KeyScope(key.model_name, mp_kv_rank(key.world_size, rank), object_group, key.cache_salt)
    except InvalidKeyError as e:
        raise ProtocolError("invalid_key", str(e)) from None


def first_chunk(sh: Shared, key: IPCCacheServerKey) -> int:
    if key.start < 0 or key.end < key.start:
        raise ProtocolError("bad_request", f"bad token range [{key.start}, {key.end})")
    if key.start % sh.chunk_size:
        raise ProtocolError(
            "bad_request", f"start {key.start} is not a multiple of the chunk size {sh.chunk_size}"
        )
    return key.start // sh.chunk_size


def registered(sh: Shared, key: IPCCacheServerKey, instance_id: int) -> AnyContext:
    ctx = sh.contexts.get(instance_id)
    if ctx is None:
        raise ProtocolError(
            "unknown_instance", f"instance {instance_id} is not registered (register its KV cache first)"
        )
    if key.worker_id is None or not 0 <= key.worker_id < key.world_size:
        raise ProtocolError("bad_request", f"worker_id {key.worker_id} not in [0, {key.world_size})")
    if (key.model_name, key.world_size) != ctx.layout_key:
        raise ProtocolError(
            "bad_request",
            f"key is for {key.model_name!r} world {key.world_size}, instance {instance_id} registered "
            f"{ctx.model_name!r} world {ctx.world_size}",
        )
    return ctx


def worker_context(sh: Shared, key: IPCCacheServerKey, instance_id: int) -> KVContext:
    """The context of an lmcache-driven worker (store/retrieve)."""
    ctx = registered(sh, key, instance_id)
    if not isinstance(ctx, KVContext):
        raise ProtocolError(
            "wrong_transfer_mode",
            f"instance {instance_id} registered engine-driven: it uses prepare/commit, not store/retrieve",
        )
    return ctx


def engine_context(sh: Shared, key: IPCCacheServerKey, instance_id: int) -> EngineDrivenContext:
    """The context of an engine-driven worker (prepare/commit)."""
    ctx = registered(sh, key, instance_id)
    if not isinstance(ctx, EngineDrivenContext):
        raise ProtocolError(
            "wrong_transfer_mode",
            f"instance {instance_id} registered its KV cache (lmcache-driven): it uses store/retrieve",
        )
    return ctx


def done_event(ctx: KVContext, wait: bytes) -> bytes:
    """The event handle of a reply that copied nothing: the CPU stub, or for a GPU worker a
    real event recorded after its own (it waits on whatever we return)."""
    return ctx.mover.idle(wait) if ctx.mover is not None else STUB_EVENT


def prefix(sh: Shared, key: IPCCacheServerKey, record_scopes: bool = False) -> list[bytes]:
    """Hashes of the request's complete chunks up to `key.end`, from its session's cached
    chain; `record_scopes` keeps the request's scopes for end_session's LRU touch."""
    try:
        return sh.control.prefix_hashes(key, record_scopes)
    except ControlError as e:
        raise ProtocolError(*e.args) from None


def write_range(sh: Shared, key: IPCCacheServerKey) -> list[bytes]:
    """The hashes of the chunks a store covers (`[start, end)`); records the request's
    scopes (every rank) for end_session's LRU touch."""
    c0 = first_chunk(sh, key)
    return prefix(sh, key, record_scopes=True)[c0:]


def release_share(sh: Shared, key: IPCCacheServerKey, c0: int, c1: int) -> None:
    """One share of this rank's lookup leases on chunks [c0, c1): its retrieve is done."""
    if key.worker_id is not None and key.worker_id >= 0:
        sh.control.release_share(key.request_id, key.worker_id, c0, c1)


def start_read(
    sh: Shared, key: IPCCacheServerKey, instance_id: int, context: ContextOf[Ctx]
) -> tuple[Ctx, list[bytes], int]:
    """The common start of retrieve and prepare_retrieve: the worker's context, the hashes
    of the key's range, and its first chunk. When the worker cannot be served, its share of
    the lookup's locks on the range is released before the error."""
    c0 = first_chunk(sh, key)
    try:
        ctx = context(sh, key, instance_id)
    except ProtocolError:
        release_share(sh, key, c0, key.end // sh.chunk_size)
        raise
    hashes = prefix(sh, key)[c0:]
    want = (key.end - key.start) // sh.chunk_size  # complete chunks of the range
    if len(hashes) < want:  # LMCache's client would report the missing chunks loaded (J.7)
        release_share(sh, key, c0, c0 + len(hashes))
        raise ProtocolError(
            "not_found",
            f"[{key.start}, {key.end}) holds {want} complete chunk(s); the request's tokens "
            f"give {len(hashes)}",
        )
    return ctx, hashes, c0


def lock_for_read(
    sh: Shared, key: IPCCacheServerKey, scope: KeyScope, hashes: list[bytes], fallback: Callable[[], Any]
) -> tuple[int, list[int]]:
    """Takes a read lease on every chunk for one copy out (the lookup's leases may expire;
    nothing frees a leased range, not even a forced clear) and returns the lease and the
    chunks' L1 offsets. If any chunk is missing or fails checksum verification, ends the
    lease and raises not_found / corrupt (`fallback()` gives the failure payload)."""
    n = len(hashes)
    grant = sh.index.lease_read(scope, hashes, 1)
    hit = grant.hit
    bad = sum(not sh.l1.intact(o, z) for o, z in zip(grant.offsets, grant.sizes, strict=True))
    if hit == n and not bad:
        return grant.lease, grant.offsets
    sh.index.release(grant.lease)
    if bad:
        sh.stats.add("l1_checksum_mismatch_chunks", key.model_name, n=bad)
        log.error("retrieve %s: %d chunk(s) failed L1 checksum verification", key.request_id, bad)
        raise ProtocolError(
            "corrupt",
            f"{bad} of {n} chunk(s) failed checksum verification; nothing was copied",
            fallback=fallback(),
        )
    sh.stats.add("l1_read_failure_chunks", "retrieve", "not_found", key.model_name, n=n - hit)
    raise ProtocolError("not_found", f"{n - hit} of {n} chunk(s) are no longer in L1", fallback=fallback())
