"""A short history of the server's state for the dashboard (`GET /stats/history`).

A LOW periodic thread (`stats-history`, every `--stats-history-interval-seconds`, 2 s) reads the
same snapshots /metrics and /status read (the Rust index's `stats()`, the engine's counters,
the request timings, the L2 tier's status) and appends one `Sample` to a ring buffer holding
`--stats-history-seconds` (600 s) of them: at most window / interval samples (300 by default,
a few hundred bytes each), whatever the traffic. Rates and quantiles in a sample describe the
interval that ends at its time `t`: differences of cumulative counters divided by the
interval's length. A counter that went down (`POST /metrics/reset` clears the engine's
counters) counts from zero, as Prometheus treats a counter reset.

`current()` builds what the page shows as numbers (health, threads, L1 and L2, tenants,
workers) at request time, from the same sources as /status, so both agree.

Retrieve bytes are the chunks copied back to workers (`num_chunks_loaded`, per model) times the
bytes of one chunk object of that model's registered layout (`chunk_bytes_by_model`; the
metrics export it as `lmcache_rs_kv_chunk_bytes` so Grafana computes the same). Store bytes are
the bytes admitted into L1 (`admitted_bytes` of the core: stores and L2 prefetch loads).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from lmcache_rs.observability import timing
from lmcache_rs.observability.health import describe_thread
from lmcache_rs.observability.periodic import Level, PeriodicThread
from lmcache_rs.observability.timing import OpTiming

if TYPE_CHECKING:
    from lmcache_rs._core import CounterName, L1Stats
    from lmcache_rs.runtime import Runtime

#: The name L1 has among the tiers and `_default` for the empty cache_salt (as /quota).
L1_NAME = "L1"
DEFAULT_SALT = "_default"
#: Tenants listed by `current()`, largest first (the rest are counted in `tenant_count`).
MAX_TENANTS = 100

#: Engine counters (keyed by model_name, cache_salt) a tenant's lookups sum: their position.
LOOKUP_COUNTERS = {"lookups": 0, "lookup_requested_tokens": 1, "lookup_hit_tokens": 2}

#: Core counters of objects that left L1, by reason.
L1_EVICTIONS: dict[str, CounterName] = {
    "watermark": "evicted_watermark_objects",
    "quota": "evicted_quota_objects",
    "demand": "evicted_demand_objects",
    "deleted": "deleted_objects",
    "cleared": "cleared_objects",
}


# ---- what /stats/history answers ----------------------------------------------------------------


class Latency(msgspec.Struct):
    """Request time (pool queue + handler) quantiles of one op over an interval, seconds."""

    requests: int
    p50: float
    p99: float


class TierPoint(msgspec.Struct):
    """One tier (L1, or an L2 adapter by name) at a sample."""

    name: str
    used_bytes: int
    #: 0: unlimited (an L2 adapter without max_capacity_gb).
    capacity_bytes: int
    objects: int
    is_healthy: bool
    #: Objects that left the tier during the interval, by reason.
    evicted: dict[str, int]


class Sample(msgspec.Struct):
    #: Wall-clock time (Unix seconds) at the end of the interval the sample describes.
    t: float
    #: Length of that interval, seconds.
    interval: float
    tiers: list[TierPoint]
    lookups_per_s: float
    #: Hit tokens / requested tokens of the interval's lookups (None without lookups).
    lookup_hit_ratio: float | None
    store_bytes_per_s: float
    retrieve_bytes_per_s: float
    #: Requests answered per second, by op.
    requests_per_s: dict[str, float]
    #: Request time quantiles by op (ops with requests in the interval).
    latency: dict[str, Latency]
    #: Error replies during the interval, by code.
    errors: dict[str, int]


class ThreadNow(msgspec.Struct):
    name: str
    level: str
    interval: float
    is_healthy: bool
    is_running: bool
    is_active: bool
    consecutive_failures: int
    last_run_ago: float | None
    total_runs: int
    failed_runs: int
    #: Why it is unhealthy (None when healthy); the last run's message otherwise.
    reason: str | None
    last_message: str | None


class IoNow(msgspec.Struct):
    is_healthy: bool
    reason: str | None
    last_tick_ago: float | None
    requests_received: int
    replies_sent: int
    pending_requests: int


class HealthNow(msgspec.Struct):
    #: /healthcheck's verdict and reason.
    is_healthy: bool
    reason: str | None
    io_thread: IoNow
    threads: list[ThreadNow]


class TierNow(msgspec.Struct):
    name: str
    type: str
    is_healthy: bool
    #: Why not (L1: /status l1_manager.problems; L2: the adapter's last error).
    problems: list[str]
    used_bytes: int
    capacity_bytes: int
    objects: int
    #: Objects that left the tier since the start, by reason.
    evicted: dict[str, int]


class TenantNow(msgspec.Struct):
    #: `_default` for the empty salt.
    cache_salt: str
    l1_bytes: int
    l2_bytes: int
    objects: int
    #: IsolatedLRU quota in bytes (None: no quota; with IsolatedLRU that means not kept).
    quota_bytes: int | None
    lookups: int
    requested_tokens: int
    hit_tokens: int
    #: hit / requested tokens since the start or the last /metrics/reset (None: no lookups).
    hit_ratio: float | None


class WorkerNow(msgspec.Struct):
    instance_id: int
    model_name: str
    world_size: int
    #: `lmcache_driven` (the server copies through shm or CUDA IPC) or `engine_driven`.
    transfer_mode: str
    device: str
    last_seen_ago: float
    registered_ago: float


class History(msgspec.Struct):
    #: Server wall-clock time of the answer (Unix seconds).
    now: float
    started_at: float
    interval_seconds: float
    window_seconds: float
    health: HealthNow
    tiers: list[TierNow]
    eviction_policy: str
    tenants: list[TenantNow]
    tenant_count: int
    workers: list[WorkerNow]
    requests_total: int
    #: Error replies since the start, by code (as /status request_server.errors).
    errors: dict[str, int]
    #: Samples newer than the request's `since`, oldest first.
    samples: list[Sample]


# ---- shared with the metrics collector --------------------------------------------------------------


def transfer_mode(ctx: Any) -> str:
    return "engine_driven" if getattr(ctx, "engine_type", "") == "engine_driven" else "lmcache_driven"


def workers(runtime: Runtime) -> list[WorkerNow]:
    now = time.monotonic()
    return [
        WorkerNow(
            instance_id=c.instance_id,
            model_name=c.model_name,
            world_size=c.world_size,
            transfer_mode=transfer_mode(c),
            device=c.device,
            last_seen_ago=runtime.engine.contexts.last_seen_ago(c.instance_id) or 0.0,
            registered_ago=max(0.0, now - c.registered_at),
        )
        for c in sorted(runtime.engine.contexts.all(), key=lambda c: c.instance_id)
    ]


def chunk_bytes_by_model(runtime: Runtime) -> dict[str, int]:
    """Bytes of one chunk object per model among registered workers (the largest, when a model
    is registered with several world sizes)."""
    out: dict[str, int] = {}
    for c in runtime.engine.contexts.all():
        out[c.model_name] = max(out.get(c.model_name, 0), c.chunk_bytes)
    return out


def salt_name(salt: str) -> str:
    return DEFAULT_SALT if salt == "" else salt


# ---- the sampler ------------------------------------------------------------------------------------


class _Raw(msgspec.Struct):
    """Cumulative values at one instant, for differences."""

    mono: float
    lookups: int
    requested_tokens: int
    hit_tokens: int
    chunks_loaded: dict[str, int]
    admitted_bytes: int
    l1_evicted: dict[str, int]
    l2_evicted: dict[str, dict[str, int]]
    errors: dict[str, int]
    timings: dict[str, OpTiming]


def _grew(now: int, before: int) -> int:
    """The increase of a counter (its value when it went down: a reset)."""
    return now - before if now >= before else now


def _grew_map(now: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    return {k: d for k, v in now.items() if (d := _grew(v, before.get(k, 0)))}


class StatsHistory:
    def __init__(self, runtime: Runtime, interval: float, window: float) -> None:
        self.runtime = runtime
        self.interval = interval
        self.window = window
        self._lock = threading.Lock()
        self._samples: collections.deque[Sample] = collections.deque(maxlen=max(1, int(window / interval)))
        self._prev: _Raw | None = None

    def thread(self) -> PeriodicThread:
        return PeriodicThread("stats-history", self.interval, Level.LOW, self.sample)

    # ---- sampling ---------------------------------------------------------------------------

    def _raw(self, stats: L1Stats, l2_evicted: dict[str, dict[str, int]]) -> _Raw:
        rt = self.runtime
        lookups = requested = hits = 0
        loaded: dict[str, int] = {}
        for key, n in rt.engine.stats.snapshot().items():
            name = key[0]
            if name == "lookups":
                lookups += n
            elif name == "lookup_requested_tokens":
                requested += n
            elif name == "lookup_hit_tokens":
                hits += n
            elif name == "num_chunks_loaded":
                loaded[key[2]] = loaded.get(key[2], 0) + n
            elif name == "l2_evicted_chunks":
                by = l2_evicted.setdefault(key[1], {})
                by[key[2]] = by.get(key[2], 0) + n
        counters = stats["counters"]
        return _Raw(
            mono=time.monotonic(),
            lookups=lookups,
            requested_tokens=requested,
            hit_tokens=hits,
            chunks_loaded=loaded,
            admitted_bytes=counters["admitted_bytes"],
            l1_evicted={reason: counters[key] for reason, key in L1_EVICTIONS.items()},
            l2_evicted=l2_evicted,
            errors=dict(rt.server.errors),
            timings=rt.server.timing_snapshot(),
        )

    def sample(self) -> str:
        """The `stats-history` job: one sample (the first call only records the counters)."""
        rt = self.runtime
        stats = rt.l1.index.stats()
        l2 = rt.l2.status() if rt.l2 is not None else None
        raw = self._raw(stats, {})
        wall = time.time()
        prev, self._prev = self._prev, raw
        if prev is None:
            return "first sample: counters recorded"
        dt = max(raw.mono - prev.mono, 1e-6)
        tiers = [
            TierPoint(
                name=L1_NAME,
                used_bytes=stats["used_bytes"],
                capacity_bytes=stats["capacity_bytes"],
                objects=stats["total_objects"],
                is_healthy=not rt.l1_problems(stats),
                evicted=_grew_map(raw.l1_evicted, prev.l1_evicted),
            )
        ]
        for a in l2.adapters if l2 is not None else []:
            tiers.append(
                TierPoint(
                    name=a.name,
                    used_bytes=a.total_bytes_used,
                    capacity_bytes=a.total_capacity_bytes,
                    objects=a.total_objects,
                    is_healthy=a.is_healthy,
                    evicted=_grew_map(raw.l2_evicted.get(a.name, {}), prev.l2_evicted.get(a.name, {})),
                )
            )
        chunk_bytes = chunk_bytes_by_model(rt)
        loaded = _grew_map(raw.chunks_loaded, prev.chunks_loaded)
        requested = _grew(raw.requested_tokens, prev.requested_tokens)
        ops = timing.diff(raw.timings, prev.timings)
        latency = {}
        for op, t in ops.items():
            p50, p99 = timing.quantile(0.5, t.buckets), timing.quantile(0.99, t.buckets)
            if t.count and p50 is not None and p99 is not None:
                latency[op] = Latency(requests=t.count, p50=p50, p99=p99)
        s = Sample(
            t=wall,
            interval=dt,
            tiers=tiers,
            lookups_per_s=_grew(raw.lookups, prev.lookups) / dt,
            lookup_hit_ratio=_grew(raw.hit_tokens, prev.hit_tokens) / requested if requested else None,
            store_bytes_per_s=_grew(raw.admitted_bytes, prev.admitted_bytes) / dt,
            retrieve_bytes_per_s=sum(n * chunk_bytes.get(m, 0) for m, n in loaded.items()) / dt,
            requests_per_s={op: t.count / dt for op, t in ops.items() if t.count},
            latency=latency,
            errors=_grew_map(raw.errors, prev.errors),
        )
        with self._lock:
            self._samples.append(s)
        return f"{len(self._samples)} samples"

    def samples(self, since: float | None = None) -> list[Sample]:
        with self._lock:
            out = list(self._samples)
        return out if since is None else [s for s in out if s.t > since]

    # ---- now ------------------------------------------------------------------------------------

    def current(self, since: float | None = None) -> History:
        rt = self.runtime
        stats = rt.l1.index.stats()
        l2 = rt.l2.status() if rt.l2 is not None else None
        io = rt.io_status()
        io_reason = rt.io_problem(io)
        problem = rt.health_problem(io)
        unhealthy = {t.name for t in rt.periodic.unhealthy()}
        threads = []
        for t in rt.periodic.threads():
            st = t.status()
            threads.append(
                ThreadNow(
                    name=st.name,
                    level=st.level,
                    interval=st.interval,
                    is_healthy=t.name not in unhealthy,
                    is_running=st.is_running,
                    is_active=st.is_active,
                    consecutive_failures=st.consecutive_failures,
                    last_run_ago=st.last_run_ago,
                    total_runs=st.total_runs,
                    failed_runs=st.failed_runs,
                    reason=describe_thread(t) if t.name in unhealthy else None,
                    last_message=None if st.last_summary is None else st.last_summary.message,
                )
            )
        threads.sort(key=lambda t: (t.is_healthy, t.name))
        raw = self._raw(stats, {})
        l1_problems = rt.l1_problems(stats)
        tiers = [
            TierNow(
                name=L1_NAME,
                type="L1 (pinned)" if rt.l1.pinned else "L1 (DRAM)",
                is_healthy=not l1_problems,
                problems=l1_problems,
                used_bytes=stats["used_bytes"],
                capacity_bytes=stats["capacity_bytes"],
                objects=stats["total_objects"],
                evicted=raw.l1_evicted,
            )
        ]
        for a in l2.adapters if l2 is not None else []:
            tiers.append(
                TierNow(
                    name=a.name,
                    type=a.type,
                    is_healthy=a.is_healthy,
                    problems=[] if a.is_healthy or a.last_error is None else [a.last_error],
                    used_bytes=a.total_bytes_used,
                    capacity_bytes=a.total_capacity_bytes,
                    objects=a.total_objects,
                    evicted=raw.l2_evicted.get(a.name, {}),
                )
            )
        tenants = self._tenants(stats, l2)
        return History(
            now=time.time(),
            started_at=rt.started_at,
            interval_seconds=self.interval,
            window_seconds=self.window,
            health=HealthNow(
                is_healthy=problem is None,
                reason=problem,
                io_thread=IoNow(
                    is_healthy=io_reason is None,
                    reason=io_reason,
                    last_tick_ago=io.last_tick_ago,
                    requests_received=io.requests_received,
                    replies_sent=io.replies_sent,
                    pending_requests=io.pending_requests,
                ),
                threads=threads,
            ),
            tiers=tiers,
            eviction_policy=rt.cfg.storage_manager.eviction_policy,
            tenants=tenants[:MAX_TENANTS],
            tenant_count=len(tenants),
            workers=workers(rt),
            requests_total=rt.server.requests_total,
            errors=raw.errors,
            samples=self.samples(since),
        )

    def _tenants(self, stats: L1Stats, l2: Any) -> list[TenantNow]:
        lookups: dict[str, list[int]] = {}
        for key, n in self.runtime.engine.stats.snapshot().items():
            i = LOOKUP_COUNTERS.get(key[0])
            if i is not None:  # key: (name, model_name, cache_salt)
                lookups.setdefault(key[2], [0, 0, 0])[i] += n
        l2_bytes: dict[str, int] = {}
        for a in l2.adapters if l2 is not None else []:
            for salt, b in a.bytes_by_cache_salt.items():
                l2_bytes[salt] = l2_bytes.get(salt, 0) + b
        by_salt = {s["cache_salt"]: s for s in stats["salts"]}
        quotas = {q.cache_salt: q.limit_bytes for q in self.runtime.l1.index.list_quotas()}
        out = []
        for salt in by_salt.keys() | lookups.keys() | l2_bytes.keys() | quotas.keys():
            s = by_salt.get(salt)
            n, requested, hits = lookups.get(salt, [0, 0, 0])
            out.append(
                TenantNow(
                    cache_salt=salt_name(salt),
                    l1_bytes=0 if s is None else s["bytes"],
                    l2_bytes=l2_bytes.get(salt, 0),
                    objects=0 if s is None else s["objects"],
                    quota_bytes=quotas.get(salt),
                    lookups=n,
                    requested_tokens=requested,
                    hit_tokens=hits,
                    hit_ratio=hits / requested if requested else None,
                )
            )
        out.sort(key=lambda t: (-(t.l1_bytes + t.l2_bytes), -t.lookups, t.cache_salt))
        return out
