"""The engine-driven data path (spec D.3): prepare/commit of stores and retrieves.

The worker copies its KV itself, into and out of slots of the shared-memory L1 pool: a
prepare hands out slots (write reservations or read leases, kept per worker in its
`EngineDrivenContext` until the commit), a commit admits or unlocks them. Prepared operations
whose locks expired in the index are forgotten by `expire_prepared` (the maintenance loop).
"""

from __future__ import annotations

import time

from lmcache_rs.engine.contexts import (
    MAX_PREPARED,
    EngineDrivenContext,
    PreparedRetrieve,
    PreparedStore,
    PrepareKey,
)
from lmcache_rs.engine.shared import (
    Shared,
    engine_context,
    lock_for_read,
    release_share,
    scope,
    start_read,
    write_range,
)
from lmcache_rs.protocol.codec import ProtocolError
from lmcache_rs.protocol.messages import (
    IPCCacheServerKey,
    PrepareRetrieveReply,
    PrepareStoreReply,
    RetrieveSlots,
    ShmSlot,
    StoreSlots,
)


def _prepare_key(key: IPCCacheServerKey) -> PrepareKey:
    return (key.request_id, key.worker_id, key.start, key.end, key.cache_salt)


def _slot(ctx: EngineDrivenContext, offset: int) -> ShmSlot:
    return ShmSlot(offset=offset, length=ctx.chunk_bytes, shape=ctx.chunk_shape, dtype=ctx.dtype_str)


def _check_prepared(ctx: EngineDrivenContext) -> None:
    if ctx.prepared() >= MAX_PREPARED:
        raise ProtocolError(
            "overloaded",
            f"instance {ctx.instance_id} holds {MAX_PREPARED} prepared operations without a commit",
        )


class EngineDriven:
    def __init__(self, sh: Shared) -> None:
        self.sh = sh

    def prepare_store(self, key: IPCCacheServerKey, instance_id: int) -> PrepareStoreReply:
        """Slots for the chunks of the range to write; `slots: []` only when there is nothing
        to write. Every failure (raised) is answered `PrepareStoreFailed`, which an LMCache
        client follows with an empty commit_store, answered false (spec J.7)."""
        sh, index = self.sh, self.sh.index
        ctx = engine_context(sh, key, instance_id)
        # An earlier prepare of this very range that was never committed was abandoned (LMCache's
        # worker commits each prepare before its next one): drop its slots. Left waiting, the
        # commit that follows this prepare, or the empty commit after this prepare fails, would
        # admit those never-written slots.
        for p in ctx.take_key(ctx.stores, _prepare_key(key)):
            index.abort_write(p.scope, p.hashes, instance_id)
            sh.stats.add("stores_finished", ctx.device)
        hashes = write_range(sh, key)
        if not hashes:
            return PrepareStoreReply(context=StoreSlots(slots=[], chunk_indices=[]))
        _check_prepared(ctx)
        sh.stats.add("stores_submitted", ctx.device)
        sc = scope(key, key.worker_id or 0)
        res = index.reserve_write(sc, hashes, ctx.chunk_bytes, instance_id)
        todo = [i for i, r in enumerate(res) if r.status == "reserved"]
        sh.l1.journal_reserved([(res[i].offset, res[i].size) for i in todo])  # before the worker has them
        oom = sum(r.status == "oom" for r in res)
        if oom:
            sh.stats.add("l1_allocation_failure_chunks", "l1_store", key.model_name, n=oom)
        if not todo:
            sh.stats.add("stores_finished", ctx.device)
            if oom:
                raise ProtocolError(
                    "not_stored", f"none of {len(hashes)} chunk(s) stored: L1 is full of locked objects"
                )
            return PrepareStoreReply(context=StoreSlots(slots=[], chunk_indices=[]))
        reply = PrepareStoreReply(
            context=StoreSlots(slots=[_slot(ctx, res[i].offset) for i in todo], chunk_indices=todo)
        )
        offsets = [res[i].offset for i in todo]
        ctx.push(ctx.stores, _prepare_key(key), PreparedStore(sc, [hashes[i] for i in todo], offsets, oom))
        return reply

    def commit_store(self, key: IPCCacheServerKey, instance_id: int, data: bytes) -> bool:
        sh, l1, index = self.sh, self.sh.l1, self.sh.index
        ctx = engine_context(sh, key, instance_id)
        p: PreparedStore | None = ctx.pop(ctx.stores, _prepare_key(key))
        if data:
            if p is not None:
                index.abort_write(p.scope, p.hashes, instance_id)
                sh.stats.add("stores_finished", ctx.device)
            sh.stats.add("pickle_refused_requests", "commit_store")
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
        digests = [l1.seal(off, ctx.chunk_bytes) for off in p.offsets]
        l1.journal_sealed(p.scope, p.hashes, [(o, ctx.chunk_bytes) for o in p.offsets], digests)
        done = index.finish_write(p.scope, p.hashes, instance_id).statuses
        admitted = [h for h, st in zip(p.hashes, done, strict=True) if st == "admitted"]
        l1.journal_admitted(p.scope, admitted, ctx.chunk_bytes)
        if sh.l2 is not None:
            sh.l2.enqueue(p.scope, admitted)
        sh.stats.add("l1_write_chunks", key.cache_salt, n=len(admitted))
        sh.stats.add("stores_finished", ctx.device)
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
        sh = self.sh
        ctx, hashes, c0 = start_read(sh, key, instance_id, engine_context)
        sc = scope(key, key.worker_id or 0)
        try:
            _check_prepared(ctx)
            sh.stats.add("retrieves_submitted", ctx.device)
            try:
                lease, offsets = lock_for_read(
                    sh, key, sc, hashes, lambda: PrepareRetrieveReply(success=False)
                )
            except ProtocolError:
                sh.stats.add("retrieves_finished", ctx.device)
                raise
            # The lease lasts until commit_retrieve: the worker copies out of these slots.
            ctx.push(ctx.reads, _prepare_key(key), PreparedRetrieve(sc, hashes, lease))
            return PrepareRetrieveReply(
                success=True, context=RetrieveSlots(slots=[_slot(ctx, off) for off in offsets])
            )
        finally:
            release_share(sh, key, c0, c0 + len(hashes))

    def commit_retrieve(self, key: IPCCacheServerKey, instance_id: int) -> bool:
        """Unlocks what prepare_retrieve locked. False (not an error) when nothing is waiting:
        LMCache clients commit after a failed prepare too."""
        sh = self.sh
        ctx = engine_context(sh, key, instance_id)
        p: PreparedRetrieve | None = ctx.pop(ctx.reads, _prepare_key(key))
        if p is None:
            return False
        sh.index.release(p.lease)
        sh.stats.add("l1_read_chunks", key.cache_salt, n=len(p.hashes))
        sh.stats.add("num_chunks_loaded", str(key.worker_id), key.model_name, key.cache_salt, n=len(p.hashes))
        sh.stats.add("retrieves_finished", ctx.device)
        return True

    def expire_prepared(self) -> tuple[int, int]:
        """Forgets prepared engine-driven operations whose locks expired in the index (their
        worker never committed); staged writes still held by that worker are aborted."""
        st = self.sh.cfg.storage_manager
        now = time.monotonic()
        n_stores = n_reads = 0
        for ctx in self.sh.contexts.all():
            if isinstance(ctx, EngineDrivenContext):
                stores, reads = ctx.take_older(now - st.l1_write_ttl_seconds, now - st.l1_read_ttl_seconds)
                for p in stores:
                    self.sh.index.abort_write(p.scope, p.hashes, ctx.instance_id)
                for r in reads:  # their leases expired in the core already: a no-op there
                    self.sh.index.release(r.lease)
                n_stores += len(stores)
                n_reads += len(reads)
        return n_stores, n_reads
