"""8 worker processes store and retrieve overlapping prefixes under constant eviction, with
--verify-checksums: every retrieved chunk is byte-exact or reported as a miss, never wrong.
Half the workers are lmcache-driven (the server copies from their shm KV), half engine-driven
(they copy into and out of L1 slots themselves): both kinds share every chunk.

The KV of a chunk is a pure function of its chunk hash (so of its whole token prefix), so any
worker can tell what a retrieved chunk must contain. LMCACHE_RS_STRESS_SECONDS sets the
duration (default 20 s; run minutes with it)."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time
from collections import Counter
from typing import Any

import torch
from kvsim import MODEL, Worker, lookup

from lmcache_rs import chunk_hashes
from lmcache_rs.client import MPClient
from lmcache_rs.client.client import make_key
from lmcache_rs.client.engine_driven import EngineDrivenWorker
from lmcache_rs.client.shm_kv import paged_shape

C = 256
BPC = C // 16
MAX_CHUNKS = 6
SECONDS = float(os.environ.get("LMCACHE_RS_STRESS_SECONDS", "20"))


def chunk_kv(h: bytes, like: torch.Tensor) -> torch.Tensor:
    """The KV every worker writes for the chunk with hash `h`: [2, BPC, BS, H, D] per layer."""
    g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little"))
    return torch.randn((2, BPC, *like.shape[2:]), generator=g).to(like.dtype)


def blocks(first: int, chunks: int) -> list[int]:
    return list(range(first, first + chunks * BPC))


class EngineDrivenSim:
    """kvsim.Worker's interface and KV geometry, engine-driven."""

    def __init__(self, c: MPClient, seed: int, num_blocks: int) -> None:
        layers = [
            torch.zeros(paged_shape("NHD", num_blocks, 16, 2, 32), dtype=torch.float16) for _ in range(2)
        ]
        self.kv = self  # so that `w.kv.layers` reads the same for both kinds
        self.layers = layers
        self.w = EngineDrivenWorker(c, layers, 50_000 + seed, MODEL)
        self.w.register()

    def store(self, toks: list[int], src: list[int], request_id: str) -> bool:
        return self.w.store(make_key(toks, request_id, model_name=MODEL, worker_id=0), src)

    def retrieve(self, toks: list[int], dst: list[int], rid: str, end: int) -> bool:
        return self.w.retrieve(make_key(toks, rid, model_name=MODEL, worker_id=0, end=end), dst)

    def close(self) -> None:
        self.w.unregister()


def stress_worker(url: str, seed: int, seconds: float, families: list[list[int]], q: Any) -> None:
    rng = random.Random(seed)
    stats: Counter[str] = Counter()
    with MPClient(url, timeout=30) as c:
        num_blocks = 1 + 2 * MAX_CHUNKS * BPC + 1
        w = Worker(c, num_blocks=num_blocks) if seed % 2 else EngineDrivenSim(c, seed, num_blocks)
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            i += 1
            n = rng.randint(1, MAX_CHUNKS)
            toks = families[rng.randrange(len(families))][: n * C]
            if rng.random() < 0.4:  # a private continuation of a shared prefix
                keep = rng.randrange(n) * C
                toks = toks[:keep] + [rng.randrange(50_000) for _ in range(n * C - keep)]
            hashes = chunk_hashes(toks)
            src = blocks(1, n)
            for j, h in enumerate(hashes):
                ids = torch.tensor(src[j * BPC : (j + 1) * BPC])
                for layer in w.kv.layers:
                    layer[:, ids] = chunk_kv(h, layer)
            rid = f"w{seed}-{i}"
            stats["stored_ok" if w.store(toks, src, request_id=rid) else "store_not_ok"] += 1
            hit = lookup(c, toks, rid)
            stats["hit_chunks"] += hit
            if hit:
                dst = blocks(1 + MAX_CHUNKS * BPC, hit)
                if w.retrieve(toks, dst, rid, end=hit * C):
                    for j in range(hit):
                        ids = torch.tensor(dst[j * BPC : (j + 1) * BPC])
                        same = all(
                            torch.equal(layer[:, ids], chunk_kv(hashes[j], layer)) for layer in w.kv.layers
                        )
                        stats["exact_chunks" if same else "WRONG_chunks"] += 1
                else:
                    stats["retrieve_miss"] += 1
            c.end_session(rid)
        stats["requests"] = i
        stats["engine_driven_requests" if isinstance(w, EngineDrivenSim) else "lmcache_driven_requests"] = i
        w.close()
    q.put(dict(stats))


def test_concurrent_workers_never_get_wrong_kv(server_factory) -> None:
    # 16 MiB of L1 holds 128 chunks of 128 KiB: 8 workers writing up to 6 chunks each, half of
    # them private, keep it evicting.
    s = server_factory("--l1-size-gb", str(16 / 1024), "--verify-checksums")
    rng = random.Random(7)
    families = [[rng.randrange(50_000) for _ in range(MAX_CHUNKS * C)] for _ in range(4)]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=stress_worker, args=(s.url, k, SECONDS, families, q)) for k in range(8)]
    for p in procs:
        p.start()
    results = [q.get(timeout=SECONDS + 120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    total: Counter[str] = Counter()
    for r in results:
        total.update(r)
    print(dict(total))
    assert total["WRONG_chunks"] == 0, total
    assert total["exact_chunks"] > 100, total
    assert total["engine_driven_requests"] > 0, total
    assert total["lmcache_driven_requests"] > 0, total
    with MPClient(s.url) as c:
        assert c.noop() == "OK"
    import httpx  # noqa: PLC0415

    text = httpx.get(s.http + "/metrics").text
    evicted = [line for line in text.splitlines() if line.startswith("lmcache_mp_l1_evicted_chunks_total")]
    assert evicted
    assert float(evicted[0].split()[-1]) > 0, "the run must have evicted"
    assert "lmcache_rs_l1_checksum_mismatch_chunks_total" not in text or all(
        float(line.split()[-1]) == 0
        for line in text.splitlines()
        if line.startswith("lmcache_rs_l1_checksum_mismatch_chunks_total")
    )
