"""Data path, control path and memory of a running server, with baselines from the same run.

    python benches/bench_server.py                 # starts its own server
    python benches/bench_server.py --url tcp://host:5555 --http ...   # any server speaking the protocol

Default shape is Llama-3.1-8B per worker (32 layers, 8 KV heads x 128, bf16, 16-token blocks,
256-token chunks: 32 MiB per chunk); `--tokens` sets how much one store moves. Prints a table
and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time
from typing import Any

import torch
from _common import ServerProcess, emit, pct

from lmcache_rs import KeyScope, L1Index, mp_kv_rank
from lmcache_rs.client import MPClient, ShmKVCache
from lmcache_rs.client.client import make_key

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TINY = "bench-tiny"  # a 1-layer model for lookup benchmarks: lookups do not depend on KV size


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def memcpy_gbps(nbytes: int, reps: int = 5) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty(nbytes, dtype=torch.uint8)
    src.fill_(1)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return gbps(nbytes, best)


def data_path(url: str, a: argparse.Namespace) -> dict[str, Any]:
    blocks = a.tokens // a.block_size
    kv = ShmKVCache(a.layers, 2 * blocks + 1, a.block_size, a.heads, a.head_dim, DTYPES[a.dtype])
    kv.fill_random(0)
    nbytes = sum(t.numel() * t.element_size() for t in kv.layers) * blocks // (2 * blocks + 1)
    out: dict[str, Any] = {"bytes_per_store": nbytes, "tokens": a.tokens}
    with MPClient(url, timeout=600) as c:
        iid = 0x5EED
        c.register_kv_cache(iid, kv.handles(), "bench-model", 1, {"kv_layout": "NHD"})
        src = list(range(1, blocks + 1))
        dst = list(range(blocks + 1, 2 * blocks + 1))

        def one_store(seed: int) -> float:
            toks = [(seed * 7919 + i) % 50_000 for i in range(a.tokens)]
            key = make_key(toks, f"st{seed}", model_name="bench-model", worker_id=0)
            t = time.perf_counter()
            _, ok = c.store(key, iid, [src])
            dt = time.perf_counter() - t
            assert ok
            return dt

        out["store_cold_gbps"] = gbps(nbytes, one_store(1))  # first touch of L1 pages
        c.clear(True)
        warm = []
        for i in range(3):
            c.clear(True)  # L1 pages stay touched: this measures the copy, not page faults
            warm.append(one_store(2 + i))
        out["store_warm_gbps"] = gbps(nbytes, min(warm))
        c.clear(True)
        one_store(2)
        toks = [(2 * 7919 + i) % 50_000 for i in range(a.tokens)]
        times = []
        for r in range(3):
            rid = f"rt{r}"
            lk = make_key(toks, rid, model_name="bench-model")
            assert c.lookup(lk) == a.tokens // a.chunk_size
            key = make_key(toks, rid, model_name="bench-model", worker_id=0)
            t = time.perf_counter()
            _, ok = c.retrieve(key, iid, [dst])
            times.append(time.perf_counter() - t)
            assert ok
            c.end_session(rid)
        out["retrieve_warm_gbps"] = gbps(nbytes, min(times))
        assert all(torch.equal(x, y) for x, y in zip(kv.blocks_view(src), kv.blocks_view(dst), strict=True))
        c.unregister_kv_cache(iid)
        c.clear(True)
    kv.close()
    out["memcpy_gbps"] = memcpy_gbps(nbytes)
    for k in ("store_cold", "store_warm", "retrieve_warm"):
        out[f"{k}_over_memcpy"] = out[f"{k}_gbps"] / out["memcpy_gbps"]
    return out


def register_tiny(c: MPClient) -> ShmKVCache:
    kv = ShmKVCache(1, 4096 + 1, 16, 1, 16, torch.float16)
    c.register_kv_cache(0x71A1, kv.handles(), TINY, 1, {"kv_layout": "NHD"})
    return kv


def lookup_worker(url: str, n_tokens: int, hit: bool, n: int, q: Any) -> None:
    base = 0 if hit else 10_000_000
    toks = [(base + i) % 4_000_000 for i in range(n_tokens)] if hit else [base + i for i in range(n_tokens)]
    samples = []
    hits = 0
    start = 0.0
    with MPClient(url) as c:
        for i in range(n + 20):
            if i == 20:
                start = time.perf_counter()
            rid = f"l{os.getpid()}-{i}"
            key = make_key(toks, rid, model_name=TINY)
            t = time.perf_counter()
            got = c.lookup(key)
            dt = time.perf_counter() - t
            c.end_session(rid)
            if i >= 20:
                samples.append(dt)
                hits += got == n_tokens // 256
    q.put((samples, hits, time.perf_counter() - start))


def store_streamer(url: str, stop: Any) -> None:
    with MPClient(url, timeout=120) as c:
        kv = ShmKVCache(1, 513, 16, 1, 16, torch.float16)
        c.register_kv_cache(0x57EA, kv.handles(), TINY, 1, {"kv_layout": "NHD"})
        i = 0
        while not stop.is_set():
            toks = [20_000_000 + i * 8192 + j for j in range(8192)]
            c.store(make_key(toks, f"ss{i}", model_name=TINY, worker_id=0), 0x57EA, [list(range(1, 513))])
            i += 1
        c.unregister_kv_cache(0x57EA)
        kv.close()


def control_path(url: str, a: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out: dict[str, Any] = {}
    with MPClient(url, timeout=120) as c:
        kv = register_tiny(c)
        toks = [i % 4_000_000 for i in range(32768)]

        def fill() -> None:
            """(Re)stores the 32k-token prefix the hit cases look up (the streamer evicts)."""
            for s in range(0, 32768, 4096):
                key = make_key(toks, "fill", model_name=TINY, worker_id=0, start=s, end=s + 4096)
                _, ok = c.store(key, 0x71A1, [list(range(1, 257))])
                assert ok
            c.end_session("fill")

        fill()
        noop = []
        for i in range(a.n + 200):
            t = time.perf_counter()
            c.noop()
            if i >= 200:
                noop.append(time.perf_counter() - t)
        out["noop"] = {"p50_us": pct(noop, 0.5) * 1e6, "p99_us": pct(noop, 0.99) * 1e6}
        stop = ctx.Event()
        streamer = ctx.Process(target=store_streamer, args=(url, stop))
        streamer.start()
        time.sleep(1.0)
        for n_tokens in (1024, 8192, 32768):
            for hit in (True, False):
                for clients in (1, 8):
                    if hit:
                        fill()
                    q = ctx.Queue()
                    per = max(20, a.n // (10 * clients))
                    procs = [
                        ctx.Process(target=lookup_worker, args=(url, n_tokens, hit, per, q))
                        for _ in range(clients)
                    ]
                    for p in procs:
                        p.start()
                    results = [q.get() for _ in procs]
                    samples = [s for r in results for s in r[0]]
                    for p in procs:
                        p.join()
                    wall = max(r[2] for r in results)  # measured by the clients, spawn excluded
                    name = f"lookup_{n_tokens // 1024}k_{'hit' if hit else 'miss'}_{clients}c"
                    out[name] = {
                        "p50_us": pct(samples, 0.5) * 1e6,
                        "p99_us": pct(samples, 0.99) * 1e6,
                        "lookups_per_s": len(samples) / wall,
                        "full_hit_ratio": sum(r[1] for r in results) / len(samples),
                    }
        stop.set()
        streamer.join()
        c.unregister_kv_cache(0x71A1)
        kv.close()
    return out


def index_memory(n_objects: int) -> dict[str, Any]:
    """RSS growth of an L1 index holding `n_objects` (the Rust core only, in this process)."""

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    before = rss()
    idx = L1Index(n_objects * 4096 * 2)
    scope = KeyScope("m", mp_kv_rank(1, 0))
    for base in range(0, n_objects, 1024):
        hashes = [(base + i).to_bytes(8, "big") * 4 for i in range(min(1024, n_objects - base))]
        idx.reserve_write(scope, hashes, 4096, 1)
        idx.finish_write(scope, hashes, 1)
    after = rss()
    assert idx.stats()["resident_objects"] == n_objects
    return {
        "objects": n_objects,
        "rss_growth_bytes": after - before,
        "index_bytes_per_object": (after - before) / n_objects,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="measure this server instead of starting one")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens moved by one store/retrieve")
    ap.add_argument("--n", type=int, default=2000, help="latency samples per case (split over clients)")
    ap.add_argument("--objects", type=int, default=1_000_000, help="objects for the index memory figure")
    ap.add_argument("--out", default="bench-results/server.json")
    a = ap.parse_args()
    srv = None
    url = a.url
    if url is None:
        per_token = (
            2 * a.layers * a.heads * a.head_dim * torch.empty((), dtype=DTYPES[a.dtype]).element_size()
        )
        l1_gb = max(1.0, 1.5 * a.tokens * per_token / (1 << 30))
        srv = ServerProcess("--l1-size-gb", f"{l1_gb:.2f}", "--chunk-size", str(a.chunk_size))
        url = srv.url
    data: dict[str, Any] = {"shape": vars(a)}
    try:
        data["data_path"] = data_path(url, a)
        data["control_path"] = control_path(url, a)
        if srv is not None:
            with open(f"/proc/{srv.proc.pid}/status") as f:
                data["server_rss_bytes"] = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS"))
    finally:
        if srv is not None:
            srv.stop()
    with mp.get_context("spawn").Pool(1) as pool:  # a fresh process: RSS growth is the index alone
        data["index_memory"] = pool.apply(index_memory, (a.objects,))
    d = data["data_path"]
    rows = [
        ("memcpy (same bytes, this run)", f"{d['memcpy_gbps']:.2f} GB/s"),
        ("store cold", f"{d['store_cold_gbps']:.2f} GB/s ({d['store_cold_over_memcpy']:.2f}x memcpy)"),
        ("store warm", f"{d['store_warm_gbps']:.2f} GB/s ({d['store_warm_over_memcpy']:.2f}x memcpy)"),
        (
            "retrieve warm",
            f"{d['retrieve_warm_gbps']:.2f} GB/s ({d['retrieve_warm_over_memcpy']:.2f}x memcpy)",
        ),
    ]
    for k, v in data["control_path"].items():
        extra = (
            f"  {v['lookups_per_s']:8.0f}/s  hit {v['full_hit_ratio']:.2f}" if "lookups_per_s" in v else ""
        )
        rows.append((k, f"p50 {v['p50_us']:8.1f} us   p99 {v['p99_us']:8.1f} us{extra}"))
    m = data["index_memory"]
    rows.append((f"index bytes/object at {m['objects']}", f"{m['index_bytes_per_object']:.0f} B"))
    if "server_rss_bytes" in data:
        rows.append(("server RSS after the run", f"{data['server_rss_bytes'] / (1 << 20):.0f} MiB"))
    emit(f"lmcache-rs server benchmark ({a.tokens} tokens per transfer)", rows, data, a.out)


if __name__ == "__main__":
    main()
