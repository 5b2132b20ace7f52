"""An engine-driven CPU worker (spec D.3, J.4): it copies its own paged KV cache into and out of
the server's shared-memory L1 slots, as vLLM's CPU workers do in LMCache's engine-driven mode.

The worker maps the pool by opening `/dev/shm/<name>` itself, not through
`multiprocessing.shared_memory`, whose resource tracker would unlink the server's pool when
the worker exits (spec L.18). Its KV tensors are ordinary tensors: nothing of them is shared.
"""

from __future__ import annotations

import mmap
import os

import torch

from lmcache_rs.client.client import MPClient, ServerError
from lmcache_rs.protocol.messages import EngineDrivenRegistration, IPCCacheServerKey, ShmSlot
from lmcache_rs.storage.shm_pool import SHM_DIR
from lmcache_rs.transfer.gather import GroupLayout, ObjectCopy, gather, scatter


class PoolMapping:
    """The server's L1 pool mapped into this process."""

    def __init__(self, name: str, size: int) -> None:
        fd = os.open(os.path.join(SHM_DIR, name.lstrip("/")), os.O_RDWR)
        try:
            self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)

    def raw(self, slot: ShmSlot) -> torch.Tensor:
        """A slot's bytes (uint8)."""
        return torch.frombuffer(self.mm, dtype=torch.uint8, count=slot.length, offset=slot.offset)


class EngineDrivenWorker:
    """One worker rank whose KV cache is `layers` (one tensor per layer: NHD `[2, NB, BS, H, D]`,
    HND `[2, NB, H, BS, D]` or MLA `[NB, BS, D]`)."""

    def __init__(
        self,
        client: MPClient,
        layers: list[torch.Tensor],
        instance_id: int,
        model_name: str,
        *,
        layout: str = "NHD",
        world_size: int = 1,
        chunk_size: int = 256,
    ) -> None:
        t = layers[0]
        if layout == "NHD":
            _, _, bs, heads, dim = t.shape
        elif layout == "HND":
            _, _, heads, bs, dim = t.shape
        else:
            _, bs, dim = t.shape
            heads = 1
        self.group = GroupLayout(
            tuple(range(len(layers))), layout, 1 if layout == "MLA" else 2, bs, heads, dim, t.dtype
        )
        self.client = client
        self.layers = layers
        self.instance_id = instance_id
        self.model_name = model_name
        self.world_size = world_size
        self.chunk_size = chunk_size
        self.pool: PoolMapping | None = None

    def register(self) -> str:
        """Registers and maps the pool; returns its name. Raises ServerError without a pool."""
        reply = self.client.register_engine_driven(
            EngineDrivenRegistration(
                instance_id=self.instance_id,
                model_name=self.model_name,
                world_size=self.world_size,
                block_size=self.group.block_size,
                num_layers=len(self.layers),
                hidden_dim_size=self.group.hidden,
                dtype_str=str(self.group.dtype).removeprefix("torch."),
                use_mla=self.group.fmt == "MLA",
            )
        )
        self.pool = PoolMapping(reply.shm_name, reply.pool_size)
        return reply.shm_name

    def unregister(self) -> None:
        self.client.unregister_engine_driven(self.instance_id)

    def _copy(self, block_ids: list[int], chunk: int, obj: torch.Tensor, skip: int = 0) -> ObjectCopy:
        """Chunk `chunk` of the range (its blocks) and its slot's bytes."""
        per = self.chunk_size // self.group.block_size
        ids = torch.tensor(block_ids[chunk * per : (chunk + 1) * per], dtype=torch.int64)
        return ObjectCopy([self.group], [ids], obj, [per], skip)

    def store(self, key: IPCCacheServerKey, block_ids: list[int]) -> bool:
        """Copies the chunks the server asks for (those not cached yet) into their slots and
        commits them. `block_ids` cover the key's [start, end)."""
        assert self.pool is not None, "register() first"
        ctx = self.client.prepare_store(key, self.instance_id)
        if not ctx.slots:
            return True  # everything in the range is cached (or being written) already
        self.write_slots(ctx.slots, ctx.chunk_indices, block_ids)
        return self.client.commit_store(key, self.instance_id)

    def write_slots(self, slots: list[ShmSlot], chunk_indices: list[int], block_ids: list[int]) -> None:
        """Copies chunk `chunk_indices[i]` of `block_ids` into `slots[i]` (a prepare_store's
        reply), as `store` does between its prepare and its commit."""
        assert self.pool is not None, "register() first"
        for slot, chunk in zip(slots, chunk_indices, strict=True):
            gather(self._copy(block_ids, chunk, self.pool.raw(slot)), self.layers)

    def retrieve(self, key: IPCCacheServerKey, block_ids: list[int], skip_first_n_tokens: int = 0) -> bool:
        """Copies the range's chunks out of their slots into `block_ids`, leaving the first
        `skip_first_n_tokens` positions alone; always commits (which releases the locks)."""
        assert self.pool is not None, "register() first"
        try:
            reply = self.client.prepare_retrieve(key, self.instance_id)
            self.read_slots(reply.context.slots, block_ids, skip_first_n_tokens)
            return reply.success
        except ServerError:
            return False
        finally:
            self.client.commit_retrieve(key, self.instance_id)

    def read_slots(self, slots: list[ShmSlot], block_ids: list[int], skip_first_n_tokens: int = 0) -> None:
        """Copies `slots` (a prepare_retrieve's reply) into `block_ids`, as `retrieve` does
        between its prepare and its commit."""
        assert self.pool is not None, "register() first"
        for i, slot in enumerate(slots):
            skip = min(max(skip_first_n_tokens - i * self.chunk_size, 0), self.chunk_size)
            scatter(self._copy(block_ids, i, self.pool.raw(slot), skip), self.layers, self.chunk_size, -1)
