"""What the data services of the engine share (engine/engine.py composes them).

`Shared` is the small typed context every service gets instead of a back reference to the
engine: the config, L1 (store and index), the control plane (sessions, workers, the one stats
registry; rust/control/), the registered worker contexts and the L2 tier once the runtime set
it. The functions below are what the services have in common: a key's first chunk, the worker
context a key may use, the done event of a reply that copied nothing, and the two calls into
the core that start a data operation (`read_start`, `store_start`: rust/control/data.rs). A
store or retrieve crosses into Rust where it starts and where it ends (`read_finish`,
`store_finish`), with only torch copies in between. They raise `ProtocolError` with the code
of the error reply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from lmcache_rs import ChainMemo, ControlError, ControlPlane, InvalidKeyError, KeyScope, L1Index, mp_kv_rank
from lmcache_rs.config import ServerConfig
from lmcache_rs.engine.contexts import AnyContext, ContextRegistry, EngineDrivenContext, KVContext
from lmcache_rs.protocol.codec import ProtocolError
from lmcache_rs.protocol.messages import STUB_EVENT, IPCCacheServerKey
from lmcache_rs.storage.l1 import L1Store
from lmcache_rs.storage.l2.tier import L2Tier
from lmcache_rs.transfer.copier import CpuCopier

if TYPE_CHECKING:
    from lmcache_rs._core import ReadStart, StoreStart

log = logging.getLogger(__name__)

Ctx = TypeVar("Ctx", KVContext, EngineDrivenContext)

#: Picks and checks the worker context of a request (`worker_context` or `engine_context`;
#: called with `touch=False`).
ContextOf = Callable[..., Ctx]


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
    #: CPU workers' object copies, spread over a few threads.
    copier: CpuCopier
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


def registered(sh: Shared, key: IPCCacheServerKey, instance_id: int, *, touch: bool = True) -> AnyContext:
    """The worker's context. A request of the worker counts as hearing from it: at once with
    `touch`, else through the data operation's start call (`ControlPlane.read_start`,
    `store_start`), or here when the request fails before it."""
    ctx = sh.contexts.get(instance_id) if touch else sh.contexts.find(instance_id)
    if ctx is None:
        raise ProtocolError(
            "unknown_instance", f"instance {instance_id} is not registered (register its KV cache first)"
        )
    try:
        if key.worker_id is None or not 0 <= key.worker_id < key.world_size:
            raise ProtocolError("bad_request", f"worker_id {key.worker_id} not in [0, {key.world_size})")
        if (key.model_name, key.world_size) != ctx.layout_key:
            raise ProtocolError(
                "bad_request",
                f"key is for {key.model_name!r} world {key.world_size}, instance {instance_id} "
                f"registered {ctx.model_name!r} world {ctx.world_size}",
            )
    except ProtocolError:
        if not touch:
            sh.contexts.touch(instance_id, pinged=False)
        raise
    return ctx


def _typed_context(
    sh: Shared, key: IPCCacheServerKey, instance_id: int, kind: type[Ctx], uses: str, touch: bool
) -> Ctx:
    ctx = registered(sh, key, instance_id, touch=touch)
    if not isinstance(ctx, kind):
        if not touch:
            sh.contexts.touch(instance_id, pinged=False)
        raise ProtocolError("wrong_transfer_mode", f"instance {instance_id} registered {uses}")
    return ctx


def worker_context(sh: Shared, key: IPCCacheServerKey, instance_id: int, *, touch: bool = True) -> KVContext:
    """The context of an lmcache-driven worker (store/retrieve)."""
    uses = "engine-driven: it uses prepare/commit, not store/retrieve"
    return _typed_context(sh, key, instance_id, KVContext, uses, touch)


def engine_context(
    sh: Shared, key: IPCCacheServerKey, instance_id: int, *, touch: bool = True
) -> EngineDrivenContext:
    """The context of an engine-driven worker (prepare/commit)."""
    uses = "its KV cache (lmcache-driven): it uses store/retrieve"
    return _typed_context(sh, key, instance_id, EngineDrivenContext, uses, touch)


def done_event(ctx: KVContext, wait: bytes) -> bytes:
    """The event handle of a reply that copied nothing: the CPU stub, or for a GPU worker a
    real event recorded after its own (it waits on whatever we return)."""
    return ctx.mover.idle(wait) if ctx.mover is not None else STUB_EVENT


def range_chunks(sh: Shared, key: IPCCacheServerKey) -> int:
    """Complete chunks of the key's range (0 for a range `first_chunk` refuses)."""
    if key.start < 0 or key.end < key.start or key.start % sh.chunk_size:
        return 0
    return (key.end - key.start) // sh.chunk_size


def release_share(sh: Shared, key: IPCCacheServerKey, c0: int, c1: int) -> None:
    """One share of this rank's lookup leases on chunks [c0, c1): its retrieve is done."""
    if key.worker_id is not None and key.worker_id >= 0:
        sh.control.release_share(key.request_id, key.worker_id, c0, c1)


def read_context(
    sh: Shared, key: IPCCacheServerKey, instance_id: int, context: ContextOf[Ctx]
) -> tuple[Ctx, int]:
    """The common start of retrieve and prepare_retrieve before the core's: the worker's
    context and the range's first chunk. When the worker cannot be served, its share of the
    lookup's locks on the range is released before the error."""
    c0 = first_chunk(sh, key)
    try:
        ctx = context(sh, key, instance_id, touch=False)
    except ProtocolError:
        release_share(sh, key, c0, key.end // sh.chunk_size)
        raise
    return ctx, c0


#: The read plan of an engine-driven worker: one full-attention object group.
PLAIN_GROUPS: Final[list[tuple[int, int | None, int]]] = [(0, None, 0)]


def read_start(
    sh: Shared,
    key: IPCCacheServerKey,
    instance_id: int,
    ctx: AnyContext,
    groups: list[tuple[int, int | None, int]],
    *,
    overloaded: str | None = None,
    lease: bool = True,
) -> ReadStart:
    """`ControlPlane.read_start`: the one call into the core where a retrieve starts (the
    range's hashes, not_found when its tokens fall short, the plan's read leases)."""
    try:
        return sh.control.read_start(key, instance_id, ctx.device, groups, overloaded=overloaded, lease=lease)
    except ControlError as e:
        raise ProtocolError(*e.args) from None


def read_failure(
    sh: Shared, key: IPCCacheServerKey, start: ReadStart, fallback: Callable[[], Any]
) -> tuple[ProtocolError, int, int] | None:
    """Why a started retrieve cannot copy, if it cannot: a read whose chunks fail checksum
    verification (with --verify-checksums) or the read that fell short, in plan order; with
    the chunks that failed verification and that are missing, for `read_finish`."""
    verify = sh.l1.digests is not None
    for r in start.reads:
        bad = sum(not sh.l1.intact(o, z) for o, z in zip(r.offsets, r.sizes, strict=True)) if verify else 0
        if bad:
            log.error("retrieve %s: %d chunk(s) failed L1 checksum verification", key.request_id, bad)
            err = ProtocolError(
                "corrupt",
                f"{bad} of {r.count} chunk(s) failed checksum verification; nothing was copied",
                fallback=fallback(),
            )
            return err, bad, 0
        if r.hit < r.count:
            missing = r.count - r.hit
            err = ProtocolError(
                "not_found", f"{missing} of {r.count} chunk(s) are no longer in L1", fallback=fallback()
            )
            return err, 0, missing
    return None


def store_start(
    sh: Shared,
    key: IPCCacheServerKey,
    instance_id: int,
    ctx: AnyContext,
    mode: Literal["lmcache", "engine"],
    plan: list[tuple[int, list[int], int]] | None,
    *,
    overloaded: str | None = None,
) -> StoreStart:
    """`ControlPlane.store_start`: the one call into the core where a store starts (the
    range's hashes, the reservations of `plan`)."""
    try:
        return sh.control.store_start(key, instance_id, ctx.device, mode, plan, overloaded=overloaded)
    except ControlError as e:
        raise ProtocolError(*e.args) from None
