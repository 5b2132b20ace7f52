"""Soak: steady traffic with eviction for a bounded time; the server's resources must stay flat.

    python benches/soak.py                    # 10 minutes, 4 workers
    python benches/soak.py --seconds 3600     # longer

Starts a server with a small L1 (constant eviction), runs worker processes that store, look
up, retrieve and end sessions over overlapping prompts (some killed and replaced mid-run, so
the reaper and lock TTLs are exercised), and samples the server every few seconds: RSS, open
fds, threads, POSIX shm segments, sessions and L1 locks/staging. Prints a table and writes
JSON (`--out`); exits 1 if anything grew (RSS by more than --rss-slack-mib after warm-up, any
fd, thread or segment count, or locks left once traffic stopped).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from typing import Any

import httpx
import psutil
import torch
from _common import ServerProcess, emit

from lmcache_rs.client import MPClient, ShmKVCache
from lmcache_rs.client.client import make_key
from lmcache_rs.storage.shm_pool import POOL_PREFIX

C = 256
BPC = 16
#: Bytes of one soak chunk: 2 layers x K,V x 256 tokens x 2 heads x 32 x fp16 (4 KiB aligned).
CHUNK_BYTES = 2 * 2 * C * 2 * 32 * 2


def shm_segments() -> int:
    return sum(1 for n in os.listdir("/dev/shm") if "lmcache" in n and not n.startswith(POOL_PREFIX))


def mapped_segments(pid: int) -> int:
    """Distinct /dev/shm files the server has mapped (workers' KV caches it still holds), not
    counting its own L1 pool."""
    with open(f"/proc/{pid}/maps") as f:
        return len({line.split()[-1] for line in f if "/dev/shm/" in line and POOL_PREFIX not in line})


def worker(url: str, seed: int, stop: Any) -> None:
    rng = random.Random(seed)
    families = [[random.Random(f).randrange(50_000) for _ in range(8 * C)] for f in range(6)]
    with MPClient(url, timeout=30) as c:
        kv = ShmKVCache(2, 1 + 16 * BPC, 16, 2, 32, torch.float16)
        kv.fill_random(seed)
        iid = rng.randrange(1 << 40)
        c.register_kv_cache(iid, kv.handles(), "soak-model", 1, {"kv_layout": "NHD"})
        i = 0
        while not stop.is_set():
            i += 1
            n = rng.randint(1, 8)
            toks = families[rng.randrange(6)][: n * C]
            if rng.random() < 0.5:
                keep = rng.randrange(n) * C
                toks = toks[:keep] + [rng.randrange(50_000) for _ in range(n * C - keep)]
            rid = f"s{seed}-{i}"
            c.store(
                make_key(toks, rid, model_name="soak-model", worker_id=0), iid, [list(range(1, 1 + n * BPC))]
            )
            hit = c.lookup(make_key(toks, rid, model_name="soak-model"))
            if hit and rng.random() < 0.9:  # sometimes a request is abandoned after its lookup
                key = make_key(toks, rid, model_name="soak-model", worker_id=0, end=hit * C)
                c.retrieve(key, iid, [list(range(1 + 8 * BPC, 1 + (8 + hit) * BPC))])
            if rng.random() < 0.95:  # and sometimes never ended (session TTL cleans up)
                c.end_session(rid)
        c.unregister_kv_cache(iid)
        kv.close()


def sample(proc: psutil.Process, http: str) -> dict[str, float]:
    st = httpx.get(http + "/status", timeout=10).json()
    l1 = st["storage_manager"]["l1_manager"]
    return {
        "t": time.monotonic(),
        "rss_mib": proc.memory_info().rss / (1 << 20),
        "fds": proc.num_fds(),
        "threads": proc.num_threads(),
        "shm_segments": shm_segments(),
        "server_mapped_segments": mapped_segments(proc.pid),
        "sessions": st["active_sessions"],
        "read_locked": l1["read_locked_count"],
        "staging": l1["staging_object_count"],
        "objects": l1["total_object_count"],
        "l1_used_bytes": l1["memory_used_bytes"],
        "requests": st["request_server"]["requests_total"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--rss-slack-mib", type=float, default=48.0)
    ap.add_argument("--out", default="bench-results/soak.json")
    a = ap.parse_args()
    shm_before = shm_segments()
    srv = ServerProcess(
        "--l1-size-gb",
        str(32 / 1024),
        "--session-ttl-seconds",
        "5",
        "--worker-reap-timeout-seconds",
        "3",
        "--worker-registration-grace-seconds",
        "3",
        "--l1-read-ttl-seconds",
        "5",
    )
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    proc = psutil.Process(srv.proc.pid)
    samples: list[dict[str, float]] = []
    workers = [ctx.Process(target=worker, args=(srv.url, k, stop)) for k in range(a.workers)]
    for p in workers:
        p.start()
    start = time.monotonic()
    killed = 0
    try:
        while time.monotonic() - start < a.seconds:
            time.sleep(a.interval)
            samples.append(sample(proc, srv.http))
            # Every ~quarter of the run, SIGKILL one worker mid-traffic and start another.
            if len(samples) % max(1, int(a.seconds / a.interval / 4)) == 0:
                victim = workers.pop(0)
                os.kill(victim.pid, signal.SIGKILL)
                victim.join()
                killed += 1
                p = ctx.Process(target=worker, args=(srv.url, 100 + killed, stop))
                p.start()
                workers.append(p)
        stop.set()
        for p in workers:
            p.join(30)
        time.sleep(12)  # session TTL (5 s) + its cleanup tick (5 s), reaper (3 s) run out
        final = sample(proc, srv.http)
    finally:
        stop.set()
        srv.stop()
    warm = samples[len(samples) // 4 : len(samples) // 2] or samples[:1]
    late = samples[-max(1, len(samples) // 4) :]

    def avg(rows: list[dict[str, float]], k: str) -> float:
        return sum(r[k] for r in rows) / len(rows)

    rss_growth = avg(late, "rss_mib") - avg(warm, "rss_mib")
    problems = []
    if rss_growth > a.rss_slack_mib:
        problems.append(f"RSS grew {rss_growth:.1f} MiB after warm-up")
    # fds and threads move with the workers connected at a sample (a killed worker's connection
    # and mappings last until the reaper runs), so they are judged once traffic has stopped:
    # back within the warm-up range. Pool threads start lazily (up to --max-workers per pool),
    # so threads get that much slack; a leak grows with traffic and exceeds it.
    for k, slack in (("fds", 2), ("threads", 4)):
        if final[k] > max(r[k] for r in warm) + slack:
            problems.append(f"{k} grew: warm-up max {max(r[k] for r in warm)}, after traffic {final[k]}")
    if final["server_mapped_segments"] != 0:
        problems.append(f"the server still maps {final['server_mapped_segments']} worker segments")
    if final["l1_used_bytes"] != final["objects"] * CHUNK_BYTES:
        problems.append(
            f"L1 holds {final['l1_used_bytes']} bytes for {final['objects']} objects of {CHUNK_BYTES} (leak)"
        )
    for k in ("read_locked", "staging", "sessions"):
        if final[k] != 0:
            problems.append(f"{k} after traffic stopped: {final[k]}")
    data: dict[str, Any] = {
        "seconds": a.seconds,
        "workers": a.workers,
        "workers_killed": killed,
        "requests": final["requests"],
        "rss_growth_mib": rss_growth,
        "final": final,
        "samples": samples,
        "problems": problems,
    }
    rows = [
        ("duration / workers (killed)", f"{a.seconds:.0f} s / {a.workers} ({killed} SIGKILLed and replaced)"),
        ("requests served", f"{final['requests']:.0f}"),
        ("RSS warm -> late (MiB)", f"{avg(warm, 'rss_mib'):.1f} -> {avg(late, 'rss_mib'):.1f}"),
        (
            "fds warm max -> late max -> after traffic",
            f"{max(r['fds'] for r in warm):.0f} -> {max(r['fds'] for r in late):.0f} -> {final['fds']:.0f}",
        ),
        (
            "threads warm max -> late max -> after traffic",
            f"{max(r['threads'] for r in warm):.0f} -> {max(r['threads'] for r in late):.0f} "
            f"-> {final['threads']:.0f}",
        ),
        (
            "shm: server-mapped after / files before -> after",
            f"{final['server_mapped_segments']:.0f} / {shm_before} -> {final['shm_segments']:.0f} "
            "(files of SIGKILLed workers are their resource tracker's to unlink)",
        ),
        (
            "after traffic: sessions / read-locked / staging",
            f"{final['sessions']:.0f} / {final['read_locked']:.0f} / {final['staging']:.0f}",
        ),
        ("verdict", "flat" if not problems else "; ".join(problems)),
    ]
    emit("lmcache-rs soak", rows, data, a.out)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
