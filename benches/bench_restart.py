"""Time to serve again after a restart, with a warm L1 (storage/warm.py) and without.

Fills an L1 of `--l1-gb` GiB (90%) with 2 MiB chunk objects through a registered CPU worker,
then restarts the server three times on the same pool and state directory: SIGTERM + warm
start, SIGKILL + warm start, SIGKILL + `--cold-start`. For each: seconds from the new process'
start until it answers, until a lookup of an old prompt hits, the objects and GiB re-adopted,
the verification time, and the share of sampled old prompts that hit in full.

    python benches/bench_restart.py --l1-gb 3 --out benches/results/restart.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx
import torch
from _common import emit, free_port

from lmcache_rs.client import MPClient, ShmKVCache
from lmcache_rs.client.client import make_key, wait_for_server

MODEL = "bench-restart"
CHUNK = 256
PROMPT_CHUNKS = 8


class Server:
    def __init__(self, *flags: str) -> None:
        self.port, self.http_port = free_port(), free_port()
        self.url = f"tcp://127.0.0.1:{self.port}"
        self.http = f"http://127.0.0.1:{self.http_port}"
        self.t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "lmcache_rs", "server", "--port", str(self.port)]
        cmd += ["--http-host", "127.0.0.1", "--http-port", str(self.http_port), "--log-level", "WARNING"]
        self.proc = subprocess.Popen([*cmd, *flags])
        wait_for_server(self.url, 300, alive=lambda: self.proc.poll() is None)
        self.ready_s = time.perf_counter() - self.t0

    def status(self) -> dict[str, Any]:
        return httpx.get(self.http + "/status", timeout=60).json()

    def stop(self, sig: int) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(120)


def prompt(i: int) -> list[int]:
    return [(i * 7919 + j) % 50_000 for j in range(PROMPT_CHUNKS * CHUNK)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--l1-gb", type=float, default=3.0)
    ap.add_argument("--sample", type=int, default=32, help="old prompts looked up after each restart")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    state = tempfile.mkdtemp(prefix="bench-restart-")
    name = f"bench_restart_{os.getpid()}"
    flags = ["--l1-size-gb", str(args.l1_gb), "--state-dir", state, "--shm-name", name]
    flags += ["--eviction-trigger-watermark", "1.0", "--worker-reap-timeout-seconds", "0"]
    # 4 layers x 2 (K, V) x 256 tokens x 4 heads x 128 x fp16 = 2 MiB per chunk object.
    # Block 0 is the engine's null block (never stored): the prompt's blocks start at 1.
    kv = ShmKVCache(4, PROMPT_CHUNKS * CHUNK // 16 + 1, 16, 4, 128, torch.float16, "NHD")
    kv.fill_random(0)
    blocks = list(range(1, PROMPT_CHUNKS * CHUNK // 16 + 1))
    iid = 7
    rows: list[tuple[str, str]] = []
    data: dict[str, Any] = {"l1_gib": args.l1_gb, "chunk_object_bytes": 2 << 20, "restarts": []}
    server = Server(*flags)
    try:
        c = MPClient(server.url, timeout=120)
        c.register_kv_cache(iid, kv.handles(), MODEL, 1, {"kv_layout": "NHD"})
        n_prompts = int(args.l1_gb * (1 << 30) * 0.9) // (PROMPT_CHUNKS * (2 << 20))
        t = time.perf_counter()
        for i in range(n_prompts):
            _, ok = c.store(make_key(prompt(i), f"s{i}", model_name=MODEL, worker_id=0), iid, [blocks])
            assert ok, f"store {i} failed"
        fill_s = time.perf_counter() - t
        expect = c.lookup(make_key(prompt(0), "expect", model_name=MODEL))  # chunks a prompt hits
        c.end_session("expect")
        assert expect == PROMPT_CHUNKS, expect
        l1 = server.status()["storage_manager"]["l1_manager"]
        used = l1["memory_used_bytes"]
        rows.append(
            ("filled", f"{l1['resident_object_count']} objects, {used / (1 << 30):.2f} GiB in {fill_s:.1f} s")
        )
        data["filled"] = {"objects": l1["resident_object_count"], "bytes": used, "seconds": fill_s}
        c.close()
        for label, sig, extra in (
            ("SIGTERM, warm start", signal.SIGTERM, []),
            ("SIGKILL, warm start", signal.SIGKILL, []),
            ("SIGKILL, cold start", signal.SIGKILL, ["--cold-start"]),
        ):
            server.stop(sig)
            server = Server(*flags, *extra)
            c = MPClient(server.url, timeout=120)
            # The worker is restored from the state directory: no registration here.
            k = make_key(prompt(0), "first", model_name=MODEL)
            hit0 = c.lookup(k)
            first_hit_s = time.perf_counter() - server.t0
            c.end_session("first")
            step = max(1, n_prompts // args.sample)
            full = 0
            for j, i in enumerate(range(0, n_prompts, step)):
                full += c.lookup(make_key(prompt(i), f"q{j}", model_name=MODEL)) == expect
                c.end_session(f"q{j}")
            sampled = len(range(0, n_prompts, step))
            st = server.status()
            ws = st["storage_manager"]["l1_manager"]["warm_start"]
            c.close()
            r = {
                "restart": label,
                "ready_seconds": round(server.ready_s, 3),
                "first_lookup_seconds": round(first_hit_s, 3),
                "first_lookup_hit_chunks": hit0,
                "adopted_objects": ws["adopted_objects"],
                "adopted_bytes": ws["adopted_bytes"],
                "dropped_objects": ws["dropped_objects"],
                "verify_and_adopt_seconds": ws["seconds"],
                "sampled_prompts_full_hit": f"{full}/{sampled}",
                "workers_restored": len(st["restored_workers"]["restored"]),
            }
            data["restarts"].append(r)
            rows.append(
                (
                    label,
                    f"serving after {r['ready_seconds']:.2f} s (adopt {ws['seconds']:.2f} s), "
                    f"{ws['adopted_objects']} objects / {ws['adopted_bytes'] / (1 << 30):.2f} GiB "
                    f"re-adopted, {r['sampled_prompts_full_hit']} old prompts hit in full",
                )
            )
    finally:
        if server.proc.poll() is None:
            server.stop(signal.SIGTERM)
        kv.close()
        shutil.rmtree(state, ignore_errors=True)
        pool = f"/dev/shm/lmcache_l1_pool_{name}"
        if os.path.exists(pool):
            os.unlink(pool)
    emit(f"restart with a warm L1 ({args.l1_gb} GiB)", rows, data, args.out)


if __name__ == "__main__":
    main()
