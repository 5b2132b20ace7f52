"""The MP cache engine: the data operations (spec B.4, D.1, D.2, E.3).

The control operations (lookup, prefetch status, sessions, ping, clear...) run in Rust on the
request I/O thread (`_core.ControlPlane`, rust/control/); their state (sessions, worker
liveness, layouts, stats) lives there, and the handlers here reach it through `self.control`.
Handlers run on the transport's Python workers and never touch the socket. A handler returns
the reply payload (None: no payload frame) or raises `ProtocolError` with a code for the error
frame. All index calls go to the Rust core with the GIL released; byte copies are torch ops.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from lmcache_rs import (
    ChainMemo,
    ControlError,
    ControlPlane,
    InvalidKeyError,
    KeyScope,
    PrefetchJob,
    mp_kv_rank,
)
from lmcache_rs.config import ServerConfig
from lmcache_rs.engine.contexts import (
    MAX_PREPARED,
    AnyContext,
    ContextRegistry,
    EngineDrivenContext,
    KVContext,
    PreparedRetrieve,
    PreparedStore,
    PrepareKey,
    RegistrationError,
    build_context,
    build_engine_driven,
)
from lmcache_rs.engine.groups import chunk_blocks as group_blocks
from lmcache_rs.engine.groups import read_plan, store_plan
from lmcache_rs.protocol.codec import ProtocolError
from lmcache_rs.protocol.messages import (
    STUB_EVENT,
    BlockAllocationRecord,
    EngineDrivenRegistered,
    EngineDrivenRegistration,
    EngineGroupInfo,
    IPCCacheServerKey,
    PrepareRetrieveReply,
    PrepareStoreReply,
    RetrieveSlots,
    ShmSlot,
    StoreSlots,
)
from lmcache_rs.storage.l1 import L1Store
from lmcache_rs.storage.l2.tier import L2Tier
from lmcache_rs.transfer.gather import ObjectCopy, gather, scatter

if TYPE_CHECKING:
    from lmcache_rs._core import ClearReport

log = logging.getLogger(__name__)

Ctx = TypeVar("Ctx", KVContext, EngineDrivenContext)

#: The operations of each transfer mode (spec D), served only where --supported-transfer-mode
#: includes it.
LMCACHE_DRIVEN_OPS = ("register_kv_cache", "unregister_kv_cache", "store", "retrieve")
ENGINE_DRIVEN_OPS = (
    "register_kv_cache_engine_driven_context",
    "unregister_kv_cache_engine_driven_context",
    "prepare_store",
    "commit_store",
    "prepare_retrieve",
    "commit_retrieve",
)

#: The operations the Rust I/O thread answers itself (rust/control/server.rs).
NATIVE_OPS = (
    "noop",
    "ping",
    "lookup",
    "query_prefetch_status",
    "wait_prefetch_status",
    "end_session",
    "free_lookup_locks",
    "clear",
    "get_chunk_size",
    "get_experimental",
)

#: L2 prefetch jobs waiting for the L2 tier's pool at most (beyond: the lookup answers its L1
#: hit at once).
PREFETCH_QUEUE = 64


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


class Engine:
    def __init__(self, cfg: ServerConfig, l1: L1Store) -> None:
        self.cfg = cfg
        self.chunk_size = cfg.mp.chunk_size
        self.null_block_id = cfg.mp.null_block_id
        self.l1 = l1
        self.index = l1.index
        #: Chunk hashes shared by all requests: a prompt seen before is not hashed again.
        self.chain_memo = ChainMemo(cfg.mp.hash_memo_chunks)
        #: Sessions, worker liveness, layouts and stats, shared with the native control ops.
        self.control = ControlPlane(
            l1.index,
            self.chain_memo,
            self.chunk_size,
            l2_prefetch=bool(cfg.storage_manager.l2_adapters),
            prefetch_queue=PREFETCH_QUEUE,
        )
        self.contexts = ContextRegistry(self.control)
        self.stats = EngineStats(self.control)
        #: The L2 tier, set by the runtime when adapters are configured.
        self.l2: L2Tier | None = None
        self._pump: threading.Thread | None = None
        self._pump_stop = threading.Event()
        #: The data operations served by Python workers.
        self.handlers: dict[str, Callable[..., Any]] = {
            "register_kv_cache": self.register_kv_cache,
            "unregister_kv_cache": self.unregister_kv_cache,
            "store": self.store,
            "retrieve": self.retrieve,
            "report_block_allocation": self.report_block_allocation,
        }
        if not cfg.mp.lmcache_driven:
            for name in LMCACHE_DRIVEN_OPS:
                del self.handlers[name]
        if cfg.mp.engine_driven:
            self.handlers.update(
                {
                    "register_kv_cache_engine_driven_context": self.register_engine_driven,
                    "unregister_kv_cache_engine_driven_context": self.unregister_kv_cache,
                    "prepare_store": self.prepare_store,
                    "commit_store": self.commit_store,
                    "prepare_retrieve": self.prepare_retrieve,
                    "commit_retrieve": self.commit_retrieve,
                }
            )

    def refusal(self, op: str) -> str | None:
        """Why a known operation is not served here (None: it is). The handler table is the one
        record of what this server serves."""
        if op in self.handlers or op in NATIVE_OPS:
            return None
        if op in LMCACHE_DRIVEN_OPS or op in ENGINE_DRIVEN_OPS:
            return (
                f"operation {op!r} is not served with --supported-transfer-mode "
                f"{self.cfg.mp.supported_transfer_mode}"
            )
        return f"operation {op!r} is not supported by this server"

    # ---- helpers ---------------------------------------------------------------------------

    def _scope(self, key: IPCCacheServerKey, rank: int, object_group: int = 0) -> KeyScope:
        try:
            return KeyScope(key.model_name, mp_kv_rank(key.world_size, rank), object_group, key.cache_salt)
        except InvalidKeyError as e:
            raise ProtocolError("invalid_key", str(e)) from None

    def _first_chunk(self, key: IPCCacheServerKey) -> int:
        if key.start < 0 or key.end < key.start:
            raise ProtocolError("bad_request", f"bad token range [{key.start}, {key.end})")
        if key.start % self.chunk_size:
            raise ProtocolError(
                "bad_request", f"start {key.start} is not a multiple of the chunk size {self.chunk_size}"
            )
        return key.start // self.chunk_size

    def _prefix(self, key: IPCCacheServerKey, record_scopes: bool = False) -> list[bytes]:
        """Hashes of the request's complete chunks up to `key.end`, from its session's cached
        chain; `record_scopes` keeps the request's scopes for end_session's LRU touch."""
        try:
            return self.control.prefix_hashes(key, record_scopes)
        except ControlError as e:
            raise ProtocolError(*e.args) from None

    def _worker_context(self, key: IPCCacheServerKey, instance_id: int) -> KVContext:
        ctx = self._registered(key, instance_id)
        if not isinstance(ctx, KVContext):
            raise ProtocolError(
                "wrong_transfer_mode",
                f"instance {instance_id} registered engine-driven: it uses prepare/commit, "
                "not store/retrieve",
            )
        return ctx

    def _engine_context(self, key: IPCCacheServerKey, instance_id: int) -> EngineDrivenContext:
        ctx = self._registered(key, instance_id)
        if not isinstance(ctx, EngineDrivenContext):
            raise ProtocolError(
                "wrong_transfer_mode",
                f"instance {instance_id} registered its KV cache (lmcache-driven): it uses store/retrieve",
            )
        return ctx

    def _registered(self, key: IPCCacheServerKey, instance_id: int) -> AnyContext:
        ctx = self.contexts.get(instance_id)
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

    def _block_tensors(self, ctx: KVContext, block_ids: list[list[int]], chunks: int) -> list[torch.Tensor]:
        if len(block_ids) != len(ctx.groups):
            raise ProtocolError(
                "bad_request", f"{len(block_ids)} block lists for {len(ctx.groups)} KV group(s)"
            )
        out = []
        for g, ids in zip(ctx.groups, block_ids, strict=True):
            need = chunks * (self.chunk_size // g.block_size)
            if len(ids) < need:
                raise ProtocolError("bad_request", f"{len(ids)} block ids for {chunks} chunk(s): need {need}")
            t = torch.tensor(ids[:need], dtype=torch.int64)
            if need and (int(t.min()) < 0 or int(t.max()) >= ctx.num_blocks):
                raise ProtocolError("bad_request", f"block id out of range [0, {ctx.num_blocks})")
            out.append(t)
        return out

    # ---- registration and liveness -----------------------------------------------------------

    def register_kv_cache(
        self,
        instance_id: int,
        kv_cache: list[Any],
        model_name: str,
        world_size: int,
        engine_type: str,
        layout_hints: dict[str, Any],
        engine_group_infos: list[EngineGroupInfo],
    ) -> None:
        if self.contexts.touch(instance_id, pinged=False):
            return  # already registered: a re-registration only refreshes liveness (spec C.3)
        try:
            ctx = build_context(
                instance_id,
                kv_cache,
                model_name,
                world_size,
                engine_type,
                layout_hints,
                engine_group_infos,
                self.chunk_size,
            )
            KeyScope(model_name, mp_kv_rank(world_size, 0))  # the keys it will store are valid
            self._check_fits(ctx.chunk_bytes)
            self.contexts.add(ctx)
        except RegistrationError as e:
            raise ProtocolError("bad_registration", str(e)) from None
        except InvalidKeyError as e:
            raise ProtocolError("invalid_key", str(e)) from None
        log.info(
            "registered instance %d: %s world %d, %d layers, %d blocks, %d bytes per chunk",
            instance_id,
            model_name,
            world_size,
            len(ctx.layer_tensors),
            ctx.num_blocks,
            ctx.chunk_bytes,
        )

    def _check_fits(self, chunk_bytes: int) -> None:
        if chunk_bytes > self.index.capacity_bytes:
            raise RegistrationError(
                f"one chunk would take {chunk_bytes} bytes and L1 holds {self.index.capacity_bytes}: "
                "raise --l1-size-gb or lower --chunk-size"
            )

    def unregister_kv_cache(self, instance_id: int) -> None:
        self.drop_instance(instance_id, "unregistered")

    def drop_instance(self, instance_id: int, why: str) -> bool:
        ctx = self.contexts.remove(instance_id)
        if ctx is None:
            return False
        aborted = 0
        if isinstance(ctx, EngineDrivenContext):
            # The worker copies into its prepared slots itself: its leases end with it. An
            # lmcache-driven worker's stores are copied by our own threads, which end their
            # write leases themselves (finish or abort) when the copy is done.
            aborted = self.index.abort_writer(instance_id)
            for r in ctx.take_all():
                self.index.release(r.lease)
        log.info("instance %d %s (%d staged writes dropped)", instance_id, why, aborted)
        return True

    def reap_workers(self) -> tuple[str, dict[str, Any]]:
        mp = self.cfg.mp
        if mp.worker_reap_timeout_seconds <= 0:
            return "disabled", {}
        silent = self.contexts.silent(mp.worker_reap_timeout_seconds, mp.worker_registration_grace_seconds)
        reaped = [i for i in silent if self.drop_instance(i, "reaped after silence")]
        return f"Reaped {len(reaped)} workers", {"reaped_instances": reaped}

    def report_block_allocation(
        self, instance_id: int, model_name: str, records: list[BlockAllocationRecord]
    ) -> None:
        self.stats.add("block_allocation_records", model_name, n=len(records))

    # ---- store / retrieve (AFFINITY pool) ------------------------------------------------------

    def store(
        self, key: IPCCacheServerKey, instance_id: int, block_ids: list[list[int]], event: bytes
    ) -> list[Any]:
        ctx = self._worker_context(key, instance_id)
        self.stats.add("stores_submitted", ctx.device)
        hashes = self._write_range(key)
        n = len(hashes)
        if n == 0:
            self.stats.add("stores_finished", ctx.device)
            return [self._done_event(ctx, event), True]
        blocks = self._block_tensors(ctx, block_ids, n)
        rank = key.worker_id or 0
        # Per object group, the chunks whose blocks are live in it (engine/groups.py: null
        # blocks, e.g. of a sliding window, are never copied), and as which kind of object.
        batches = [b for og in ctx.objects for b in store_plan(og, blocks, n, self.null_block_id)]
        scopes = [self._scope(key, rank, b.object_group) for b in batches]
        want = sum(len(b.chunks) for b in batches)
        results = []
        copies: list[ObjectCopy] = []
        slots: list[tuple[int, int]] = []  # (offset, size) of each copy, sealed once written
        staged: list[list[bytes]] = []
        try:
            for b, scope in zip(batches, scopes, strict=True):
                res = self.index.reserve_write(scope, [hashes[i] for i in b.chunks], b.nbytes, instance_id)
                results.append(res)
                ok = [(i, r.offset) for i, r in zip(b.chunks, res, strict=True) if r.status == "reserved"]
                staged.append([hashes[i] for i, _ in ok])
                self.l1.journal_reserved([(r.offset, r.size) for r in res if r.status == "reserved"])
                for i, off in ok:
                    obj = self.l1.view(off, b.nbytes)
                    copies.append(
                        ObjectCopy(b.group.kernels, group_blocks(b.group, blocks, i, b.rows), obj, b.rows)
                    )
                    slots.append((off, b.nbytes))
            if ctx.mover is not None:  # GPU worker: gather on its GPU, one DMA per object
                done_event = ctx.mover.store(ctx.layer_tensors, copies, event)
            else:
                done_event = STUB_EVENT
                for c in copies:
                    gather(c, ctx.layer_tensors)
            digests = [self.l1.seal(off, size) for off, size in slots]
            k = 0
            for scope, hs in zip(scopes, staged, strict=True):  # slots are in batch order
                self.l1.journal_sealed(scope, hs, slots[k : k + len(hs)], digests[k : k + len(hs)])
                k += len(hs)
        except Exception:
            for scope, hs in zip(scopes, staged, strict=False):  # the batches reserved so far
                self.index.abort_write(scope, hs, instance_id)
            raise
        oom = sum(r.status == "oom" for res in results for r in res)
        admitted = lost = 0
        for b, scope, hs in zip(batches, scopes, staged, strict=True):
            done = self.index.finish_write(scope, hs, instance_id).statuses
            ok = [h for h, st in zip(hs, done, strict=True) if st == "admitted"]
            self.l1.journal_admitted(scope, ok, b.nbytes)
            if self.l2 is not None:
                self.l2.enqueue(scope, ok)
            lost += sum(s in ("not_staged", "dropped") for s in done)
            admitted += sum(s == "admitted" for s in done)
        self.stats.add("l1_write_chunks", key.cache_salt, n=admitted)
        self.stats.add("stores_finished", ctx.device)
        if oom or lost:
            self.stats.add("l1_allocation_failure_chunks", "l1_store", key.model_name, n=oom + lost)
            raise ProtocolError(
                "not_stored",
                f"{oom + lost} of {want} chunk object(s) not stored: {oom} found L1 full of locked "
                f"objects, {lost} were dropped by a clear while being copied",
                fallback=[done_event, False],
            )
        return [done_event, True]

    def _write_range(self, key: IPCCacheServerKey) -> list[bytes]:
        """The hashes of the chunks a store covers (`[start, end)`); records the request's
        scopes (every rank) for end_session's LRU touch."""
        c0 = self._first_chunk(key)
        return self._prefix(key, record_scopes=True)[c0:]

    def retrieve(
        self, key: IPCCacheServerKey, instance_id: int, block_ids: list[list[int]], event: bytes, skip: int
    ) -> list[Any]:
        ctx, hashes, c0 = self._start_read(key, instance_id, self._worker_context)
        n = len(hashes)
        rank = key.worker_id or 0
        try:
            self.stats.add("retrieves_submitted", ctx.device)
            if n == 0:
                return [self._done_event(ctx, event), True]
            blocks = self._block_tensors(ctx, block_ids, n)
            leases: list[int] = []
            try:
                copies: list[ObjectCopy] = []
                # Per object group only the chunks the prefix's window covers (engine/groups.py).
                for read in (r for og in ctx.objects for r in read_plan(og, c0, c0 + n)):
                    og, hs = read.group, [hashes[j - c0] for j in read.chunks]
                    scope, rows = self._scope(key, rank, og.id), og.whole_rows
                    if read.first_of_window and og.tail_id is not None and not self.index.peek(scope, hs):
                        scope, rows = self._scope(key, rank, og.tail_id), read.rows  # its tail object
                    lease, offsets = self._lock_for_read(
                        key, scope, hs, lambda: [self._done_event(ctx, event), False]
                    )
                    leases.append(lease)
                    for j, off in zip(read.chunks, offsets, strict=True):
                        i = j - c0
                        copies.append(
                            ObjectCopy(
                                og.kernels,
                                group_blocks(og, blocks, i, read.rows),
                                self.l1.view(off, og.nbytes(rows)),
                                rows,
                                min(max(skip - i * self.chunk_size, 0), self.chunk_size),
                            )
                        )
                if ctx.mover is not None:  # GPU worker: one DMA per object, scatter on its GPU
                    done_event = ctx.mover.retrieve(
                        ctx.layer_tensors, copies, self.chunk_size, self.null_block_id, event
                    )
                else:
                    done_event = STUB_EVENT
                    for c in copies:
                        scatter(c, ctx.layer_tensors, self.chunk_size, self.null_block_id)
            finally:
                # Every copy out of the leased ranges is done here: the CUDA mover synchronizes
                # on its stream before it returns (CudaMover._finish).
                for lease in leases:
                    self.index.release(lease)
            self.stats.add("l1_read_chunks", key.cache_salt, n=n)
            self.stats.add("num_chunks_loaded", str(key.worker_id), key.model_name, key.cache_salt, n=n)
            return [done_event, True]
        finally:
            self._release_share(key, c0, c0 + n)
            self.stats.add("retrieves_finished", ctx.device)

    def _start_read(
        self, key: IPCCacheServerKey, instance_id: int, context: Callable[[IPCCacheServerKey, int], Ctx]
    ) -> tuple[Ctx, list[bytes], int]:
        """The common start of retrieve and prepare_retrieve: the worker's context, the hashes
        of the key's range, and its first chunk. When the worker cannot be served, its share of
        the lookup's locks on the range is released before the error."""
        c0 = self._first_chunk(key)
        try:
            ctx = context(key, instance_id)
        except ProtocolError:
            self._release_share(key, c0, key.end // self.chunk_size)
            raise
        hashes = self._prefix(key)[c0:]
        want = (key.end - key.start) // self.chunk_size  # complete chunks of the range
        if len(hashes) < want:  # LMCache's client would report the missing chunks loaded (J.7)
            self._release_share(key, c0, c0 + len(hashes))
            raise ProtocolError(
                "not_found",
                f"[{key.start}, {key.end}) holds {want} complete chunk(s); the request's tokens "
                f"give {len(hashes)}",
            )
        return ctx, hashes, c0

    def _lock_for_read(
        self, key: IPCCacheServerKey, scope: KeyScope, hashes: list[bytes], fallback: Callable[[], Any]
    ) -> tuple[int, list[int]]:
        """Takes a read lease on every chunk for one copy out (the lookup's leases may expire;
        nothing frees a leased range, not even a forced clear) and returns the lease and the
        chunks' L1 offsets. If any chunk is missing or fails checksum verification, ends the
        lease and raises not_found / corrupt (`fallback()` gives the failure payload)."""
        n = len(hashes)
        grant = self.index.lease_read(scope, hashes, 1)
        hit = grant.hit
        bad = sum(not self.l1.intact(o, z) for o, z in zip(grant.offsets, grant.sizes, strict=True))
        if hit == n and not bad:
            return grant.lease, grant.offsets
        self.index.release(grant.lease)
        if bad:
            self.stats.add("l1_checksum_mismatch_chunks", key.model_name, n=bad)
            log.error("retrieve %s: %d chunk(s) failed L1 checksum verification", key.request_id, bad)
            raise ProtocolError(
                "corrupt",
                f"{bad} of {n} chunk(s) failed checksum verification; nothing was copied",
                fallback=fallback(),
            )
        self.stats.add("l1_read_failure_chunks", "retrieve", "not_found", key.model_name, n=n - hit)
        raise ProtocolError(
            "not_found", f"{n - hit} of {n} chunk(s) are no longer in L1", fallback=fallback()
        )

    @staticmethod
    def _done_event(ctx: KVContext, wait: bytes) -> bytes:
        """The event handle of a reply that copied nothing: the CPU stub, or for a GPU worker a
        real event recorded after its own (it waits on whatever we return)."""
        return ctx.mover.idle(wait) if ctx.mover is not None else STUB_EVENT

    def _release_share(self, key: IPCCacheServerKey, c0: int, c1: int) -> None:
        """One share of this rank's lookup leases on chunks [c0, c1): its retrieve is done."""
        if key.worker_id is not None and key.worker_id >= 0:
            self.control.release_share(key.request_id, key.worker_id, c0, c1)

    # ---- L2 prefetch (the L2 tier's pool) -----------------------------------------------------

    def start_prefetch_pump(self) -> None:
        """Starts the thread that hands the native lookups' L2 prefetch jobs to the L2 tier."""
        if self.l2 is not None and self._pump is None:
            self._pump = threading.Thread(target=self._pump_prefetches, name="l2-prefetch-pump", daemon=True)
            self._pump.start()

    def stop_prefetch_pump(self) -> None:
        self._pump_stop.set()
        if self._pump is not None:
            self._pump.join(5.0)

    def _pump_prefetches(self) -> None:
        l2 = self.l2
        assert l2 is not None
        while not self._pump_stop.is_set():
            job = self.control.next_prefetch(0.5)
            if job is None:
                continue
            if not l2.submit(functools.partial(self._prefetch, job)):
                self.stats.add("l2_prefetch_skipped", job.model_name, "busy")
                self.control.prefetch_done(job, 0, [])

    def _prefetch(self, job: PrefetchJob) -> None:
        """Loads what L1 missed from L2 and completes the lookup's result (installed by the
        control plane only if the session still waits for this lookup)."""
        assert self.l2 is not None
        loaded, leases = 0, list[int]()
        try:
            scopes = [
                KeyScope(job.model_name, mp_kv_rank(job.world_size, r), 0, job.cache_salt)
                for r in range(job.world_size)
            ]
            loaded, leases = self.l2.load(scopes, job.hashes, job.readers, job.model_name)
        except Exception:
            log.exception("L2 prefetch for %s failed", job.request_id)
        finally:
            self.control.prefetch_done(job, loaded, leases)

    def expire_sessions(self) -> tuple[str, dict[str, Any]]:
        old = self.control.expire_sessions(self.cfg.mp.session_ttl_seconds)
        stores, reads = self._expire_prepared()
        return f"Removed {old} expired sessions", {
            "removed_sessions": old,
            "expired_prepared_stores": stores,
            "expired_prepared_retrieves": reads,
        }

    def _expire_prepared(self) -> tuple[int, int]:
        """Forgets prepared engine-driven operations whose locks expired in the index (their
        worker never committed); staged writes still held by that worker are aborted."""
        st = self.cfg.storage_manager
        now = time.monotonic()
        n_stores = n_reads = 0
        for ctx in self.contexts.all():
            if isinstance(ctx, EngineDrivenContext):
                stores, reads = ctx.take_older(now - st.l1_write_ttl_seconds, now - st.l1_read_ttl_seconds)
                for p in stores:
                    self.index.abort_write(p.scope, p.hashes, ctx.instance_id)
                for r in reads:  # their leases expired in the core already: a no-op there
                    self.index.release(r.lease)
                n_stores += len(stores)
                n_reads += len(reads)
        return n_stores, n_reads

    def clear(self, force: bool) -> ClearReport:
        """Spec E.8 (L1 only), for the HTTP API (the `clear` operation runs natively).
        Forced, objects still held by transfers in flight leave the index now and their bytes
        return to the arena when those transfers end."""
        report = self.index.clear(force)
        self.l1.journal_cleared()
        log.info(
            "clear(force=%s): %d objects (%d bytes) dropped, %d of them (%d bytes) pending the end "
            "of transfers in flight",
            force,
            report["objects"],
            report["bytes"],
            report["pending_objects"],
            report["pending_bytes"],
        )
        self.stats.add("l1_clears", "forced" if force else "normal")
        return report

    def evict_cycle(self) -> tuple[str, dict[str, Any]]:
        r = self.index.evict_cycle()
        evicted = r["quota_evicted_objects"] + r["watermark_evicted_objects"]
        self.stats.add("eviction_loop_ticks")
        if r["triggered"]:
            self.stats.add("eviction_loop_triggered")
        return f"evicted {evicted} objects", dict(r)

    # ---- engine-driven transfer (spec D.3; AFFINITY pool) ------------------------------------

    def register_engine_driven(self, reg: EngineDrivenRegistration) -> EngineDrivenRegistered:
        if not self.l1.shm_name:
            why = self.l1.pool_error or "it runs with --shm-name ''"
            raise ProtocolError(
                "no_shm_pool",
                f"engine-driven workers copy KV through the shared-memory L1 pool, and this server has "
                f"none ({why}); pickled KV is refused",
                fallback=EngineDrivenRegistered(),
            )
        pool = EngineDrivenRegistered(shm_name=self.l1.shm_name, pool_size=self.index.capacity_bytes)
        old = self.contexts.get(reg.instance_id)
        if old is not None:  # a re-registration (heartbeat recovery) only refreshes liveness
            if not isinstance(old, EngineDrivenContext):
                raise ProtocolError(
                    "bad_registration", f"instance {reg.instance_id} is registered lmcache-driven"
                )
            return pool
        try:
            ctx = build_engine_driven(reg, self.chunk_size)
            KeyScope(reg.model_name, mp_kv_rank(reg.world_size, 0))  # the keys it will store are valid
            self._check_fits(ctx.chunk_bytes)
            self.contexts.add(ctx)
        except RegistrationError as e:
            raise ProtocolError("bad_registration", str(e), fallback=EngineDrivenRegistered()) from None
        except InvalidKeyError as e:
            raise ProtocolError("invalid_key", str(e), fallback=EngineDrivenRegistered()) from None
        log.info(
            "registered engine-driven instance %d: %s world %d, chunk %s %s (%d bytes)",
            reg.instance_id,
            reg.model_name,
            reg.world_size,
            ctx.chunk_shape,
            ctx.dtype_str,
            ctx.chunk_bytes,
        )
        return pool

    @staticmethod
    def _prepare_key(key: IPCCacheServerKey) -> PrepareKey:
        return (key.request_id, key.worker_id, key.start, key.end, key.cache_salt)

    def _slot(self, ctx: EngineDrivenContext, offset: int) -> ShmSlot:
        return ShmSlot(offset=offset, length=ctx.chunk_bytes, shape=ctx.chunk_shape, dtype=ctx.dtype_str)

    def _check_prepared(self, ctx: EngineDrivenContext) -> None:
        if ctx.prepared() >= MAX_PREPARED:
            raise ProtocolError(
                "overloaded",
                f"instance {ctx.instance_id} holds {MAX_PREPARED} prepared operations without a commit",
            )

    def prepare_store(self, key: IPCCacheServerKey, instance_id: int) -> PrepareStoreReply:
        """Slots for the chunks of the range to write; `slots: []` only when there is nothing
        to write. Every failure (raised) is answered `PrepareStoreFailed`, which an LMCache
        client follows with an empty commit_store, answered false (spec J.7)."""
        ctx = self._engine_context(key, instance_id)
        # An earlier prepare of this very range that was never committed was abandoned (LMCache's
        # worker commits each prepare before its next one): drop its slots. Left waiting, the
        # commit that follows this prepare, or the empty commit after this prepare fails, would
        # admit those never-written slots.
        for p in ctx.take_key(ctx.stores, self._prepare_key(key)):
            self.index.abort_write(p.scope, p.hashes, instance_id)
            self.stats.add("stores_finished", ctx.device)
        hashes = self._write_range(key)
        if not hashes:
            return PrepareStoreReply(context=StoreSlots(slots=[], chunk_indices=[]))
        self._check_prepared(ctx)
        self.stats.add("stores_submitted", ctx.device)
        scope = self._scope(key, key.worker_id or 0)
        res = self.index.reserve_write(scope, hashes, ctx.chunk_bytes, instance_id)
        todo = [i for i, r in enumerate(res) if r.status == "reserved"]
        self.l1.journal_reserved([(res[i].offset, res[i].size) for i in todo])  # before the worker has them
        oom = sum(r.status == "oom" for r in res)
        if oom:
            self.stats.add("l1_allocation_failure_chunks", "l1_store", key.model_name, n=oom)
        if not todo:
            self.stats.add("stores_finished", ctx.device)
            if oom:
                raise ProtocolError(
                    "not_stored", f"none of {len(hashes)} chunk(s) stored: L1 is full of locked objects"
                )
            return PrepareStoreReply(context=StoreSlots(slots=[], chunk_indices=[]))
        reply = PrepareStoreReply(
            context=StoreSlots(slots=[self._slot(ctx, res[i].offset) for i in todo], chunk_indices=todo)
        )
        offsets = [res[i].offset for i in todo]
        ctx.push(
            ctx.stores, self._prepare_key(key), PreparedStore(scope, [hashes[i] for i in todo], offsets, oom)
        )
        return reply

    def commit_store(self, key: IPCCacheServerKey, instance_id: int, data: bytes) -> bool:
        ctx = self._engine_context(key, instance_id)
        p: PreparedStore | None = ctx.pop(ctx.stores, self._prepare_key(key))
        if data:
            if p is not None:
                self.index.abort_write(p.scope, p.hashes, instance_id)
                self.stats.add("stores_finished", ctx.device)
            self.stats.add("pickle_refused_requests", "commit_store")
            raise ProtocolError(
                "pickle_refused",
                f"commit_store carried {len(data)} bytes of pickled KV; this server never unpickles "
                "client data (it would run the client's code): write into the shared-memory slots "
                "that prepare_store returns",
            )
        if p is None:
            raise ProtocolError(
                "not_prepared",
                "no prepare_store of this key is waiting for a commit (none was made, it was "
                "committed already, or its reservation expired)",
            )
        digests = [self.l1.seal(off, ctx.chunk_bytes) for off in p.offsets]
        self.l1.journal_sealed(p.scope, p.hashes, [(o, ctx.chunk_bytes) for o in p.offsets], digests)
        done = self.index.finish_write(p.scope, p.hashes, instance_id).statuses
        admitted = [h for h, st in zip(p.hashes, done, strict=True) if st == "admitted"]
        self.l1.journal_admitted(p.scope, admitted, ctx.chunk_bytes)
        if self.l2 is not None:
            self.l2.enqueue(p.scope, admitted)
        self.stats.add("l1_write_chunks", key.cache_salt, n=len(admitted))
        self.stats.add("stores_finished", ctx.device)
        expired = sum(st == "not_staged" for st in done)
        dropped = sum(st == "dropped" for st in done)
        if p.oom or expired or dropped:
            raise ProtocolError(
                "not_stored",
                f"{p.oom + expired + dropped} chunk(s) of this range not stored: {p.oom} found L1 full "
                f"of locked objects, {expired} reservation(s) expired before the commit, {dropped} "
                "dropped by a clear while being written",
            )
        return True

    def prepare_retrieve(self, key: IPCCacheServerKey, instance_id: int) -> PrepareRetrieveReply:
        ctx, hashes, c0 = self._start_read(key, instance_id, self._engine_context)
        scope = self._scope(key, key.worker_id or 0)
        try:
            self._check_prepared(ctx)
            self.stats.add("retrieves_submitted", ctx.device)
            try:
                lease, offsets = self._lock_for_read(
                    key, scope, hashes, lambda: PrepareRetrieveReply(success=False)
                )
            except ProtocolError:
                self.stats.add("retrieves_finished", ctx.device)
                raise
            # The lease lasts until commit_retrieve: the worker copies out of these slots.
            ctx.push(ctx.reads, self._prepare_key(key), PreparedRetrieve(scope, hashes, lease))
            return PrepareRetrieveReply(
                success=True, context=RetrieveSlots(slots=[self._slot(ctx, off) for off in offsets])
            )
        finally:
            self._release_share(key, c0, c0 + len(hashes))

    def commit_retrieve(self, key: IPCCacheServerKey, instance_id: int) -> bool:
        """Unlocks what prepare_retrieve locked. False (not an error) when nothing is waiting:
        LMCache clients commit after a failed prepare too."""
        ctx = self._engine_context(key, instance_id)
        p: PreparedRetrieve | None = ctx.pop(ctx.reads, self._prepare_key(key))
        if p is None:
            return False
        self.index.release(p.lease)
        self.stats.add("l1_read_chunks", key.cache_salt, n=len(p.hashes))
        self.stats.add(
            "num_chunks_loaded", str(key.worker_id), key.model_name, key.cache_salt, n=len(p.hashes)
        )
        self.stats.add("retrieves_finished", ctx.device)
        return True
