"""L2 tier throughput: write-through and prefetch loads of a running server, next to the raw
speed of the same backend measured in the same run (file write/read of the same bytes; Redis
SET/GET of the same values).

    python benches/bench_l2.py --adapter fs --dir /mnt/nvme/tmp
    python benches/bench_l2.py --adapter redis           # starts redis-server on a free port

Llama-3.1-8B chunks by default (32 MiB each), `--chunks` per request. Prints a table and
writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

import httpx
import torch
from _common import ServerProcess, emit, free_port

from lmcache_rs.client import MPClient, ShmKVCache
from lmcache_rs.client.client import make_key


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def l2_status(http: str) -> dict[str, Any]:
    return httpx.get(http + "/status", timeout=30).json()["storage_manager"]["l2"]


def raw_fs(path: str, chunk: int, n: int) -> tuple[float, float]:
    data = os.urandom(chunk)
    t = time.perf_counter()
    for i in range(n):
        with open(os.path.join(path, f"raw{i}"), "wb") as f:
            f.write(data)
    w = time.perf_counter() - t
    buf = bytearray(chunk)
    t = time.perf_counter()
    for i in range(n):
        with open(os.path.join(path, f"raw{i}"), "rb", buffering=0) as f:
            f.readinto(buf)
    r = time.perf_counter() - t
    for i in range(n):
        os.unlink(os.path.join(path, f"raw{i}"))
    return gbps(chunk * n, w), gbps(chunk * n, r)


def raw_redis(url: str, chunk: int, n: int) -> tuple[float, float]:
    import redis  # noqa: PLC0415

    r = redis.Redis.from_url(url)
    data = os.urandom(chunk)
    t = time.perf_counter()
    for i in range(n):
        r.set(f"raw{i}", data)
    w = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(n):
        r.get(f"raw{i}")
    rd = time.perf_counter() - t
    r.delete(*[f"raw{i}" for i in range(n)])
    r.close()
    return gbps(chunk * n, w), gbps(chunk * n, rd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", choices=["fs", "redis"], default="fs")
    ap.add_argument("--dir", help="fs: directory for the L2 objects (default: a temp dir)")
    ap.add_argument("--redis-url", help="redis: an existing server (default: start one)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench-results/l2.json")
    a = ap.parse_args()
    chunk = 2 * a.layers * 256 * a.heads * a.head_dim * 2
    nbytes = chunk * a.chunks
    tmp = tempfile.mkdtemp(prefix="lmcache-l2-bench-", dir=a.dir)
    redis_proc = None
    if a.adapter == "fs":
        spec: dict[str, Any] = {"type": "fs", "base_path": os.path.join(tmp, "l2")}
    else:
        url = a.redis_url
        if url is None:
            port = free_port()
            redis_proc = subprocess.Popen(
                [
                    shutil.which("redis-server") or "redis-server",
                    "--port",
                    str(port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--bind",
                    "127.0.0.1",
                ],
                stdout=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            url = f"redis://127.0.0.1:{port}/0"
        spec = {"type": "redis", "url": url}
    # The raw baseline runs before and after the server (page-cache and memory conditions
    # drift on shared machines); the ratio uses the better of the two.
    raw = [raw_fs(tmp, chunk, a.chunks) if a.adapter == "fs" else raw_redis(spec["url"], chunk, a.chunks)]
    l1_gb = max(1.0, 2.5 * nbytes / (1 << 30))
    srv = ServerProcess("--l1-size-gb", f"{l1_gb:.2f}", "--l2-adapter", json.dumps(spec))
    blocks = a.chunks * 16
    kv = ShmKVCache(a.layers, 2 * blocks + 1, 16, a.heads, a.head_dim, torch.bfloat16)
    kv.fill_random(0)
    src, dst = list(range(1, blocks + 1)), list(range(blocks + 1, 2 * blocks + 1))
    writes, loads = [], []
    try:
        with MPClient(srv.url, timeout=600) as c:
            c.register_kv_cache(0xB2, kv.handles(), "l2-bench", 1, {"kv_layout": "NHD"})
            for r in range(a.reps):
                toks = [(r * 1_000_003 + i) % 50_000 for i in range(a.chunks * 256)]
                before = l2_status(srv.http)["adapters"][0]["total_objects"]
                t = time.perf_counter()
                _, ok = c.store(make_key(toks, f"w{r}", model_name="l2-bench", worker_id=0), 0xB2, [src])
                assert ok
                while l2_status(srv.http)["adapters"][0]["total_objects"] < before + a.chunks:
                    time.sleep(0.005)
                writes.append(time.perf_counter() - t)  # store + write-through of every chunk
                c.clear(True)
                t = time.perf_counter()
                hit = c.lookup(make_key(toks, f"l{r}", model_name="l2-bench"))
                loads.append(time.perf_counter() - t)  # lookup that loads every chunk from L2
                assert hit == a.chunks, hit
                _, ok = c.retrieve(make_key(toks, f"l{r}", model_name="l2-bench", worker_id=0), 0xB2, [dst])
                assert ok
                c.end_session(f"l{r}")
            assert all(
                torch.equal(x, y) for x, y in zip(kv.blocks_view(src), kv.blocks_view(dst), strict=True)
            )
            c.unregister_kv_cache(0xB2)
    finally:
        srv.stop()
        kv.close()
    raw.append(raw_fs(tmp, chunk, a.chunks) if a.adapter == "fs" else raw_redis(spec["url"], chunk, a.chunks))
    raw_w, raw_r = max(w for w, _ in raw), max(r for _, r in raw)
    if redis_proc is not None:
        redis_proc.terminate()
    shutil.rmtree(tmp, ignore_errors=True)
    data = {
        "adapter": a.adapter,
        "chunk_bytes": chunk,
        "bytes_per_request": nbytes,
        "write_through_gbps": gbps(nbytes, min(writes)),
        "prefetch_load_gbps": gbps(nbytes, min(loads)),
        "raw_write_gbps": raw_w,
        "raw_read_gbps": raw_r,
        "raw_before_after_gbps": raw,
    }
    data["write_over_raw"] = data["write_through_gbps"] / raw_w
    data["load_over_raw"] = data["prefetch_load_gbps"] / raw_r
    rows = [
        (
            f"raw {a.adapter} write (same bytes)",
            f"{raw_w:.2f} GB/s (before / after the server: {raw[0][0]:.2f} / {raw[1][0]:.2f})",
        ),
        (
            f"raw {a.adapter} read (same bytes)",
            f"{raw_r:.2f} GB/s (before / after the server: {raw[0][1]:.2f} / {raw[1][1]:.2f})",
        ),
        (
            "store + write-through",
            f"{data['write_through_gbps']:.2f} GB/s ({data['write_over_raw']:.2f}x raw write)",
        ),
        (
            "lookup loading from L2",
            f"{data['prefetch_load_gbps']:.2f} GB/s ({data['load_over_raw']:.2f}x raw read)",
        ),
    ]
    emit(f"lmcache-rs L2 benchmark ({a.adapter}, {a.chunks} x {chunk >> 20} MiB chunks)", rows, data, a.out)


if __name__ == "__main__":
    main()
