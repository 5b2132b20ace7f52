"""The lmcache-driven data path (spec D.1, D.2): `store` and `retrieve`.

The server copies the worker's KV itself, between the worker's registered KV tensors (their
block ids in the request) and L1 objects: torch gathers and scatters, on the worker's GPU
through its mover or on the CPU. Hybrid layouts store and read per object group
(engine/groups.py).
"""

from __future__ import annotations

from typing import Any

import torch

from lmcache_rs.engine.contexts import KVContext
from lmcache_rs.engine.groups import chunk_blocks as group_blocks
from lmcache_rs.engine.groups import read_plan, store_plan
from lmcache_rs.engine.shared import (
    Shared,
    done_event,
    lock_for_read,
    release_share,
    scope,
    start_read,
    worker_context,
    write_range,
)
from lmcache_rs.protocol.codec import ProtocolError
from lmcache_rs.protocol.messages import STUB_EVENT, IPCCacheServerKey
from lmcache_rs.transfer.gather import ObjectCopy, gather, scatter


class LmcacheDriven:
    def __init__(self, sh: Shared) -> None:
        self.sh = sh

    def _block_tensors(self, ctx: KVContext, block_ids: list[list[int]], chunks: int) -> list[torch.Tensor]:
        if len(block_ids) != len(ctx.groups):
            raise ProtocolError(
                "bad_request", f"{len(block_ids)} block lists for {len(ctx.groups)} KV group(s)"
            )
        out = []
        for g, ids in zip(ctx.groups, block_ids, strict=True):
            need = chunks * (self.sh.chunk_size // g.block_size)
            if len(ids) < need:
                raise ProtocolError("bad_request", f"{len(ids)} block ids for {chunks} chunk(s): need {need}")
            t = torch.tensor(ids[:need], dtype=torch.int64)
            if need and (int(t.min()) < 0 or int(t.max()) >= ctx.num_blocks):
                raise ProtocolError("bad_request", f"block id out of range [0, {ctx.num_blocks})")
            out.append(t)
        return out

    def store(
        self, key: IPCCacheServerKey, instance_id: int, block_ids: list[list[int]], event: bytes
    ) -> list[Any]:
        sh, l1, index = self.sh, self.sh.l1, self.sh.index
        ctx = worker_context(sh, key, instance_id)
        sh.stats.add("stores_submitted", ctx.device)
        hashes = write_range(sh, key)
        n = len(hashes)
        if n == 0:
            sh.stats.add("stores_finished", ctx.device)
            return [done_event(ctx, event), True]
        blocks = self._block_tensors(ctx, block_ids, n)
        rank = key.worker_id or 0
        # Per object group, the chunks whose blocks are live in it (engine/groups.py: null
        # blocks, e.g. of a sliding window, are never copied), and as which kind of object.
        batches = [b for og in ctx.objects for b in store_plan(og, blocks, n, sh.null_block_id)]
        scopes = [scope(key, rank, b.object_group) for b in batches]
        want = sum(len(b.chunks) for b in batches)
        results = []
        copies: list[ObjectCopy] = []
        slots: list[tuple[int, int]] = []  # (offset, size) of each copy, sealed once written
        staged: list[list[bytes]] = []
        try:
            for b, sc in zip(batches, scopes, strict=True):
                res = index.reserve_write(sc, [hashes[i] for i in b.chunks], b.nbytes, instance_id)
                results.append(res)
                ok = [(i, r.offset) for i, r in zip(b.chunks, res, strict=True) if r.status == "reserved"]
                staged.append([hashes[i] for i, _ in ok])
                l1.journal_reserved([(r.offset, r.size) for r in res if r.status == "reserved"])
                for i, off in ok:
                    obj = l1.view(off, b.nbytes)
                    copies.append(
                        ObjectCopy(b.group.kernels, group_blocks(b.group, blocks, i, b.rows), obj, b.rows)
                    )
                    slots.append((off, b.nbytes))
            if ctx.mover is not None:  # GPU worker: gather on its GPU, one DMA per object
                done = ctx.mover.store(ctx.layer_tensors, copies, event)
            else:
                done = STUB_EVENT
                for c in copies:
                    gather(c, ctx.layer_tensors)
            digests = [l1.seal(off, size) for off, size in slots]
            k = 0
            for sc, hs in zip(scopes, staged, strict=True):  # slots are in batch order
                l1.journal_sealed(sc, hs, slots[k : k + len(hs)], digests[k : k + len(hs)])
                k += len(hs)
        except Exception:
            for sc, hs in zip(scopes, staged, strict=False):  # the batches reserved so far
                index.abort_write(sc, hs, instance_id)
            raise
        oom = sum(r.status == "oom" for res in results for r in res)
        admitted = lost = 0
        for b, sc, hs in zip(batches, scopes, staged, strict=True):
            statuses = index.finish_write(sc, hs, instance_id).statuses
            ok_hs = [h for h, st in zip(hs, statuses, strict=True) if st == "admitted"]
            l1.journal_admitted(sc, ok_hs, b.nbytes)
            if sh.l2 is not None:
                sh.l2.enqueue(sc, ok_hs)
            lost += sum(s in ("not_staged", "dropped") for s in statuses)
            admitted += sum(s == "admitted" for s in statuses)
        sh.stats.add("l1_write_chunks", key.cache_salt, n=admitted)
        sh.stats.add("stores_finished", ctx.device)
        if oom or lost:
            sh.stats.add("l1_allocation_failure_chunks", "l1_store", key.model_name, n=oom + lost)
            raise ProtocolError(
                "not_stored",
                f"{oom + lost} of {want} chunk object(s) not stored: {oom} found L1 full of locked "
                f"objects, {lost} were dropped by a clear while being copied",
                fallback=[done, False],
            )
        return [done, True]

    def retrieve(
        self, key: IPCCacheServerKey, instance_id: int, block_ids: list[list[int]], event: bytes, skip: int
    ) -> list[Any]:
        sh, chunk = self.sh, self.sh.chunk_size
        ctx, hashes, c0 = start_read(sh, key, instance_id, worker_context)
        n = len(hashes)
        rank = key.worker_id or 0
        try:
            sh.stats.add("retrieves_submitted", ctx.device)
            if n == 0:
                return [done_event(ctx, event), True]
            blocks = self._block_tensors(ctx, block_ids, n)
            leases: list[int] = []
            try:
                copies: list[ObjectCopy] = []
                # Per object group only the chunks the prefix's window covers (engine/groups.py).
                for read in (r for og in ctx.objects for r in read_plan(og, c0, c0 + n)):
                    og, hs = read.group, [hashes[j - c0] for j in read.chunks]
                    sc, rows = scope(key, rank, og.id), og.whole_rows
                    if read.first_of_window and og.tail_id is not None and not sh.index.peek(sc, hs):
                        sc, rows = scope(key, rank, og.tail_id), read.rows  # its tail object
                    lease, offsets = lock_for_read(sh, key, sc, hs, lambda: [done_event(ctx, event), False])
                    leases.append(lease)
                    for j, off in zip(read.chunks, offsets, strict=True):
                        i = j - c0
                        copies.append(
                            ObjectCopy(
                                og.kernels,
                                group_blocks(og, blocks, i, read.rows),
                                sh.l1.view(off, og.nbytes(rows)),
                                rows,
                                min(max(skip - i * chunk, 0), chunk),
                            )
                        )
                if ctx.mover is not None:  # GPU worker: one DMA per object, scatter on its GPU
                    done = ctx.mover.retrieve(ctx.layer_tensors, copies, chunk, sh.null_block_id, event)
                else:
                    done = STUB_EVENT
                    for c in copies:
                        scatter(c, ctx.layer_tensors, chunk, sh.null_block_id)
            finally:
                # Every copy out of the leased ranges is done here: the CUDA mover synchronizes
                # on its stream before it returns (CudaMover._finish).
                for lease in leases:
                    sh.index.release(lease)
            sh.stats.add("l1_read_chunks", key.cache_salt, n=n)
            sh.stats.add("num_chunks_loaded", str(key.worker_id), key.model_name, key.cache_salt, n=n)
            return [done, True]
        finally:
            release_share(sh, key, c0, c0 + n)
            sh.stats.add("retrieves_finished", ctx.device)
