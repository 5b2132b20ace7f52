"""GPU store/retrieve throughput through a real server (CUDA path), next to the physical limit.

    python benches/bench_gpu.py [--chunks 32] [--layers 32] [--out bench-results/gpu.json]

A server process and a GPU worker (this process) on one device; the worker's paged KV cache
has the Llama-3.1-8B shape by default (32 layers, 8 KV heads x 128, bf16, 16-token blocks,
256-token chunks: 32 MiB per chunk). It stores `--chunks` chunks (GPU -> pinned L1) and
retrieves them into other blocks (L1 -> GPU), several rounds each, and prints GB/s per
direction next to a plain pinned-memory copy of the same bytes in the same run (one
`copy_` of a chunk-sized device tensor to pinned host memory and back), with the ratio.
Needs CUDA; exits 2 without it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ServerProcess, emit, machine

from lmcache_rs.client import MPClient
from lmcache_rs.client.client import make_key

C = 256
BS = 16


def pinned_copy_gbps(chunk_bytes: int, chunks: int, reps: int) -> tuple[float, float]:
    """Device -> pinned host and back, one chunk-sized copy at a time (the PCIe limit)."""
    dev = torch.empty(chunk_bytes, dtype=torch.uint8, device="cuda")
    host = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(chunks)]
    out = []
    for direction in ("d2h", "h2d"):
        best = 0.0
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for h in host:
                if direction == "d2h":
                    h.copy_(dev, non_blocking=True)
                else:
                    dev.copy_(h, non_blocking=True)
            torch.cuda.synchronize()
            best = max(best, chunks * chunk_bytes / (time.perf_counter() - t0) / 1e9)
        out.append(best)
    return out[0], out[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench-results/gpu.json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: needs a CUDA device", file=sys.stderr)
        return 2
    from lmcache_rs.client.cuda_kv import CudaKVCache  # noqa: PLC0415

    per = C // BS
    chunk_bytes = 2 * a.layers * C * a.heads * a.head_dim * 2
    l1_gb = max(1.0, 2.5 * a.chunks * chunk_bytes / (1 << 30))
    kv = CudaKVCache(a.layers, 2 * a.chunks * per + 1, BS, a.heads, a.head_dim, torch.bfloat16)
    kv.fill_random(0)
    d2h_limit, h2d_limit = pinned_copy_gbps(chunk_bytes, a.chunks, a.rounds)
    srv = ServerProcess("--l1-size-gb", f"{l1_gb:.2f}", "--eviction-policy", "LRU")
    store_gbps: list[float] = []
    retrieve_gbps: list[float] = []
    try:
        with MPClient(srv.url, timeout=300) as c:
            c.register_kv_cache(1, kv.handles(), "bench-gpu", 1, {"kv_layout": "NHD"})
            src = list(range(1, 1 + a.chunks * per))
            dst = list(range(1 + a.chunks * per, 1 + 2 * a.chunks * per))
            for r in range(a.rounds):
                c.clear(True)
                t = [(r * 7919 + i) % 50_000 for i in range(a.chunks * C)]
                key = make_key(t, f"s{r}", model_name="bench-gpu", worker_id=0)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                event, ok = c.store(key, 1, [src], kv.event())
                kv.wait(event)
                store_gbps.append(a.chunks * chunk_bytes / (time.perf_counter() - t0) / 1e9)
                assert ok, "store failed"
                hit = c.lookup(make_key(t, f"r{r}", model_name="bench-gpu"))
                assert hit == a.chunks, f"lookup hit {hit} of {a.chunks}"
                key = make_key(t, f"r{r}", model_name="bench-gpu", worker_id=0)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                event, ok = c.retrieve(key, 1, [dst], 0, kv.event())
                kv.wait(event)
                retrieve_gbps.append(a.chunks * chunk_bytes / (time.perf_counter() - t0) / 1e9)
                assert ok, "retrieve failed"
                c.end_session(f"r{r}")
            for x, y in zip(kv.blocks_view(src), kv.blocks_view(dst), strict=True):
                assert torch.equal(x, y), "retrieved KV differs from what was stored"
            c.unregister_kv_cache(1)
    finally:
        srv.stop()
    store, retrieve = max(store_gbps), max(retrieve_gbps)
    data = {
        "machine": {**machine(), "gpu": torch.cuda.get_device_name(0)},
        "chunk_bytes": chunk_bytes,
        "chunks": a.chunks,
        "pinned_copy_gbps": {"d2h": d2h_limit, "h2d": h2d_limit},
        "store_gbps": store_gbps,
        "retrieve_gbps": retrieve_gbps,
        "store_ratio": store / d2h_limit,
        "retrieve_ratio": retrieve / h2d_limit,
    }
    rows = [
        ("GPU", data["machine"]["gpu"]),
        ("chunk", f"{chunk_bytes / (1 << 20):.0f} MiB x {a.chunks}"),
        ("pinned copy d2h / h2d", f"{d2h_limit:.1f} / {h2d_limit:.1f} GB/s"),
        ("store (GPU -> L1), best", f"{store:.1f} GB/s = {data['store_ratio']:.2f}x pinned d2h"),
        ("retrieve (L1 -> GPU), best", f"{retrieve:.1f} GB/s = {data['retrieve_ratio']:.2f}x pinned h2d"),
        ("byte-exact", "yes"),
    ]
    emit("GPU data path (CUDA IPC, lmcache-driven)", rows, data, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
