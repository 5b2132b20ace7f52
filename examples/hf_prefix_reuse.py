"""Prefix reuse through lmcache-rs with a real transformer (Hugging Face `transformers`).

    python examples/hf_prefix_reuse.py                       # starts a server on free ports
    python examples/hf_prefix_reuse.py --url tcp://127.0.0.1:5555
    python examples/hf_prefix_reuse.py --transfer engine_driven
    python examples/hf_prefix_reuse.py --arch gemma3             # a sliding-window (hybrid) model

A small decoder, built from a config with seeded random weights (nothing is downloaded), plays
the engine: Llama (every layer full attention) or Gemma-3 (`--arch gemma3`: five sliding-window
layers of 384 tokens to one full-attention layer, registered as vLLM does: one KV group of full
attention and five sliding-window groups, all six layers viewing one shared KV tensor):

1. Process A runs the prompt's prefix, writes each layer's K and V into a paged KV cache laid
   out as vLLM's (per layer `[2, blocks, 16, kv_heads, head_dim]`) and stores the prefix's
   chunks through the server, as `LMCacheMPConnector` does: lmcache-driven (the cache is in
   POSIX shm and the server copies the blocks) or engine-driven (the engine copies the blocks
   into L1 slots of the server's shared-memory pool, vLLM's default for CPU workers).
2. Process B, a different "engine" with its own empty paged cache, looks the prompt up,
   retrieves the prefix into fresh blocks, rebuilds the model's KV cache from those blocks and
   runs only the rest of the prompt.
3. B's logits must equal the logits of the full prompt computed from scratch (fp32 on CPU:
   exactly for Llama), and a request with another `cache_salt` must get no hit.

With Gemma-3, A computes every token's KV (as vLLM does) but, as vLLM frees them, hands the
sliding-window layers' blocks that fell out of the window as the null block 0; B's blocks that
the retrieve does not fill are NaN, so any KV the model used that did not come back would show.
B's logits must be bit-identical to the same model continuing from its own prefix cache, and
within float rounding of a full recomputation (Hugging Face's own cached continuation differs
from its full pass by ~1e-6 with sliding windows); a prefix whose window was never stored (the
first half of A's) must not be served.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from collections.abc import Callable
from typing import Any

import torch
from transformers import (
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from lmcache_rs.client import MPClient, ShmKVCache
from lmcache_rs.client.client import make_key
from lmcache_rs.client.engine_driven import EngineDrivenWorker
from lmcache_rs.protocol.messages import EngineGroupInfo, IPCCacheServerKey

CHUNK = 256
BLOCK = 16
ARCHS = ("llama", "gemma3")
#: Gemma-3's sliding window here: not a multiple of the chunk, so a window's first chunk is
#: stored as a partial (tail) object once vLLM has freed its first blocks.
WINDOW = 384
#: Blocks each KV group may use in one engine (groups share one block pool, as in vLLM).
GROUP_BLOCKS = 200


def model_name(arch: str) -> str:
    return f"tiny-{arch}-random"


def build_model(arch: str = "llama", seed: int = 0) -> PreTrainedModel:
    if arch == "gemma3":
        g3 = Gemma3TextConfig(
            vocab_size=2000,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=WINDOW,
            max_position_embeddings=4096,
        )
        torch.manual_seed(seed)
        return Gemma3ForCausalLM(g3).eval()
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


def kv_groups(model: PreTrainedModel) -> tuple[list[list[int]], list[int]]:
    """vLLM's KV cache groups of a model: the layers of each and its window (-1: full
    attention). As vLLM does for hybrid models, the sliding-window layers are split into
    groups as large as the full-attention one."""
    c = model.config
    types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    full = [i for i, t in enumerate(types) if t != "sliding_attention"]
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    size = len(full) or len(sliding)
    groups = ([full] if full else []) + [sliding[i : i + size] for i in range(0, len(sliding), size)]
    return groups, [-1 if g is full else c.sliding_window for g in groups]


class PagedKV:
    """The engine's paged KV cache and how it talks to the server (`transfer`): one block table
    per KV group; the i-th layer of every group views the same tensor (vLLM's hybrid layout)."""

    def __init__(self, model: PreTrainedModel, transfer: str, instance_id: int, arch: str) -> None:
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.transfer = transfer
        self.iid = instance_id
        self.model = model_name(arch)
        self.groups, self.windows = kv_groups(model)
        self.group_of = {layer: g for g, ls in enumerate(self.groups) for layer in ls}
        storage_of = [self.groups[self.group_of[i]].index(i) for i in range(c.num_hidden_layers)]
        num_blocks = 1 + GROUP_BLOCKS * len(self.groups)
        self.shm: ShmKVCache | None = None
        if transfer == "lmcache_driven":
            self.shm = ShmKVCache(
                c.num_hidden_layers,
                num_blocks,
                BLOCK,
                c.num_key_value_heads,
                head_dim,
                torch.float32,
                storage_of=storage_of,
            )
            self.layers = self.shm.layers
        else:
            if len(self.groups) > 1:
                raise ValueError("engine-driven transfer serves one KV group: use lmcache_driven")
            shape = (2, num_blocks, BLOCK, c.num_key_value_heads, head_dim)
            self.layers = [torch.zeros(shape) for _ in range(c.num_hidden_layers)]
        self.worker: EngineDrivenWorker | None = None

    def tables(self, n_tokens: int, first: int = 1) -> list[list[int]]:
        """Each group's block table for `n_tokens` computed tokens, from block `first` of the
        group's range; a sliding window's blocks wholly out of the window are the null block,
        as vLLM frees them (the next token attends to the last window - 1 tokens)."""
        out = []
        for g, w in enumerate(self.windows):
            start = GROUP_BLOCKS * g + first
            ids = list(range(start, start + n_tokens // BLOCK))
            gone = max(n_tokens - w + 1, 0) // BLOCK if w > 0 else 0
            out.append([0] * gone + ids[gone:])
        return out

    def register(self, c: MPClient) -> None:
        if self.shm is not None:
            infos = [
                EngineGroupInfo(engine_group_id=g, layer_indices=ls, tokens_per_block=BLOCK, sw_size_tokens=w)
                for g, (ls, w) in enumerate(zip(self.groups, self.windows, strict=True))
            ]
            c.register_kv_cache(self.iid, self.shm.handles(), self.model, 1, {"kv_layout": "NHD"}, infos)
        else:
            self.worker = EngineDrivenWorker(c, self.layers, self.iid, self.model, chunk_size=CHUNK)
            self.worker.register()

    def store(self, c: MPClient, key: IPCCacheServerKey, tables: list[list[int]]) -> bool:
        if self.worker is not None:
            return self.worker.store(key, tables[0])
        return c.store(key, self.iid, tables)[1]

    def retrieve(self, c: MPClient, key: IPCCacheServerKey, tables: list[list[int]]) -> bool:
        if self.worker is not None:
            return self.worker.retrieve(key, tables[0])
        return c.retrieve(key, self.iid, tables)[1]

    def unregister(self, c: MPClient) -> None:
        if self.worker is not None:
            self.worker.unregister()
        else:
            c.unregister_kv_cache(self.iid)

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()


def forward(model: PreTrainedModel, ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, cache=cache, use_cache=True).logits


def engine_a(
    url: str, tokens: list[int], prefix_tokens: int, salt: str, transfer: str, arch: str, q: Any
) -> None:
    """Prefill the prefix, write its KV into paged blocks, store it through the server."""
    model = build_model(arch)
    kv = PagedKV(model, transfer, 0xA, arch)
    cache = DynamicCache()  # every token's KV, as the engine computes it
    forward(model, torch.tensor([tokens[:prefix_tokens]]), cache)
    tables = kv.tables(prefix_tokens)
    for layer, entry in enumerate(cache.layers):
        ids = tables[kv.group_of[layer]]
        live = [i for i, b in enumerate(ids) if b]  # blocks out of a window were freed
        t = kv.layers[layer]
        for plane, x in enumerate((entry.keys, entry.values)):
            # [1, heads, tokens, head_dim] -> [blocks, BLOCK, heads, head_dim]
            paged = x[0].transpose(0, 1).reshape(len(ids), BLOCK, x.shape[1], x.shape[3])
            t[plane, [ids[i] for i in live]] = paged[live]
    with MPClient(url, timeout=60) as c:
        kv.register(c)
        key = make_key(tokens, "a", model_name=kv.model, worker_id=0, end=prefix_tokens, cache_salt=salt)
        ok = kv.store(c, key, tables)
        c.end_session("a")
        kv.unregister(c)
    kv.close()
    q.put(ok)


def engine_b(url: str, tokens: list[int], salt: str, transfer: str, arch: str, q: Any) -> None:
    """Look the prompt up, retrieve the hit into fresh blocks, continue from there."""
    model = build_model(arch)
    kv = PagedKV(model, transfer, 0xB, arch)
    for t in kv.layers:  # what the retrieve does not write stays NaN (null block 0 included)
        t.fill_(float("nan"))
    with MPClient(url, timeout=60) as c:
        kv.register(c)
        end = len(tokens) // CHUNK * CHUNK
        hit = c.lookup(make_key(tokens, "b", model_name=kv.model, end=end, cache_salt=salt)) * CHUNK
        cache = DynamicCache(config=model.config)
        if hit:
            tables = kv.tables(hit, first=100)  # not the blocks A used
            key = make_key(tokens, "b", model_name=kv.model, worker_id=0, end=hit, cache_salt=salt)
            assert kv.retrieve(c, key, tables)
            for layer, t in enumerate(kv.layers):
                ids = tables[kv.group_of[layer]]
                k, v = (t[plane, ids].reshape(hit, *t.shape[3:]).transpose(0, 1)[None] for plane in (0, 1))
                # A sliding-window layer keeps only the last window - 1 tokens of these.
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
    arch: str = "llama",
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

    stored = in_process(engine_a, url, tokens, prefix_tokens, "tenant-a", transfer, arch)
    if between is not None:
        between()
    with MPClient(url, timeout=60) as c:  # the first half of A's prefix: its window never stored
        half = (prefix_tokens // 2) // CHUNK * CHUNK
        key = make_key(tokens[:half], "half", model_name=model_name(arch), cache_salt="tenant-a")
        half_hit = c.lookup(key) * CHUNK
        c.end_session("half")
    hit, logits_np = in_process(engine_b, url, tokens, "tenant-a", transfer, arch)
    logits = torch.from_numpy(logits_np)
    other_hit, _ = in_process(engine_b, url, tokens, "tenant-b", transfer, arch)
    model = build_model(arch)
    full = forward(model, torch.tensor([tokens]), DynamicCache(config=model.config))[:, hit:]
    # The same model continuing from its own prefix cache: what bit-identical KV must give.
    local_cache = DynamicCache(config=model.config)
    if hit:
        forward(model, torch.tensor([tokens[:hit]]), local_cache)
    local = forward(model, torch.tensor([tokens[hit:]]), local_cache)
    # The control: without the prefix's KV the same suffix gives other logits.
    alone = forward(model, torch.tensor([tokens[hit:]]), DynamicCache(config=model.config))
    return {
        "prefix_matters": not torch.allclose(alone, full),
        "stored": stored,
        "hit_tokens": hit,
        "half_prefix_hit_tokens": half_hit,
        "other_salt_hit_tokens": other_hit,
        "exact": bool(torch.equal(logits, local)),
        "equal_to_full": bool(torch.equal(logits, full)),
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
    ap.add_argument(
        "--arch",
        choices=ARCHS,
        default="llama",
        help="llama: full attention; gemma3: sliding-window and full-attention layers (lmcache_driven)",
    )
    a = ap.parse_args()
    if a.arch == "gemma3" and a.transfer != "lmcache_driven":
        ap.error("a hybrid model needs --transfer lmcache_driven (engine-driven serves one KV group)")
    srv = None
    url = a.url
    if url is None:
        sys.path.insert(0, "benches")
        from _common import ServerProcess  # noqa: PLC0415

        srv = ServerProcess("--l1-size-gb", "0.25")
        url = srv.url
    try:
        if a.arch == "gemma3":
            r = run(url, prompt_tokens=1100, prefix_tokens=1024, arch="gemma3")
        else:
            r = run(url, transfer=a.transfer)
    finally:
        if srv is not None:
            srv.stop()
    print(
        f"stored: {r['stored']}; tenant A hit {r['hit_tokens']} tokens; logits from the retrieved "
        f"KV equal the model's own prefix cache: {r['exact']}, a full recomputation: "
        f"{r['equal_to_full']} (max |diff| {r['max_abs_diff']:.3g}); first half of the prefix hit "
        f"{r['half_prefix_hit_tokens']} tokens; tenant B hit {r['other_salt_hit_tokens']} tokens"
    )
    ok = r["exact"] and r["prefix_matters"] and r["hit_tokens"] > 0 and r["other_salt_hit_tokens"] == 0
    ok = ok and r["max_abs_diff"] < 1e-4
    if a.arch == "gemma3":
        ok = ok and r["half_prefix_hit_tokens"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
