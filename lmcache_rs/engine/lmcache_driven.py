"""The lmcache-driven data path (spec D.1, D.2): `store` and `retrieve`.

The server copies the worker's KV itself, between the worker's registered KV tensors (their
block ids in the request) and L1 objects: torch gathers and scatters, on the worker's GPU
through its mover or on the CPU. Hybrid layouts store and read per object group
(engine/groups.py).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from lmcache_rs import ControlError
from lmcache_rs.engine.contexts import KVContext
from lmcache_rs.engine.groups import StoreBatch, store_plan
from lmcache_rs.engine.groups import chunk_blocks as group_blocks
from lmcache_rs.engine.shared import (
    Shared,
    done_event,
    first_chunk,
    range_chunks,
    read_context,
    read_failure,
    read_start,
    store_start,
    worker_context,
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
        """Into Rust twice: `store_start` (hashes, reservations of the plan) and
        `store_finish` (admission, counters); the copies in between are torch's."""
        sh, l1, control = self.sh, self.sh.l1, self.sh.control
        ctx = worker_context(sh, key, instance_id, touch=False)
        try:
            first_chunk(sh, key)
        except ProtocolError:
            sh.contexts.touch(instance_id, pinged=False)
            sh.stats.add("stores_submitted", ctx.device)  # as it always was: counted first
            raise
        want = range_chunks(sh, key)
        # Planned for the whole range before the core is asked; the core leaves out chunks
        # beyond those the tokens give. Block ids that do not cover the whole range are
        # checked against the chunks the tokens give (`store_reserve`), as they always were.
        batches: list[StoreBatch] | None = None
        blocks: list[torch.Tensor] = []
        if want:
            try:
                blocks = self._block_tensors(ctx, block_ids, want)
                batches = self._plan(ctx, blocks, want)
            except ProtocolError:
                batches = None
        plan = None if batches is None else [(b.object_group, b.chunks, b.nbytes) for b in batches]
        start = store_start(sh, key, instance_id, ctx, "lmcache", plan)
        n = start.n
        if n == 0:
            return [done_event(ctx, event), True]
        if batches is None:
            blocks = self._block_tensors(ctx, block_ids, n)
            batches = self._plan(ctx, blocks, n)
            try:
                control.store_reserve(key, start, [(b.object_group, b.chunks, b.nbytes) for b in batches])
            except ControlError as e:
                raise ProtocolError(*e.args) from None
        copies: list[ObjectCopy] = []
        slots: list[tuple[int, int]] = []  # (offset, size) of each copy, sealed once written
        staged = start.batches  # one per planned batch, in plan order
        try:
            for b, st in zip(batches, staged, strict=True):
                l1.journal_reserved(list(zip(st.offsets, st.sizes, strict=True)))
                for i, off in zip(st.chunks, st.offsets, strict=True):
                    obj = l1.view(off, b.nbytes)
                    copies.append(
                        ObjectCopy(b.group.kernels, group_blocks(b.group, blocks, i, b.rows), obj, b.rows)
                    )
                    slots.append((off, b.nbytes))
            if ctx.mover is not None:  # GPU worker: gather on its GPU, one DMA per object
                done = ctx.mover.store(ctx.layer_tensors, copies, event)
            else:
                done = STUB_EVENT
                layers = ctx.layer_tensors
                sh.copier.run(lambda c: gather(c, layers), copies)
            digests = [l1.seal(off, size) for off, size in slots]
            if l1.journal is not None:
                k = 0
                for j, st in enumerate(staged):  # slots are in batch order
                    m = len(st.chunks)
                    l1.journal_sealed(st.scope, start.hashes(j), slots[k : k + m], digests[k : k + m])
                    k += m
        except Exception:
            control.store_abort(start)
            raise
        end = control.store_finish(start)
        for st, admitted in zip(staged, end.admitted, strict=True):
            l1.journal_admitted(st.scope, admitted, st.nbytes)
            if sh.l2 is not None:
                sh.l2.enqueue(st.scope, admitted)
        oom, lost = start.oom, end.expired + end.dropped
        if oom or lost:
            raise ProtocolError(
                "not_stored",
                f"{oom + lost} of {start.want} chunk object(s) not stored: {oom} found L1 full of locked "
                f"objects, {lost} were dropped by a clear while being copied",
                fallback=[done, False],
            )
        return [done, True]

    def _plan(self, ctx: KVContext, blocks: list[torch.Tensor], n: int) -> list[StoreBatch]:
        """Per object group, the chunks whose blocks are live in it (engine/groups.py: null
        blocks, e.g. of a sliding window, are never copied), and as which kind of object."""
        return [b for og in ctx.objects for b in store_plan(og, blocks, n, self.sh.null_block_id)]

    def retrieve(
        self, key: IPCCacheServerKey, instance_id: int, block_ids: list[list[int]], event: bytes, skip: int
    ) -> list[Any]:
        """Into Rust twice: `read_start` (hashes, the plan's read leases) and `read_finish`
        (leases and the lookup's share given back, counters); torch copies in between."""
        sh, chunk = self.sh, self.sh.chunk_size
        ctx, _ = read_context(sh, key, instance_id, worker_context)
        want = range_chunks(sh, key)
        blocks: list[torch.Tensor] = []
        bad: ProtocolError | None = None
        if want:  # n == want once the start succeeds
            try:
                blocks = self._block_tensors(ctx, block_ids, want)
            except ProtocolError as e:
                bad = e
        start = read_start(sh, key, instance_id, ctx, ctx.read_groups, lease=bad is None)
        end: Literal["done", "failed"] = "failed"
        corrupt = missing = 0
        try:
            if bad is not None:
                raise bad
            c0 = start.c0
            if start.n == 0:
                end = "done"
                return [done_event(ctx, event), True]
            failure = read_failure(sh, key, start, lambda: [done_event(ctx, event), False])
            if failure is not None:
                err, corrupt, missing = failure
                raise err
            copies: list[ObjectCopy] = []
            # Per object group only the chunks the prefix's window covers (engine/groups.py;
            # planned in rust/control/data.rs), a window's first chunk from its tail object
            # when the whole one is gone.
            for r in start.reads:
                og = ctx.objects[r.group]
                write_rows = og.first_rows if r.first_of_window else og.whole_rows
                rows = og.first_rows if r.tail else og.whole_rows
                size = og.nbytes(rows)
                for j, off in zip(range(r.first, r.first + r.count), r.offsets, strict=True):
                    i = j - c0
                    copies.append(
                        ObjectCopy(
                            og.kernels,
                            group_blocks(og, blocks, i, write_rows),
                            sh.l1.view(off, size),
                            rows,
                            min(max(skip - i * chunk, 0), chunk),
                        )
                    )
            if ctx.mover is not None:  # GPU worker: one DMA per object, scatter on its GPU
                done = ctx.mover.retrieve(ctx.layer_tensors, copies, chunk, sh.null_block_id, event)
            else:
                done = STUB_EVENT
                layers, null = ctx.layer_tensors, sh.null_block_id
                sh.copier.run(lambda c: scatter(c, layers, chunk, null), copies)
            # Every copy out of the leased ranges is done here: the CUDA mover synchronizes
            # on its stream before it returns (CudaMover._finish).
            end = "done"
            return [done, True]
        finally:
            sh.control.read_finish(start, end, corrupt=corrupt, missing=missing)
