"""Prefix reuse through lmcache-rs with a real transformer (Hugging Face `transformers`).

    python examples/hf_prefix_reuse.py                       # starts a server on free ports
    python examples/hf_prefix_reuse.py --url tcp://127.0.0.1:5555
    python examples/hf_prefix_reuse.py --transfer engine_driven

A small Llama-architecture decoder, built from a config with seeded random weights (nothing is
downloaded), plays the engine:

1. Process A runs the prompt's prefix, writes each layer's K and V into a paged KV cache laid
   out as vLLM's (per layer `[2, blocks, 16, kv_heads, head_dim]`) and stores the prefix's
   chunks through the server, as `LMCacheMPConnector` does: lmcache-driven (the cache is in
   POSIX shm and the server copies the blocks) or engine-driven (the engine copies the blocks
   into L1 slots of the server's shared-memory pool, vLLM's default for CPU workers).
2. Process B, a different "engine" with its own empty paged cache, looks the prompt up,
   retrieves the prefix into fresh blocks, rebuilds the model's KV cache from those blocks and
   runs only the rest of the prompt.
3. B's logits must equal the logits of the full prompt computed from scratch (fp32 on CPU:
   exactly), and a request with another `cache_salt` must get no hit.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from lmcache_rs.client import MPClient, ShmKVCache
from lmcache_rs.client.client import make_key
from lmcache_rs.client.engine_driven import EngineDrivenWorker
from lmcache_rs.protocol.messages import IPCCacheServerKey

CHUNK = 256
BLOCK = 16
MODEL = "tiny-llama-random"


def build_model(seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=2000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


class PagedKV:
    """The engine's paged KV cache and how it talks to the server (`transfer`)."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, transfer: str, instance_id: int) -> None:
        c = model.config
        head_dim = c.hidden_size // c.num_attention_heads
        self.transfer = transfer
        self.iid = instance_id
        self.shm: ShmKVCache | None = None
        if transfer == "lmcache_driven":
            self.shm = ShmKVCache(
                c.num_hidden_layers, num_blocks, BLOCK, c.num_key_value_heads, head_dim, torch.float32
            )
            self.layers = self.shm.layers
        else:
            shape = (2, num_blocks, BLOCK, c.num_key_value_heads, head_dim)
            self.layers = [torch.zeros(shape) for _ in range(c.num_hidden_layers)]
        self.worker: EngineDrivenWorker | None = None

    def register(self, c: MPClient) -> None:
        if self.shm is not None:
            c.register_kv_cache(self.iid, self.shm.handles(), MODEL, 1, {"kv_layout": "NHD"})
        else:
            self.worker = EngineDrivenWorker(c, self.layers, self.iid, MODEL, chunk_size=CHUNK)
            self.worker.register()

    def store(self, c: MPClient, key: IPCCacheServerKey, blocks: list[int]) -> bool:
        if self.worker is not None:
            return self.worker.store(key, blocks)
        return c.store(key, self.iid, [blocks])[1]

    def retrieve(self, c: MPClient, key: IPCCacheServerKey, blocks: list[int]) -> bool:
        if self.worker is not None:
            return self.worker.retrieve(key, blocks)
        return c.retrieve(key, self.iid, [blocks])[1]

    def unregister(self, c: MPClient) -> None:
        if self.worker is not None:
            self.worker.unregister()
        else:
            c.unregister_kv_cache(self.iid)

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()


def forward(model: LlamaForCausalLM, ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, cache=cache, use_cache=True).logits


def engine_a(url: str, tokens: list[int], prefix_tokens: int, salt: str, transfer: str, q: Any) -> None:
    """Prefill the prefix, write its KV into paged blocks 1.., store it through the server."""
    model = build_model()
    kv = PagedKV(model, 1 + prefix_tokens // BLOCK + 1, transfer, 0xA)
    cache = DynamicCache()
    forward(model, torch.tensor([tokens[:prefix_tokens]]), cache)
    blocks = list(range(1, 1 + prefix_tokens // BLOCK))
    for t, entry in zip(kv.layers, cache.layers, strict=True):
        for plane, x in enumerate((entry.keys, entry.values)):
            # [1, heads, tokens, head_dim] -> [blocks, BLOCK, heads, head_dim]
            paged = x[0].transpose(0, 1).reshape(len(blocks), BLOCK, *x.shape[1:2], x.shape[3])
            t[plane, blocks] = paged
    with MPClient(url, timeout=60) as c:
        kv.register(c)
        key = make_key(tokens, "a", model_name=MODEL, worker_id=0, end=prefix_tokens, cache_salt=salt)
        ok = kv.store(c, key, blocks)
        c.end_session("a")
        kv.unregister(c)
    kv.close()
    q.put(ok)


def engine_b(url: str, tokens: list[int], salt: str, transfer: str, q: Any) -> None:
    """Look the prompt up, retrieve the hit into fresh blocks, continue from there."""
    model = build_model()
    n_blocks = len(tokens) // BLOCK + 1
    kv = PagedKV(model, 100 + n_blocks, transfer, 0xB)
    with MPClient(url, timeout=60) as c:
        kv.register(c)
        end = len(tokens) // CHUNK * CHUNK
        hit = c.lookup(make_key(tokens, "b", model_name=MODEL, end=end, cache_salt=salt)) * CHUNK
        cache = DynamicCache()
        if hit:
            blocks = list(range(100, 100 + hit // BLOCK))  # not the blocks A used
            key = make_key(tokens, "b", model_name=MODEL, worker_id=0, end=hit, cache_salt=salt)
            assert kv.retrieve(c, key, blocks)
            for layer, t in enumerate(kv.layers):
                k, v = (t[plane, blocks].reshape(hit, *t.shape[3:]).transpose(0, 1)[None] for plane in (0, 1))
                cache.update(k.clone(), v.clone(), layer)
        c.end_session("b")
        kv.unregister(c)
    logits = forward(model, torch.tensor([tokens[hit:]]), cache)
    kv.close()
    q.put((hit, logits.numpy()))  # numpy pickles by value (torch would pass a shared fd)


def run(
    url: str,
    prompt_tokens: int = 700,
    prefix_tokens: int = 512,
    between: Callable[[], None] | None = None,
    transfer: str = "lmcache_driven",
) -> dict[str, Any]:
    """Runs A then B (and B with another salt) in their own processes; checks the logits.
    `between` runs after A (e.g. to clear L1 so that B's prefix must come from L2)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 2000, (prompt_tokens,), generator=g).tolist()
    ctx = mp.get_context("spawn")

    def in_process(target: Any, *args: Any) -> Any:
        q = ctx.Queue()
        p = ctx.Process(target=target, args=(*args, q))
        p.start()
        out = q.get(timeout=300)
        p.join(60)
        return out

    stored = in_process(engine_a, url, tokens, prefix_tokens, "tenant-a", transfer)
    if between is not None:
        between()
    hit, logits_np = in_process(engine_b, url, tokens, "tenant-a", transfer)
    logits = torch.from_numpy(logits_np)
    other_hit, _ = in_process(engine_b, url, tokens, "tenant-b", transfer)
    model = build_model()
    full = forward(model, torch.tensor([tokens]), DynamicCache())[:, hit:]
    # The control: without the prefix's KV the same suffix gives other logits.
    alone = forward(model, torch.tensor([tokens[hit:]]), DynamicCache())
    return {
        "prefix_matters": not torch.allclose(alone, full),
        "stored": stored,
        "hit_tokens": hit,
        "other_salt_hit_tokens": other_hit,
        "exact": bool(torch.equal(logits, full)),
        "max_abs_diff": float((logits - full).abs().max()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start one)")
    ap.add_argument(
        "--transfer",
        choices=("lmcache_driven", "engine_driven"),
        default="lmcache_driven",
        help="who copies the KV blocks: the server (from the engine's shm) or the engine (into L1 slots)",
    )
    a = ap.parse_args()
    srv = None
    url = a.url
    if url is None:
        sys.path.insert(0, "benches")
        from _common import ServerProcess  # noqa: PLC0415

        srv = ServerProcess("--l1-size-gb", "0.25")
        url = srv.url
    try:
        r = run(url, transfer=a.transfer)
    finally:
        if srv is not None:
            srv.stop()
    print(
        f"stored: {r['stored']}; tenant A hit {r['hit_tokens']} tokens; logits from the retrieved "
        f"KV equal a full recomputation: {r['exact']} (max |diff| {r['max_abs_diff']:.3g}); "
        f"tenant B hit {r['other_salt_hit_tokens']} tokens"
    )
    ok = r["exact"] and r["prefix_matters"] and r["hit_tokens"] > 0 and r["other_salt_hit_tokens"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
