"""The control plane of two builds in one run (issue #15's targets): A = a baseline checkout, B = this one.

    python benches/bench_control.py --a-root /work/wt-benchA \\
        --a-python ~/.cache/lmcache-rs/venv-benchA/bin/python          # B: this checkout, this python
    python benches/bench_control.py ... --quick                        # ~2-minute smoke run
    python benches/bench_control.py ... --gil-hog --sections time,tail # a Python thread spins in each server

Each server runs `lmcache_rs` from its root (PYTHONPATH=root, cwd=root) with that build's python;
both run at once on free ports. Clients come from this checkout (the wire protocol is the same).
Sections (`--sections`, default all):

* time:    server time of a 32k-token lookup, from each server's /metrics
           (`lmcache_rs_request_seconds{op="lookup"}` sum/count deltas): a prompt seen before (hit,
           hash memo warm) and a new prompt per lookup (miss, never seen); batches alternate A/B.
           Next to it the criterion figure `hash/msgpack_32k_tokens_parse_and_hash`, read from
           <b-root>/target/criterion (`--criterion` runs `cargo bench` there first).
* tail:    32k-token hit lookups from one client, p50/p99 idle, then while a second client process
           (its own registered shm worker, Llama-3.1-8B shape) streams `--stream-mib` stores and
           retrieves through the same server; the streamer's own store/retrieve p50/p99. One build
           at a time: the other build's server is paused (SIGSTOP) meanwhile.
* clients: 32k-token hit lookups/s from 8 client processes (persistent, started once), A and B
           back to back in alternating order (A B, B A, ...), `--rounds` rounds; also each
           server's CPU time per lookup (lookup + query + end_session, from /proc), the CPU the
           other build's idle server used meanwhile, and how busy the machine was.
* noop:    `noop` round trip p50/p99 of A, B and a bare pyzmq ROUTER echo server (a subprocess),
           interleaved sample by sample.
* data:    lmcache-driven store (after a forced clear) and retrieve of `--data-mib`, each paired
           with a memcpy of the same bytes timed right before it; interleaved A/B. Ratio = transfer
           GB/s over memcpy GB/s (median and best pair). Runs last: its clears drop the prefixes.

A client lookup here is what vLLM's scheduler does: lookup + query_prefetch_status (two round
trips), then end_session (not timed). `--gil-hog` starts each server through a `python -c`
wrapper that first starts a thread spinning in pure Python, then runs `lmcache_rs.cli` main.
Prints a table and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import queue
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import torch
from _common import emit, free_port, pct
from bench_server import TINY, Memcpy, register_tiny, server_timing, wait_prefault

from lmcache_rs.client import MPClient, ShmKVCache
from lmcache_rs.client.client import make_key, wait_for_server
from lmcache_rs.protocol.messages import IPCCacheServerKey

CHUNK = 256
LOOKUP_TOKENS = 32768
TINY_ID = 0x71A1
STREAM_ID = 0x57EA
DATA_ID = 0xDA7A
DATA_MODEL = "bench-ctl-data"
STREAM_MODEL = "bench-ctl-stream"
#: The streamer's KV shape: Llama-3.1-8B (32 layers, 8 KV heads x 128, bf16): 128 KiB per token.
STREAM_SHAPE = (32, 8, 128)
#: The data section's shape: 2 layers, 8 KV heads x 128, fp16: 8 KiB per token, 2 MiB per chunk.
DATA_SHAPE = (2, 8, 128)
CRITERION_BENCH = "msgpack_32k_tokens_parse_and_hash"

HOG = """\
import sys, threading

def _spin() -> None:
    x = 0
    while True:
        x += 1

threading.Thread(target=_spin, name="gil-hog", daemon=True).start()
from lmcache_rs.cli import main

sys.exit(main(sys.argv[1:]))
"""

ECHO = """\
import sys, zmq

s = zmq.Context().socket(zmq.ROUTER)
s.bind(sys.argv[1])
while True:
    s.send_multipart(s.recv_multipart())
"""

PROBE = """\
import json, lmcache_rs, lmcache_rs._core as c
native = hasattr(c, "NativeServer")
print(json.dumps({"package": lmcache_rs.__file__, "core": c.__file__, "native_server": native}))
"""


def tokens(seed: int, n: int = LOOKUP_TOKENS) -> list[int]:
    """`n` token ids below 128,000 (a Llama-3 vocabulary, as the criterion bench uses)."""
    rng = random.Random(seed)
    return [rng.randrange(128_000) for _ in range(n)]


HIT = tokens(1)


def with_rid(key: IPCCacheServerKey, rid: str) -> IPCCacheServerKey:
    return msgspec.structs.replace(key, request_id=rid)


def timed_lookup(c: MPClient, base: IPCCacheServerKey, rid: str) -> tuple[float, int]:
    """(seconds, chunks hit) of lookup + query_prefetch_status; end_session after, untimed."""
    key = with_rid(base, rid)
    t = time.perf_counter()
    got = c.lookup(key)
    dt = time.perf_counter() - t
    c.end_session(rid)
    return dt, got


class Build:
    def __init__(self, name: str, root: str, python: str) -> None:
        self.name = name
        self.root = Path(root).resolve()
        self.python = python
        self.env = {**os.environ, "PYTHONPATH": str(self.root)}

    def probe(self) -> dict[str, Any]:
        """Which lmcache_rs and extension this build's python imports from its root."""
        out = subprocess.run(
            [self.python, "-c", PROBE],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            check=True,
        )
        info: dict[str, Any] = json.loads(out.stdout)
        for k in ("package", "core"):
            if not Path(info[k]).resolve().is_relative_to(self.root):
                raise SystemExit(f"build {self.name}: {k} {info[k]} is not under {self.root}")
        info["commit"] = subprocess.run(
            ["git", "-C", str(self.root), "rev-parse", "--short", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return info


class Server:
    """One build's server on free ports (ZMQ + HTTP for /metrics), L1 prefaulted."""

    def __init__(self, build: Build, flags: list[str], gil_hog: bool) -> None:
        self.build = build
        self.port, self.http_port = free_port(), free_port()
        self.url = f"tcp://127.0.0.1:{self.port}"
        self.http = f"http://127.0.0.1:{self.http_port}"
        args = ["server", "--port", str(self.port), "--http-host", "127.0.0.1"]
        args += ["--http-port", str(self.http_port), "--log-level", "WARNING", *flags]
        cmd = [build.python, "-c", HOG, *args] if gil_hog else [build.python, "-m", "lmcache_rs", *args]
        self.proc = subprocess.Popen(cmd, env=build.env, cwd=build.root)
        self.paused = False

    def ready(self) -> None:
        wait_for_server(self.url, 180, alive=lambda: self.proc.poll() is None)
        wait_prefault(self.http)

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.paused = False

    def stop(self) -> None:
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Side:
    """A build's server, a client, and the tiny worker that stores the lookup prefix."""

    def __init__(self, build: Build, flags: list[str], gil_hog: bool) -> None:
        self.name = build.name
        self.server = Server(build, flags, gil_hog)
        self.server.ready()
        self.c = MPClient(self.server.url, timeout=120)
        self.tiny = register_tiny(self.c)
        self.base = make_key(HIT, "base", model_name=TINY)
        self.n = 0

    def rid(self) -> str:
        self.n += 1
        return f"{self.name}-{self.n}"

    def fill(self) -> None:
        """(Re)stores the 32k-token prefix the hit lookups find (4096 tokens per store)."""
        for s in range(0, LOOKUP_TOKENS, 4096):
            key = make_key(HIT, "fill", model_name=TINY, worker_id=0, start=s, end=s + 4096)
            _, ok = self.c.store(key, TINY_ID, [list(range(1, 257))])
            assert ok, f"{self.name}: fill store failed"
        self.c.end_session("fill")
        _, got = timed_lookup(self.c, self.base, self.rid())
        assert got == LOOKUP_TOKENS // CHUNK, f"{self.name}: prefix hit {got} chunks after the fill"

    def close(self) -> None:
        try:
            self.server.resume()
            self.c.unregister_kv_cache(TINY_ID)
            self.c.close()
        finally:
            self.tiny.close()
            self.server.stop()


# ---- time: server-side lookup time ------------------------------------------------------------


def lookup_server_us(side: Side, keys: list[IPCCacheServerKey]) -> tuple[int, float, float]:
    """Runs the lookups; (requests, handler s, queue s) of op=lookup from /metrics deltas."""
    before = server_timing(side.server.http).get("lookup", (0, 0.0, 0.0))
    for k in keys:
        rid = side.rid()
        side.c.lookup(with_rid(k, rid))
        side.c.end_session(rid)
    after = server_timing(side.server.http)["lookup"]
    return int(after[0] - before[0]), after[1] - before[1], after[2] - before[2]


def criterion_us(b_root: Path, run: bool) -> float | None:
    if run:
        subprocess.run(
            ["cargo", "bench", "--bench", "core", "--", CRITERION_BENCH], cwd=b_root, check=True, timeout=1800
        )
    est = b_root / "target/criterion/hash" / CRITERION_BENCH / "new/estimates.json"
    if not est.exists():
        return None
    return float(json.loads(est.read_text())["mean"]["point_estimate"]) / 1e3


def section_time(sides: list[Side], a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in sides:
        s.fill()
        lookup_server_us(s, [s.base] * 20)  # warm: the prompt is now "seen before"
    per = max(1, a.n // a.rounds)
    acc = {(s.name, case): [0, 0.0, 0.0] for s in sides for case in ("hit", "miss")}
    seed = 1000
    for r in range(a.rounds):
        for s in sides if r % 2 == 0 else reversed(sides):
            for case in ("hit", "miss"):
                if case == "hit":
                    keys = [s.base] * per
                else:  # a new prompt each time: no chunk resident, no memo entry
                    keys = [make_key(tokens(seed + i), "m", model_name=TINY) for i in range(per)]
                    seed += per
                n, busy, wait = lookup_server_us(s, keys)
                row = acc[(s.name, case)]
                row[0] += n
                row[1] += busy
                row[2] += wait
    for (name, case), (n, busy, wait) in acc.items():
        out.setdefault(name, {})[case] = {
            "requests": n,
            "handler_mean_us": busy / n * 1e6,
            "queue_mean_us": wait / n * 1e6,
            "server_mean_us": (busy + wait) / n * 1e6,
        }
    return out


# ---- tail: lookups beside a streaming client ----------------------------------------------------


def stream_tokens(mib: int) -> int:
    per_token = 2 * STREAM_SHAPE[0] * STREAM_SHAPE[1] * STREAM_SHAPE[2] * 2
    return max(CHUNK, (mib << 20) // per_token // CHUNK * CHUNK)


def streamer(url: str, mib: int, ready: Any, rounds: Any, stop: Any, q: Any) -> None:
    """Stores `mib` of new tokens, retrieves them, repeats until `stop`; puts its latencies.
    `rounds`: a shared counter of measured rounds."""
    n_tok = stream_tokens(mib)
    blocks = n_tok // 16
    layers, heads, dim = STREAM_SHAPE
    kv = ShmKVCache(layers, 2 * blocks + 1, 16, heads, dim, torch.bfloat16)
    kv.fill_random(0)
    src, dst = [list(range(1, blocks + 1))], [list(range(blocks + 1, 2 * blocks + 1))]
    stores: list[float] = []
    retrieves: list[float] = []
    with MPClient(url, timeout=300) as c:
        c.register_kv_cache(STREAM_ID, kv.handles(), STREAM_MODEL, 1, {"kv_layout": "NHD"})
        i = 0
        while not stop.is_set():
            toks = [50_000_000 + (os.getpid() % 1000) * 1_000_000 + i * n_tok + j for j in range(n_tok)]
            rid = f"st{i}"
            key = make_key(toks, rid, model_name=STREAM_MODEL, worker_id=0)
            t = time.perf_counter()
            _, ok = c.store(key, STREAM_ID, src)
            ts = time.perf_counter() - t
            assert ok, "streamer: store failed"
            c.end_session(rid)
            rid = f"rt{i}"
            key = make_key(toks, rid, model_name=STREAM_MODEL, worker_id=0)
            t = time.perf_counter()
            _, ok = c.retrieve(key, STREAM_ID, dst)
            tr = time.perf_counter() - t
            assert ok, "streamer: retrieve failed"
            c.end_session(rid)
            if i >= 1:  # the first round touches the destination pages
                stores.append(ts)
                retrieves.append(tr)
                rounds.value += 1
                ready.set()
            i += 1
        c.unregister_kv_cache(STREAM_ID)
    kv.close()
    q.put({"bytes": n_tok * 2 * layers * heads * dim * 2, "store": stores, "retrieve": retrieves})


def lookups_for(
    side: Side, seconds: float, rounds: Any = None, min_rounds: int = 0
) -> tuple[list[float], float]:
    """Hit lookups back to back for `seconds`, and on until the shared counter `rounds` grew by
    `min_rounds` (at most 20 times as long): (latencies, full-hit ratio)."""
    samples: list[float] = []
    hits = 0
    start = time.monotonic()
    first = rounds.value if rounds is not None else 0
    while (now := time.monotonic()) < start + seconds or (
        rounds is not None and rounds.value - first < min_rounds and now < start + 20 * seconds
    ):
        dt, got = timed_lookup(side.c, side.base, side.rid())
        samples.append(dt)
        hits += got == LOOKUP_TOKENS // CHUNK
    return samples, hits / len(samples)


def lat(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "p50_us": pct(samples, 0.5) * 1e6, "p99_us": pct(samples, 0.99) * 1e6}


def section_tail(sides: list[Side], a: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"stream_mib": a.stream_mib, "seconds_per_phase": a.seconds}
    out["min_stream_rounds"] = a.stream_rounds
    for s in sides:
        others = [o for o in sides if o is not s]
        for o in others:
            o.server.pause()
        try:
            s.fill()
            lookups_for(s, 0.5)
            idle, idle_hits = lookups_for(s, a.seconds)
            ready, rounds, stop, q = ctx.Event(), ctx.Value("i", 0), ctx.Event(), ctx.Queue()
            p = ctx.Process(target=streamer, args=(s.server.url, a.stream_mib, ready, rounds, stop, q))
            p.start()
            try:
                if not ready.wait(300):
                    raise RuntimeError(f"{s.name}: the streamer did not finish a round in 300 s")
                loaded, loaded_hits = lookups_for(s, a.seconds, rounds, a.stream_rounds)
            finally:
                stop.set()
                st = None
                while st is None and (p.is_alive() or not q.empty()):
                    with contextlib.suppress(queue.Empty):
                        st = q.get(timeout=1.0)
                p.join(60)
                if st is None:
                    raise RuntimeError(f"{s.name}: the streamer exited with {p.exitcode} and no results")
        finally:
            for o in others:
                o.server.resume()
        li, ll = lat(idle), lat(loaded)
        out[s.name] = {
            "idle": {**li, "full_hit_ratio": idle_hits},
            "loaded": {**ll, "full_hit_ratio": loaded_hits},
            "p50_ratio": ll["p50_us"] / li["p50_us"],
            "p99_ratio": ll["p99_us"] / li["p99_us"],
            "streamer": {
                "bytes_per_store": st["bytes"],
                "store": lat(st["store"]),
                "retrieve": lat(st["retrieve"]),
                "store_p99_over_p50": pct(st["store"], 0.99) / pct(st["store"], 0.5),
            },
        }
    return out


# ---- clients: 8 client processes ----------------------------------------------------------------


def client_worker(cmds: Any, results: Any) -> None:
    """A persistent client process: per command (url, start_at, seconds), hit lookups back to
    back from `start_at` (wall clock) for `seconds`; puts (lookups, seconds, full hits)."""
    clients: dict[str, MPClient] = {}
    base = make_key(HIT, "base", model_name=TINY)
    i = 0
    results.put("ready")
    while (cmd := cmds.get()) is not None:
        url, start_at, seconds = cmd
        c = clients.get(url) or clients.setdefault(url, MPClient(url, timeout=120))
        for _ in range(3):
            i += 1
            timed_lookup(c, base, f"w{os.getpid()}-{i}")
        while time.time() < start_at:
            time.sleep(0.001)
        n = hits = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            i += 1
            _, got = timed_lookup(c, base, f"w{os.getpid()}-{i}")
            n += 1
            hits += got == LOOKUP_TOKENS // CHUNK
            if time.perf_counter() >= end:
                break
        results.put((n, time.perf_counter() - t0, hits))
    for c in clients.values():
        c.close()


def section_clients(sides: list[Side], a: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    k = a.clients
    cmds = [ctx.Queue() for _ in range(k)]
    results = ctx.Queue()
    procs = [ctx.Process(target=client_worker, args=(q, results)) for q in cmds]
    for p in procs:
        p.start()
    per: dict[str, list[float]] = {s.name: [] for s in sides}
    hits: dict[str, list[float]] = {s.name: [] for s in sides}
    # CPU seconds each server used while `name`'s clients ran, and the machine's busy share.
    used = {(s.name, x.name): 0.0 for s in sides for x in sides}
    machine: dict[str, list[float]] = {s.name: [] for s in sides}
    lookups = {s.name: 0 for s in sides}
    try:
        for s in sides:
            s.fill()
        for _ in procs:  # spawned and imported
            assert results.get(timeout=600) == "ready"
        for r in range(a.rounds):
            for s in sides if r % 2 == 0 else reversed(sides):
                start_at = time.time() + 1.0  # connect and warm up first
                for q in cmds:
                    q.put((s.server.url, start_at, a.seconds))
                cpu0 = {x.name: proc_cpu_s(x.server.proc.pid) for x in sides}
                busy0 = machine_busy()
                res = [results.get(timeout=600) for _ in range(k)]
                busy1 = machine_busy()
                for x in sides:
                    used[(s.name, x.name)] += proc_cpu_s(x.server.proc.pid) - cpu0[x.name]
                machine[s.name].append((busy1[0] - busy0[0]) / max(1e-9, busy1[1] - busy0[1]))
                lookups[s.name] += sum(n for n, _, _ in res)
                per[s.name].append(sum(n / t for n, t, _ in res))
                hits[s.name].append(sum(h for _, _, h in res) / sum(n for n, _, _ in res))
    finally:
        for q in cmds:
            q.put(None)
        for p in procs:
            p.join(60)
    out: dict[str, Any] = {"clients": k, "rounds": a.rounds, "seconds_per_round": a.seconds}
    for s in sides:
        v = sorted(per[s.name])
        out[s.name] = {"lookups_per_s_rounds": per[s.name], "lookups_per_s_median": v[len(v) // 2]}
        out[s.name]["full_hit_ratio"] = min(hits[s.name])
        # Server CPU per lookup (lookup + query_prefetch_status + end_session, all its threads)
        # and what the other build's idle server burned meanwhile: where the 2 cores went.
        out[s.name]["server_cpu_us_per_lookup"] = used[(s.name, s.name)] / max(1, lookups[s.name]) * 1e6
        out[s.name]["other_server_cpu_s"] = sum(
            v for (run, x), v in used.items() if run == s.name and x != s.name
        )
        out[s.name]["machine_busy_share"] = sorted(machine[s.name])[len(machine[s.name]) // 2]
    return out


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot (/proc/stat)."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = v[3] + v[4]
    return float(sum(v) - idle), float(sum(v))


# ---- noop: next to a bare pyzmq echo ------------------------------------------------------------


def section_noop(sides: list[Side], a: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    echo = subprocess.Popen([sys.executable, "-c", ECHO, url])
    clients = {s.name: s.c for s in sides}
    try:
        clients["pyzmq echo"] = MPClient(url, timeout=30)
        samples: dict[str, list[float]] = {k: [] for k in clients}
        names = list(clients)
        for i in range(a.n_noop + 200):
            for name in names if i % 2 == 0 else reversed(names):
                c = clients[name]
                t = time.perf_counter()
                c.noop()
                dt = time.perf_counter() - t
                if i >= 200:
                    samples[name].append(dt)
        clients["pyzmq echo"].close()
    finally:
        echo.terminate()
        echo.wait(10)
    out: dict[str, Any] = {k: lat(v) for k, v in samples.items()}
    for s in sides:
        out[s.name]["p50_over_echo"] = out[s.name]["p50_us"] / out["pyzmq echo"]["p50_us"]
    return out


# ---- data: store/retrieve next to memcpy --------------------------------------------------------


def section_data(sides: list[Side], a: argparse.Namespace) -> dict[str, Any]:
    layers, heads, dim = DATA_SHAPE
    n_tok = max(CHUNK, (a.data_mib << 20) // (2 * layers * heads * dim * 2) // CHUNK * CHUNK)
    blocks = n_tok // 16
    nbytes = n_tok * 2 * layers * heads * dim * 2
    src, dst = [list(range(1, blocks + 1))], [list(range(blocks + 1, 2 * blocks + 1))]
    toks = [9_000_000 + i for i in range(n_tok)]
    memcpy = Memcpy(nbytes)
    kvs = {}
    pairs: dict[str, dict[str, list[tuple[float, float]]]] = {}
    try:
        for s in sides:
            kv = kvs[s.name] = ShmKVCache(layers, 2 * blocks + 1, 16, heads, dim, torch.float16)
            kv.fill_random(0)
            s.c.register_kv_cache(DATA_ID, kv.handles(), DATA_MODEL, 1, {"kv_layout": "NHD"})
            pairs[s.name] = {"store": [], "retrieve": []}
        for i in range(a.n_data + 2):
            for s in sides if i % 2 == 0 else reversed(sides):
                s.c.clear(True)
                rid = s.rid()
                key = make_key(toks, rid, model_name=DATA_MODEL, worker_id=0)
                m = memcpy.sample()
                t = time.perf_counter()
                _, ok = s.c.store(key, DATA_ID, src)
                ts = time.perf_counter() - t
                assert ok, f"{s.name}: store failed"
                s.c.end_session(rid)
                rid = s.rid()
                key = make_key(toks, rid, model_name=DATA_MODEL, worker_id=0)
                m2 = memcpy.sample()
                t = time.perf_counter()
                _, ok = s.c.retrieve(key, DATA_ID, dst)
                tr = time.perf_counter() - t
                assert ok, f"{s.name}: retrieve failed"
                s.c.end_session(rid)
                if i >= 2:  # the first rounds touch pages
                    pairs[s.name]["store"].append((m, ts))
                    pairs[s.name]["retrieve"].append((m2, tr))
        for s in sides:
            kv = kvs[s.name]
            same = all(
                torch.equal(x, y) for x, y in zip(kv.blocks_view(src[0]), kv.blocks_view(dst[0]), strict=True)
            )
            assert same, f"{s.name}: retrieved bytes differ"
            s.c.unregister_kv_cache(DATA_ID)
            s.c.clear(True)
    finally:
        for kv in kvs.values():
            kv.close()
    out: dict[str, Any] = {"bytes": nbytes, "samples": a.n_data, "memcpy_gbps_best": memcpy.gbps()}
    for name, by in pairs.items():
        out[name] = {}
        for op, ps in by.items():
            ratios = sorted(m / t for m, t in ps)
            out[name][op] = {
                "gbps_best": nbytes / min(t for _, t in ps) / 1e9,
                "over_memcpy_median": ratios[len(ratios) // 2],
                "over_memcpy_best": ratios[-1],
            }
    return out


# ---- main ----------------------------------------------------------------------------------------

SECTIONS = ("time", "tail", "clients", "noop", "data")


def pq(v: dict[str, float], unit: str = "us") -> str:
    div = 1e3 if unit == "ms" else 1.0
    return f"p50 {v['p50_us'] / div:7.1f} {unit}  p99 {v['p99_us'] / div:7.1f} {unit}"


def rows_of(data: dict[str, Any], names: list[str]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for n in names:
        b = data["builds"][n]
        rows.append((f"build {n}", f"{b['commit']} {b['root']} (native control plane: {b['native_server']})"))
    if "time" in data:
        t = data["time"]
        crit = data.get("criterion_parse_and_hash_us")
        crit_s = f"{crit:.1f} us" if crit is not None else "n/a (no target/criterion; --criterion runs it)"
        rows.append(("criterion hash/" + CRITERION_BENCH, crit_s))
        for case, what in (("hit", "32k lookup hit, seen before"), ("miss", "32k lookup miss, new prompt")):
            cells = []
            for n in names:
                v = t[n][case]
                cell = f"{n} {v['server_mean_us']:7.1f} us"
                if v["queue_mean_us"] > 0.05:
                    cell += f" (queued {v['queue_mean_us']:.1f})"
                cells.append(cell)
            if crit is not None and case == "miss":
                cells.append(f"B/criterion {t['B']['miss']['server_mean_us'] / crit:.2f}")
            rows.append((f"server time, {what} (mean)", "  ".join(cells)))
    if "tail" in data:
        t = data["tail"]
        for n in names:
            v = t[n]
            idle, loaded, st = v["idle"], v["loaded"], v["streamer"]
            rows.append((f"{n} 32k hit lookup, idle", f"{pq(idle)}  (n {idle['n']})"))
            rows.append(
                (
                    f"{n}   while streaming {t['stream_mib']} MiB",
                    f"{pq(loaded)}  ratio p50 {v['p50_ratio']:.2f} p99 {v['p99_ratio']:.2f}  "
                    f"hit {loaded['full_hit_ratio']:.2f}",
                )
            )
            rows.append(
                (
                    f"{n}   streamer store",
                    f"{pq(st['store'], 'ms')}  p99/p50 {st['store_p99_over_p50']:.2f}",
                )
            )
            rows.append((f"{n}   streamer retrieve", pq(st["retrieve"], "ms")))
    if "clients" in data:
        c = data["clients"]
        cells = [f"{n} {c[n]['lookups_per_s_median']:7.0f}/s" for n in names]
        if len(names) == 2:
            cells.append(f"B/A {c['B']['lookups_per_s_median'] / c['A']['lookups_per_s_median']:.2f}")
        rows.append(
            (f"32k hit lookups/s, {c['clients']} clients (median of {c['rounds']})", "  ".join(cells))
        )
        cpu = [
            f"{n} {c[n]['server_cpu_us_per_lookup']:6.1f} us"
            f" (other server {c[n]['other_server_cpu_s']:.1f} s,"
            f" machine busy {c[n]['machine_busy_share']:.0%})"
            for n in names
        ]
        rows.append(("  server CPU per lookup+query+end_session", "  ".join(cpu)))
    if "noop" in data:
        o = data["noop"]
        for n in [*names, "pyzmq echo"]:
            extra = f"  ({o[n]['p50_over_echo']:.2f}x echo)" if n in names else ""
            rows.append((f"noop {n}", f"p50 {o[n]['p50_us']:6.1f} us  p99 {o[n]['p99_us']:6.1f} us{extra}"))
    if "data" in data:
        d = data["data"]
        for n in names:
            for op in ("store", "retrieve"):
                v = d[n][op]
                rows.append(
                    (
                        f"{n} {op} {d['bytes'] >> 20} MiB",
                        f"{v['gbps_best']:6.2f} GB/s  x memcpy: median {v['over_memcpy_median']:.2f}  "
                        f"best {v['over_memcpy_best']:.2f}",
                    )
                )
    return rows


def main() -> None:
    here = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a-root", help="checkout of build A (the baseline), with its extension built")
    ap.add_argument("--a-python", help="python of build A's venv (default: this python)")
    ap.add_argument("--b-root", default=str(here), help="checkout of build B (default: this one)")
    ap.add_argument("--b-python", default=sys.executable, help="python of build B (default: this python)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--gil-hog", action="store_true", help="a pure-Python thread spins in each server")
    ap.add_argument("--quick", action="store_true", help="a ~2-minute smoke run")
    ap.add_argument("--n", type=int, default=600, help="time: lookups per case and build")
    ap.add_argument("--n-noop", type=int, default=3000, help="noop samples per server")
    ap.add_argument("--n-data", type=int, default=20, help="data: store/retrieve pairs per build")
    ap.add_argument("--rounds", type=int, default=4, help="time/clients: A/B alternations")
    ap.add_argument("--seconds", type=float, default=15.0, help="tail: per phase; clients: per round")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--stream-mib", type=int, default=256, help="tail: bytes per streamed store")
    ap.add_argument(
        "--stream-rounds",
        type=int,
        default=10,
        help="tail: the loaded phase lasts at least this many streamer rounds",
    )
    ap.add_argument("--data-mib", type=int, default=8, help="data: bytes per store/retrieve")
    ap.add_argument("--criterion", action="store_true", help="run the criterion bench in --b-root first")
    ap.add_argument("--server-args", default="", help="extra flags for both servers")
    ap.add_argument("--out", default="bench-results/control.json")
    a = ap.parse_args()
    if a.quick:
        a.n, a.n_noop, a.n_data, a.rounds, a.seconds, a.stream_rounds = 100, 500, 5, 2, 3.0, 3
    sections = [x for x in a.sections.split(",") if x]
    if unknown := set(sections) - set(SECTIONS):
        ap.error(f"unknown sections {sorted(unknown)}")
    builds = [Build("B", a.b_root, a.b_python)]
    if a.a_root:
        builds.insert(0, Build("A", a.a_root, a.a_python or sys.executable))
    data: dict[str, Any] = {"args": vars(a), "loadavg_start": Path("/proc/loadavg").read_text().split()[:3]}
    data["builds"] = {b.name: {**b.probe(), "root": str(b.root), "python": b.python} for b in builds}
    if "time" in sections:
        data["criterion_parse_and_hash_us"] = criterion_us(Path(a.b_root).resolve(), a.criterion)
    l1_gb = max(1.0, 4 * a.stream_mib / 1024 + 0.25)
    flags = ["--l1-size-gb", f"{l1_gb:.2f}", "--chunk-size", str(CHUNK), *shlex.split(a.server_args)]
    ctx = mp.get_context("spawn")
    sides: list[Side] = []
    t0 = time.monotonic()
    try:
        for b in builds:
            sides.append(Side(b, flags, a.gil_hog))
        if "noop" in sections:
            data["noop"] = section_noop(sides, a)
        if "time" in sections:
            data["time"] = section_time(sides, a)
        if "clients" in sections:
            data["clients"] = section_clients(sides, a, ctx)
        if "tail" in sections:
            data["tail"] = section_tail(sides, a, ctx)
        if "data" in sections:
            data["data"] = section_data(sides, a)
    finally:
        for s in sides:
            s.close()
    data["seconds"] = time.monotonic() - t0
    data["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    rows = rows_of(data, [b.name for b in builds])
    rows.append(
        ("load average start / end", f"{' '.join(data['loadavg_start'])} / {' '.join(data['loadavg_end'])}")
    )
    rows.append(("run time", f"{data['seconds']:.0f} s{'  (gil hog in each server)' if a.gil_hog else ''}"))
    emit("Native control plane, two builds in one run", rows, data, a.out)


if __name__ == "__main__":
    main()
