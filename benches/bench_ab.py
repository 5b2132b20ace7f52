"""Two builds of the server measured in one run, interleaved request by request.

    python benches/bench_ab.py --a /path/to/old/venv/bin/python --b "$(which python)"

Each interpreter must import its own `lmcache_rs` (e.g. a git worktree of main with its own
venv, built by `./dev.sh setup` with LMCACHE_RS_VENV set). Both servers run at once; every
sample alternates A, B, A, B... so the machine's drift (this VM's copy bandwidth moves by tens
of percent within minutes) hits both alike. Measured, one client, no other load:
lookups that hit (1k, 8k, 32k tokens, a prompt seen before) and miss, each followed by its
end_session; an lmcache-driven store of 8 chunks (cleared between samples) and a retrieve of
the same 8 chunks, for a small model (2 layers, 8 heads x 128, fp16: 2 MiB per chunk). Prints a
table of p50 per build and the B/A ratio, and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import time
from typing import Any

import torch
from _common import emit, free_port, pct

from lmcache_rs.client import MPClient, ShmKVCache
from lmcache_rs.client.client import make_key, wait_for_server

MODEL = "bench-ab"
INSTANCE = 0xAB
CHUNK = 256
BLOCK = 16
STORE_CHUNKS = 8


class Server:
    """`python -m lmcache_rs server` of one build on free ports."""

    def __init__(self, python: str, flags: list[str]) -> None:
        self.port = free_port()
        self.url = f"tcp://127.0.0.1:{self.port}"
        cmd = [python, "-m", "lmcache_rs", "server", "--port", str(self.port), "--no-http"]
        cmd += ["--log-level", "WARNING", *flags]
        env = {**os.environ, "PYTHONPATH": ""}
        self.proc = subprocess.Popen(cmd, env=env, cwd="/")
        wait_for_server(self.url, 120, alive=lambda: self.proc.poll() is None)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Side:
    """One build: its server, a client and a registered worker KV cache in shared memory."""

    def __init__(self, name: str, python: str, flags: list[str]) -> None:
        self.name = name
        self.server = Server(python, flags)
        self.c = MPClient(self.server.url, timeout=60)
        blocks = STORE_CHUNKS * CHUNK // BLOCK
        self.kv = ShmKVCache(2, 2 * blocks + 1, BLOCK, 8, 128, torch.float16)
        self.c.register_kv_cache(INSTANCE, self.kv.handles(), MODEL, 1, {"kv_layout": "NHD"})
        self.src = list(range(1, blocks + 1))
        self.dst = list(range(blocks + 1, 2 * blocks + 1))
        self.n = 0

    def rid(self) -> str:
        self.n += 1
        return f"{self.name}-{self.n}"

    def lookup(self, toks: list[int]) -> float:
        rid = self.rid()
        t = time.perf_counter()
        self.c.lookup(make_key(toks, rid, model_name=MODEL))
        dt = time.perf_counter() - t
        self.c.end_session(rid)
        return dt

    def store(self, toks: list[int], clear: bool = True) -> float:
        if clear:
            self.c.clear(True)
        rid = self.rid()
        t = time.perf_counter()
        _, ok = self.c.store(make_key(toks, rid, model_name=MODEL, worker_id=0), INSTANCE, [self.src])
        dt = time.perf_counter() - t
        assert ok, f"{self.name}: store failed"
        self.c.end_session(rid)
        return dt

    def retrieve(self, toks: list[int]) -> float:
        rid = self.rid()
        key = make_key(toks, rid, model_name=MODEL, worker_id=0)
        t = time.perf_counter()
        _, ok = self.c.retrieve(key, INSTANCE, [self.dst])
        dt = time.perf_counter() - t
        assert ok, f"{self.name}: retrieve failed"
        self.c.end_session(rid)
        return dt

    def close(self) -> None:
        self.c.unregister_kv_cache(INSTANCE)
        self.c.close()
        self.kv.close()
        self.server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="python of build A (the baseline)")
    ap.add_argument("--b", required=True, help="python of build B")
    ap.add_argument("--n", type=int, default=400, help="samples per case and build")
    ap.add_argument("--server-args", default="--l1-size-gb 1", help="flags for both servers")
    ap.add_argument("--out", default="bench-results/ab.json")
    a = ap.parse_args()
    flags = shlex.split(a.server_args)
    sides = [Side("A", a.a, flags), Side("B", a.b, flags)]
    try:
        prompts = {n: [i % 4_000_000 for i in range(n)] for n in (1024, 8192, 32768)}
        stored = [7_000_000 + i for i in range(STORE_CHUNKS * CHUNK)]
        for s in sides:  # the hit cases' prefixes, stored once by the tiny path
            for toks in prompts.values():
                for start in range(0, len(toks), STORE_CHUNKS * CHUNK):
                    end = min(start + STORE_CHUNKS * CHUNK, len(toks))
                    key = make_key(toks, "fill", model_name=MODEL, worker_id=0, start=start, end=end)
                    _, ok = s.c.store(key, INSTANCE, [s.src[: (end - start) // BLOCK]])
                    assert ok
                s.c.end_session("fill")
        cases: dict[str, Any] = {}
        for n, toks in prompts.items():
            cases[f"lookup {n // 1024}k hit"] = lambda s, t=toks: s.lookup(t)
        cases["lookup 8k miss"] = lambda s: s.lookup([9_000_000 + i for i in range(8192)])
        cases[f"store {STORE_CHUNKS} chunks (after a forced clear)"] = lambda s: s.store(stored)
        cases[f"retrieve {STORE_CHUNKS} chunks"] = lambda s: s.retrieve(stored)
        samples: dict[str, dict[str, list[float]]] = {k: {"A": [], "B": []} for k in cases}
        for name, run in cases.items():
            if name.startswith("retrieve"):
                for s in sides:
                    s.store(stored)
            for i in range(a.n + 20):
                for s in sides if i % 2 == 0 else reversed(sides):
                    dt = run(s)
                    if i >= 20:
                        samples[name][s.name].append(dt)
    finally:
        for s in sides:
            s.close()
    rows = []
    data: dict[str, Any] = {"a": a.a, "b": a.b, "n": a.n, "cases": {}}
    for name, by in samples.items():
        pa, pb = pct(by["A"], 0.5), pct(by["B"], 0.5)
        qa, qb = pct(by["A"], 0.99), pct(by["B"], 0.99)
        rows.append(
            (
                name,
                f"p50 A {pa * 1e6:8.1f} us  B {pb * 1e6:8.1f} us  B/A {pb / pa:5.2f}  p99 B/A {qb / qa:5.2f}",
            )
        )
        data["cases"][name] = {
            "a_p50_us": pa * 1e6,
            "b_p50_us": pb * 1e6,
            "a_p99_us": qa * 1e6,
            "b_p99_us": qb * 1e6,
        }
    emit("A/B, interleaved (B/A < 1: B faster)", rows, data, a.out)


if __name__ == "__main__":
    main()
