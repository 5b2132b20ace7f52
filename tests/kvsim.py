"""Helpers for simulated workers in tests."""

from __future__ import annotations

import itertools
import random

import torch

from lmcache_rs.client import MPClient, ShmKVCache
from lmcache_rs.client.client import make_key
from lmcache_rs.protocol.messages import IPCCacheServerKey

MODEL = "test-model"
_ids = itertools.count(1000)


class Worker:
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

    def close(self) -> None:
        self.kv.close()


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
