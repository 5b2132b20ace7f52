"""Load for the reliability stress tests: worker processes of both transfer modes that store,
look up and retrieve chunks whose KV is a pure function of the chunk hash (so of its whole token
prefix), so that any worker can tell what a retrieved chunk must contain; and a clearer that
clears L1 through every path a deployment has (`POST /clear-cache`, `POST /cache/clear`, the
ZMQ `clear` op).

Every client call is bounded by a timeout: a call that gets no answer is counted (UNANSWERED),
never waited for, and every chunk a retrieve reports ok is compared byte for byte (WRONG_chunks).
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import httpx
import msgspec
import torch
from kvsim import MODEL, Worker, lookup

from lmcache_rs import chunk_hashes
from lmcache_rs.client import MPClient, ServerError
from lmcache_rs.client.client import make_key
from lmcache_rs.client.engine_driven import EngineDrivenWorker
from lmcache_rs.client.shm_kv import paged_shape
from lmcache_rs.protocol.messages import IPCCacheServerKey

C = 256
BS = 16
BPC = C // BS
MAX_CHUNKS = 6
#: One chunk in L1 with kvsim.Worker's geometry: 2 layers x K/V x 256 tokens x 2 heads x 32, fp16.
CHUNK_BYTES = 2 * 2 * C * 2 * 32 * 2
#: The longest any one client call may go unanswered before it counts as a hang.
CALL_TIMEOUT = 20.0
#: Blocks of a stress worker's KV cache: block 0 unused, MAX_CHUNKS chunks to store from,
#: MAX_CHUNKS chunks to retrieve into.
NUM_BLOCKS = 1 + 2 * MAX_CHUNKS * BPC + 1
SRC_BLOCK = 1
DST_BLOCK = 1 + MAX_CHUNKS * BPC
#: Longest a stress worker may take to start (spawn, import torch, register) on a loaded machine.
START_TIMEOUT = 180.0

T = TypeVar("T")


def seconds_from_env(default: float) -> float:
    """How long the stress tests run: LMCACHE_RS_STRESS_SECONDS, else `default`."""
    return float(os.environ.get("LMCACHE_RS_STRESS_SECONDS", default))


def chunk_kv(h: bytes, like: torch.Tensor) -> torch.Tensor:
    """The KV every worker writes for the chunk with hash `h`: [2, BPC, BS, H, D] per layer
    (shared prefixes come back often: remembered; never modify the result)."""
    return _chunk_kv(h, tuple(like.shape[2:]), like.dtype)


@functools.lru_cache(maxsize=256)
def _chunk_kv(h: bytes, tail: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little"))
    return torch.randn((2, BPC, *tail), generator=g).to(dtype)


def blocks(first: int, chunks: int) -> list[int]:
    return list(range(first, first + chunks * BPC))


def _chunk_blocks(block_ids: list[int], j: int) -> slice:
    """Chunk j's blocks of `block_ids`, which are consecutive ids (as `blocks` makes them)."""
    first = block_ids[j * BPC]
    assert block_ids[j * BPC : (j + 1) * BPC] == list(range(first, first + BPC))
    return slice(first, first + BPC)


def write_chunks(layers: list[torch.Tensor], hashes: list[bytes], block_ids: list[int]) -> None:
    """Puts chunk j's KV (`chunk_kv(hashes[j])`) in its BPC blocks of `block_ids` (NHD layers)."""
    for j, h in enumerate(hashes):
        for layer in layers:
            layer[:, _chunk_blocks(block_ids, j)] = chunk_kv(h, layer)


def wipe(layers: list[torch.Tensor], block_ids: list[int]) -> None:
    """Zeroes blocks before a retrieve into them: a chunk reported ok but never copied is then
    caught as wrong (no chunk's KV is all zeros)."""
    for j in range(len(block_ids) // BPC):
        for layer in layers:
            layer[:, _chunk_blocks(block_ids, j)] = 0


def exact_chunks(layers: list[torch.Tensor], hashes: list[bytes], block_ids: list[int]) -> int:
    """How many of the chunks in `block_ids` hold exactly the KV of their hash."""
    return sum(
        all(torch.equal(layer[:, _chunk_blocks(block_ids, j)], chunk_kv(h, layer)) for layer in layers)
        for j, h in enumerate(hashes)
    )


def ed_key(toks: list[int], request_id: str, end: int | None = None) -> IPCCacheServerKey:
    return make_key(toks, request_id, model_name=MODEL, worker_id=0, end=end)


class EngineDrivenSim:
    """kvsim.Worker's interface and KV geometry, engine-driven (the worker copies through the
    server's shared-memory L1 pool).

    `dawdle_s`: before copying into or out of the slots it was given, the worker waits up to
    that long (as an engine busy with other work would; 0: it copies at once, through
    EngineDrivenWorker.store/retrieve)."""

    def __init__(self, c: MPClient, seed: int, num_blocks: int = NUM_BLOCKS, dawdle_s: float = 0.0) -> None:
        self.layers = [
            torch.zeros(paged_shape("NHD", num_blocks, BS, 2, 32), dtype=torch.float16) for _ in range(2)
        ]
        self.kv = self  # so that `w.kv.layers` reads the same for both kinds
        self.c = c
        self.w = EngineDrivenWorker(c, self.layers, 50_000 + seed, MODEL)
        self.w.register()
        self.instance_id = self.w.instance_id
        self.dawdle_s = dawdle_s
        self.rng = random.Random(seed)

    def _dawdle(self) -> None:
        time.sleep(self.rng.uniform(0, self.dawdle_s))

    def store(self, toks: list[int], src: list[int], request_id: str) -> bool:
        key = ed_key(toks, request_id)
        if not self.dawdle_s:
            return self.w.store(key, src)
        ctx = self.c.prepare_store(key, self.instance_id)
        if not ctx.slots:
            return True
        self._dawdle()
        self.w.write_slots(ctx.slots, ctx.chunk_indices, src)
        return self.c.commit_store(key, self.instance_id)

    def retrieve(self, toks: list[int], dst: list[int], rid: str, end: int) -> bool:
        key = ed_key(toks, rid, end=end)
        if not self.dawdle_s:
            return self.w.retrieve(key, dst)
        try:
            reply = self.c.prepare_retrieve(key, self.instance_id)
            self._dawdle()
            self.w.read_slots(reply.context.slots, dst)
            return reply.success
        except ServerError:
            return False
        finally:
            self.c.commit_retrieve(key, self.instance_id)

    def close(self) -> None:
        self.w.unregister()


def attempt(stats: Counter[str], op: str, fn: Callable[[], T]) -> T | None:
    """`fn()`, or None when the server answered an error (counted `{op}_miss` for not_found,
    else `{op}_error:{code}`) or did not answer in time (counted UNANSWERED)."""
    try:
        return fn()
    except ServerError as e:
        stats[f"{op}_miss" if e.code == "not_found" else f"{op}_error:{e.code}"] += 1
    except TimeoutError:
        stats["UNANSWERED"] += 1
        stats[f"unanswered:{op}"] += 1
    return None


class Load(msgspec.Struct, frozen=True):
    """What one stress worker process does (it is handed to a spawned process)."""

    url: str
    seed: int
    seconds: float
    families: list[list[int]]
    dawdle_s: float = 0.0
    call_timeout: float = CALL_TIMEOUT


def stress_worker(load: Load, start: Any, q: Any) -> None:
    """One worker process: odd seeds lmcache-driven (kvsim.Worker), even seeds engine-driven.
    Once registered it waits on the `start` barrier, then, for `load.seconds`, each request
    stores up to MAX_CHUNKS chunks of a shared family prefix (40% of them with a private
    continuation), looks the prompt up, retrieves the hit and checks every chunk.
    Puts its counters on `q`, always (a crash is counted as CRASHED)."""
    torch.set_num_threads(1)  # many worker processes share few cores
    rng = random.Random(load.seed)
    stats: Counter[str] = Counter()
    try:
        with MPClient(load.url, timeout=load.call_timeout) as c:
            if load.seed % 2:
                w: Worker | EngineDrivenSim = Worker(c, num_blocks=NUM_BLOCKS)
            else:
                w = EngineDrivenSim(c, load.seed, dawdle_s=load.dawdle_s)
            kind = "engine_driven" if isinstance(w, EngineDrivenSim) else "lmcache_driven"
            families = load.families
            seed = load.seed
            start.wait(START_TIMEOUT)
            deadline = time.monotonic() + load.seconds
            i = 0
            while time.monotonic() < deadline:
                i += 1
                n = rng.randint(1, MAX_CHUNKS)
                toks = families[rng.randrange(len(families))][: n * C]
                if rng.random() < 0.4:  # a private continuation of a shared prefix
                    keep = rng.randrange(n) * C
                    toks = toks[:keep] + [rng.randrange(50_000) for _ in range(n * C - keep)]
                hashes = chunk_hashes(toks)
                src = blocks(SRC_BLOCK, n)
                write_chunks(w.kv.layers, hashes, src)
                rid = f"w{seed}-{i}"
                stored = attempt(stats, "store", lambda: w.store(toks, src, request_id=rid))  # noqa: B023
                if stored is not None:
                    stats["store_ok" if stored else "store_not_ok"] += 1
                hit = attempt(stats, "lookup", lambda: lookup(c, toks, rid)) or 0  # noqa: B023
                stats["hit_chunks"] += hit
                if hit:
                    dst = blocks(DST_BLOCK, hit)
                    wipe(w.kv.layers, dst)
                    got = attempt(stats, "retrieve", lambda: w.retrieve(toks, dst, rid, end=hit * C))  # noqa: B023
                    if got:
                        exact = exact_chunks(w.kv.layers, hashes[:hit], dst)
                        stats["retrieve_ok"] += 1
                        stats["checked_chunks"] += hit
                        stats["exact_chunks"] += exact
                        stats["WRONG_chunks"] += hit - exact
                        stats[f"WRONG_chunks_read_{kind}"] += hit - exact
                    elif got is not None:
                        stats["retrieve_miss"] += 1
                attempt(stats, "end_session", lambda: c.end_session(rid))  # noqa: B023
            stats["requests"] = i
            stats[f"{kind}_requests"] = i
            attempt(stats, "close", w.close)
    except Exception as e:  # reported to the test, which fails on it
        stats[f"CRASHED: {type(e).__name__}: {e}"] += 1
        start.abort()  # the others need not wait for this one
    finally:
        q.put(dict(stats))


def run_workers(
    url: str,
    seconds: float,
    n: int = 8,
    *,
    family_seed: int = 7,
    dawdle_s: float = 0.0,
    on_start: Callable[[], None] = lambda: None,
) -> tuple[Counter[str], list[int | None]]:
    """Runs `n` stress workers (half of each transfer mode) over 4 shared prompt families for
    `seconds` from the moment all are registered (`on_start()` is called then); returns their
    summed counters and the exit codes (None: still running, killed)."""
    rng = random.Random(family_seed)
    families = [[rng.randrange(50_000) for _ in range(MAX_CHUNKS * C)] for _ in range(4)]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start = ctx.Barrier(n + 1)
    procs = [
        ctx.Process(target=stress_worker, args=(Load(url, k, seconds, families, dawdle_s), start, q))
        for k in range(n)
    ]
    for p in procs:
        p.start()
    total: Counter[str] = Counter()
    try:
        start.wait(START_TIMEOUT)
    except threading.BrokenBarrierError:
        total["WORKERS_NOT_STARTED"] += 1
    on_start()
    # The run, then one hung call per operation of a request.
    deadline = time.monotonic() + seconds + 5 * CALL_TIMEOUT + 30
    got = 0
    while got < n and time.monotonic() < deadline:
        try:
            total.update(q.get(timeout=1.0))
            got += 1
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and q.empty():
                break
    total["MISSING_WORKER_REPORTS"] = n - got
    codes = []
    for p in procs:
        # A worker that has reported only tears down (torch, shared memory): give it time on a
        # loaded 2-core machine before calling it hung (seen: > 10 s with other jobs running).
        p.join(60)
        if p.is_alive():
            p.kill()
            p.join(10)
        codes.append(p.exitcode)
    return total, codes


ClearPath = Literal["clear-cache", "cache/clear", "zmq"]
#: What the clearer does, in turn: force-clears through all three paths, then a non-forced
#: clear through each path that has one (`/clear-cache` always forces).
CLEAR_CYCLE: tuple[tuple[ClearPath, bool], ...] = (
    ("clear-cache", True),
    ("cache/clear", True),
    ("zmq", True),
    ("clear-cache", True),
    ("cache/clear", True),
    ("zmq", True),
    ("cache/clear", False),
    ("zmq", False),
)


def clear_l1(path: ClearPath, force: bool, http: httpx.Client, client: MPClient) -> bool:
    """One clear of L1 through `path`; whether the server answered ok. Raises TimeoutError when
    it does not answer within the clients' timeouts."""
    if path == "zmq":
        try:
            client.clear(force)
        except ServerError:
            return False
        return True
    try:
        if path == "clear-cache":
            assert force, "/clear-cache always forces"
            r = http.post("/clear-cache")
        else:
            r = http.post("/cache/clear", json={"tier": "l1", "force": force})
    except httpx.TimeoutException as e:
        raise TimeoutError(f"POST /{path}: {e}") from None
    return r.status_code == 200 and r.json().get("status") == "ok"


class Clearer(threading.Thread):
    """Clears L1 every 20-50 ms through CLEAR_CYCLE until `stop()`, and always through whole
    cycles (so through every path at least once); counts `clear:{path}:{force|soft}` per
    answered clear, CLEAR_FAILED per error answer, UNANSWERED per timeout, CRASHED if it dies."""

    def __init__(self, http: str, url: str, seed: int = 0, call_timeout: float = CALL_TIMEOUT) -> None:
        super().__init__(name="l1-clearer", daemon=True)
        self.http_url = http
        self.url = url
        self.call_timeout = call_timeout
        self.rng = random.Random(seed)
        self.stats: Counter[str] = Counter()
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            with (
                httpx.Client(base_url=self.http_url, timeout=self.call_timeout) as http,
                MPClient(self.url, timeout=self.call_timeout) as client,
            ):
                i = 0
                while not (self._stop_event.is_set() and i and i % len(CLEAR_CYCLE) == 0):
                    self._stop_event.wait(self.rng.uniform(0.02, 0.05))
                    path, force = CLEAR_CYCLE[i % len(CLEAR_CYCLE)]
                    i += 1
                    try:
                        ok = clear_l1(path, force, http, client)
                    except TimeoutError:
                        self.stats["UNANSWERED"] += 1
                        self.stats[f"unanswered:clear:{path}"] += 1
                        continue
                    self.stats[f"clear:{path}:{'force' if force else 'soft'}" if ok else "CLEAR_FAILED"] += 1
        except Exception as e:  # reported to the test, which fails on it
            self.stats[f"CRASHED: {type(e).__name__}: {e}"] += 1

    def stop(self) -> Counter[str]:
        """Stops the clearer (after its current cycle) and returns its counters."""
        self._stop_event.set()
        if self.is_alive():
            self.join(len(CLEAR_CYCLE) * self.call_timeout + 5)
        if self.is_alive():
            self.stats["UNANSWERED"] += 1
            self.stats["clearer_stuck"] += 1
        return self.stats
