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
    PLAIN_GROUPS,
    Shared,
    engine_context,
    first_chunk,
    range_chunks,
    read_context,
    read_failure,
    read_start,
    store_start,
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


def _overloaded(ctx: EngineDrivenContext) -> str | None:
    """Why a prepare is refused `overloaded` once its range is known to be non-empty."""
    if ctx.prepared() >= MAX_PREPARED:
        return f"instance {ctx.instance_id} holds {MAX_PREPARED} prepared operations without a commit"
    return None


class EngineDriven:
    def __init__(self, sh: Shared) -> None:
        self.sh = sh

    def prepare_store(self, key: IPCCacheServerKey, instance_id: int) -> PrepareStoreReply:
        """Slots for the chunks of the range to write; `slots: []` only when there is nothing
        to write. Every failure (raised) is answered `PrepareStoreFailed`, which an LMCache
        client follows with an empty commit_store, answered false (spec J.7). Into Rust once
        (`store_start`); the commit ends it."""
        sh, control = self.sh, self.sh.control
        ctx = engine_context(sh, key, instance_id, touch=False)
        # An earlier prepare of this very range that was never committed was abandoned (LMCache's
        # worker commits each prepare before its next one): drop its slots. Left waiting, the
        # commit that follows this prepare, or the empty commit after this prepare fails, would
        # admit those never-written slots.
        for p in ctx.take_key(ctx.stores, _prepare_key(key)):
            control.store_abort(p.start)
            sh.stats.add("stores_finished", ctx.device)
        try:
            first_chunk(sh, key)
        except ProtocolError:
            sh.contexts.touch(instance_id, pinged=False)
            raise
        want = range_chunks(sh, key)
        plan = [(0, list(range(want)), ctx.chunk_bytes)]
        start = store_start(sh, key, instance_id, ctx, "engine", plan, overloaded=_overloaded(ctx))
        if start.n == 0:
            return PrepareStoreReply(context=StoreSlots(slots=[], chunk_indices=[]))
        st = start.batches[0]
        sh.l1.journal_reserved(list(zip(st.offsets, st.sizes, strict=True)))  # before the worker has them
        if not st.chunks:
            if start.oom:
                raise ProtocolError(
                    "not_stored", f"none of {start.n} chunk(s) stored: L1 is full of locked objects"
                )
            return PrepareStoreReply(context=StoreSlots(slots=[], chunk_indices=[]))
        reply = PrepareStoreReply(
            context=StoreSlots(slots=[_slot(ctx, off) for off in st.offsets], chunk_indices=st.chunks)
        )
        ctx.push(ctx.stores, _prepare_key(key), PreparedStore(start))
        return reply

    def commit_store(self, key: IPCCacheServerKey, instance_id: int, data: bytes) -> bool:
        """Admits what the worker wrote into its prepared slots: into Rust to find its worker
        and once to end the store (`store_finish`)."""
        sh, l1, control = self.sh, self.sh.l1, self.sh.control
        ctx = engine_context(sh, key, instance_id)
        p: PreparedStore | None = ctx.pop(ctx.stores, _prepare_key(key))
        if data:
            if p is not None:
                control.store_abort(p.start)
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
        st = p.start.batches[0]
        size = ctx.chunk_bytes
        digests = [l1.seal(off, size) for off in st.offsets]
        if l1.journal is not None:
            l1.journal_sealed(st.scope, p.start.hashes(0), [(o, size) for o in st.offsets], digests)
        done = control.store_finish(p.start)
        admitted = done.admitted[0]
        l1.journal_admitted(st.scope, admitted, size)
        if sh.l2 is not None:
            sh.l2.enqueue(st.scope, admitted)
        oom, expired, dropped = p.start.oom, done.expired, done.dropped
        if oom or expired or dropped:
            raise ProtocolError(
                "not_stored",
                f"{oom + expired + dropped} chunk(s) of this range not stored: {oom} found L1 full "
                f"of locked objects, {expired} reservation(s) expired before the commit, {dropped} "
                "dropped by a clear while being written",
            )
        return True

    def prepare_retrieve(self, key: IPCCacheServerKey, instance_id: int) -> PrepareRetrieveReply:
        """Leases the range's chunks for the worker to copy out of: into Rust at the start
        (`read_start`) and once to give the lookup's share back (`read_finish`); the commit
        ends the lease."""
        sh = self.sh
        ctx, _ = read_context(sh, key, instance_id, engine_context)
        start = read_start(sh, key, instance_id, ctx, PLAIN_GROUPS, overloaded=_overloaded(ctx))
        failure = read_failure(sh, key, start, lambda: PrepareRetrieveReply(success=False))
        if failure is not None:
            err, corrupt, missing = failure
            sh.control.read_finish(start, "failed", corrupt=corrupt, missing=missing)
            raise err
        # The lease lasts until commit_retrieve: the worker copies out of these slots.
        ctx.push(ctx.reads, _prepare_key(key), PreparedRetrieve(start))
        sh.control.read_finish(start, "prepared")
        offsets = start.reads[0].offsets if start.reads else []
        return PrepareRetrieveReply(
            success=True, context=RetrieveSlots(slots=[_slot(ctx, off) for off in offsets])
        )

    def commit_retrieve(self, key: IPCCacheServerKey, instance_id: int) -> bool:
        """Unlocks what prepare_retrieve locked. False (not an error) when nothing is waiting:
        LMCache clients commit after a failed prepare too."""
        sh = self.sh
        ctx = engine_context(sh, key, instance_id)
        p: PreparedRetrieve | None = ctx.pop(ctx.reads, _prepare_key(key))
        if p is None:
            return False
        sh.control.read_finish(p.start, "done")
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
                    self.sh.control.store_abort(p.start)
                for r in reads:  # their leases expired in the core already: a no-op there
                    self.sh.index.release(r.lease)
                n_stores += len(stores)
                n_reads += len(reads)
        return n_stores, n_reads
