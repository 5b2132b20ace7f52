"""Helpers for simulated workers in tests."""

from __future__ import annotations

import itertools
import random

import torch

from lmcache_rs.client import MPClient, ShmKVCache
from lmcache_rs.client.client import make_key
from lmcache_rs.client.shm_kv import select_blocks
from lmcache_rs.protocol.messages import IPCCacheServerKey

MODEL = "test-model"
_ids = itertools.count(1000)


class _SimWorker:
    """What every simulated worker shares: its request keys and its shm KV cache."""

    model: str
    world_size: int
    worker_id: int
    kv: ShmKVCache

    def key(
        self, tokens: list[int], request_id: str, start: int = 0, end: int | None = None, salt: str = ""
    ) -> IPCCacheServerKey:
        return make_key(
            tokens,
            request_id,
            model_name=self.model,
            world_size=self.world_size,
            worker_id=self.worker_id,
            start=start,
            end=end,
            cache_salt=salt,
        )

    def close(self) -> None:
        self.kv.close()


class Worker(_SimWorker):
    """One simulated vLLM worker: a paged KV cache in shm, registered with the server."""

    def __init__(
        self,
        client: MPClient,
        *,
        world_size: int = 1,
        worker_id: int = 0,
        num_layers: int = 2,
        num_blocks: int = 256,
        block_size: int = 16,
        heads: int = 2,
        head_dim: int = 32,
        dtype: torch.dtype = torch.float16,
        layout: str = "NHD",
        model: str = MODEL,
        seed: int = 0,
    ) -> None:
        self.client = client
        self.world_size = world_size
        self.worker_id = worker_id
        self.model = model
        self.instance_id = next(_ids) * 7919 + random.randrange(1 << 40)
        self.kv = ShmKVCache(num_layers, num_blocks, block_size, heads, head_dim, dtype, layout)
        self.kv.fill_random(seed)
        hints = {"kv_layout": layout} if layout != "MLA" else {}
        client.register_kv_cache(self.instance_id, self.kv.handles(), model, world_size, hints)

    def store(
        self,
        tokens: list[int],
        blocks: list[int],
        request_id: str = "s",
        start: int = 0,
        end: int | None = None,
        salt: str = "",
    ) -> bool:
        _, ok = self.client.store(self.key(tokens, request_id, start, end, salt), self.instance_id, [blocks])
        return ok

    def retrieve(
        self,
        tokens: list[int],
        blocks: list[int],
        request_id: str,
        start: int = 0,
        end: int | None = None,
        skip: int = 0,
        salt: str = "",
    ) -> bool:
        key = self.key(tokens, request_id, start, end, salt)
        _, ok = self.client.retrieve(key, self.instance_id, [blocks], skip)
        return ok


def lookup(
    client: MPClient,
    tokens: list[int],
    request_id: str,
    *,
    world_size: int = 1,
    salt: str = "",
    readers: int = 1,
    model: str = MODEL,
) -> int:
    key = make_key(
        tokens, request_id, model_name=model, world_size=world_size, cache_salt=salt, num_kv_readers=readers
    )
    return client.lookup(key)


def tokens(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n)]


class HybridWorker(_SimWorker):
    """A simulated vLLM worker of a hybrid model: engine KV groups (each its own block table,
    full attention or a sliding window), possibly several layers viewing one shm segment."""

    def __init__(
        self,
        client: MPClient,
        groups: list[list[int]],
        windows: list[int],
        *,
        storage_of: list[int] | None = None,
        num_blocks: int = 1024,
        block_size: int = 16,
        heads: int = 2,
        head_dim: int = 32,
        dtype: torch.dtype = torch.float16,
        model: str = "hybrid-model",
        world_size: int = 1,
        worker_id: int = 0,
        seed: int = 0,
    ) -> None:
        from lmcache_rs.protocol.messages import EngineGroupInfo  # noqa: PLC0415

        self.client = client
        self.groups = groups
        self.windows = windows
        self.model = model
        self.world_size = world_size
        self.worker_id = worker_id
        self.block_size = block_size
        self.instance_id = next(_ids) * 7919 + random.randrange(1 << 40)
        n_layers = sum(map(len, groups))
        self.kv = ShmKVCache(n_layers, num_blocks, block_size, heads, head_dim, dtype, "NHD", storage_of)
        self.kv.fill_random(seed)
        infos = [
            EngineGroupInfo(
                engine_group_id=g, layer_indices=ls, tokens_per_block=block_size, sw_size_tokens=w
            )
            for g, (ls, w) in enumerate(zip(groups, windows, strict=True))
        ]
        client.register_kv_cache(
            self.instance_id, self.kv.handles(), model, world_size, {"kv_layout": "NHD"}, infos
        )

    def store(self, tokens: list[int], blocks: list[list[int]], request_id: str = "s", **kw: object) -> bool:
        return self.client.store(self.key(tokens, request_id, **kw), self.instance_id, blocks)[1]

    def retrieve(
        self, tokens: list[int], blocks: list[list[int]], request_id: str, skip: int = 0, **kw: object
    ) -> bool:
        return self.client.retrieve(self.key(tokens, request_id, **kw), self.instance_id, blocks, skip)[1]

    def group_blocks(self, g: int, block_ids: list[int]) -> list[torch.Tensor]:
        """Per layer of engine group `g`, a copy of the given blocks."""
        return select_blocks([self.kv.layers[i] for i in self.groups[g]], "NHD", block_ids)

    def snapshot(self) -> list[torch.Tensor]:
        """A copy of every shm segment (each once)."""
        first = {s: i for i, s in reversed(list(enumerate(self.kv.storage_of)))}
        return [self.kv.layers[first[s]].clone() for s in sorted(first)]


def vllm_blocks(first: int, n_tokens: int, window: int, block_size: int = 16) -> list[int]:
    """A sequence's block table as vLLM holds it once `n_tokens` are computed: consecutive ids
    from `first`; for a sliding window of `window` tokens the blocks wholly out of the window
    (before token n_tokens - window + 1) are the null block 0."""
    ids = list(range(first, first + n_tokens // block_size))
    skipped = max(n_tokens - window + 1, 0) // block_size if window > 0 else 0
    return [0] * skipped + ids[skipped:]
