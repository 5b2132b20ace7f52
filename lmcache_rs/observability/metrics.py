"""Prometheus metrics: one registry per server and a collector that reads snapshots.

Nothing is counted twice: the collector turns the Rust index's stats snapshot and the
engine's counters into metric families at scrape time. Names keep LMCache 0.5.6's
`lmcache_mp_*` (spec H) so dashboards keep working; ours are `lmcache_rs_*`. `reset()` really
resets: it records a baseline that later scrapes subtract (Prometheus treats the drop as a
counter reset).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from lmcache_rs.observability import history, timing
from lmcache_rs.observability.timing import OpTiming

if TYPE_CHECKING:
    from lmcache_rs._core import CounterName
    from lmcache_rs.runtime import Runtime

L1_TAG = "_default"

# engine stats key -> (metric name, documentation, label names)
ENGINE_COUNTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "l1_read_chunks": ("lmcache_mp_l1_read_chunks", "Chunks read from L1 by retrieves.", ("cache_salt",)),
    "l1_write_chunks": ("lmcache_mp_l1_write_chunks", "Chunks written into L1 by stores.", ("cache_salt",)),
    "l1_allocation_failure_chunks": (
        "lmcache_mp_l1_allocation_failure_chunks",
        "Chunks that could not get L1 space.",
        ("during", "model_name"),
    ),
    "l1_read_failure_chunks": (
        "lmcache_mp_l1_read_failure_chunks",
        "Chunks a retrieve could not read.",
        ("during", "reason", "model_name"),
    ),
    "l1_checksum_mismatch_chunks": (
        "lmcache_rs_l1_checksum_mismatch_chunks",
        "Chunks whose L1 bytes failed --verify-checksums on retrieve (never copied out).",
        ("model_name",),
    ),
    "pickle_refused_requests": (
        "lmcache_rs_pickle_refused_requests",
        "Engine-driven requests that carried pickled KV, refused unread.",
        ("op",),
    ),
    "lookups": ("lmcache_mp_lookups_requests", "Lookup requests.", ("model_name", "cache_salt")),
    "lookup_misses": (
        "lmcache_rs_lookup_misses",
        "Lookups that stopped short of the prompt, by why the first missing chunk is not in L1 "
        "(evicted_watermark, evicted_quota, evicted_demand, deleted, cleared, released_temporary, "
        "write_expired, never_stored: never stored or dropped too long ago to be remembered, or "
        "sliding_window: only a hybrid model's window fell short).",
        ("model_name", "reason"),
    ),
    "l1_clears": ("lmcache_rs_l1_clears", "L1 clears (ZMQ or HTTP).", ("mode",)),
    "lookup_requested_tokens": (
        "lmcache_mp_lookup_requested_tokens",
        "Tokens (complete chunks) asked for by lookups.",
        ("model_name", "cache_salt"),
    ),
    "lookup_hit_tokens": (
        "lmcache_mp_lookup_hit_tokens",
        "Tokens found by lookups (every rank).",
        ("model_name", "cache_salt"),
    ),
    "lookup_early_exit": (
        "lmcache_mp_lookup_early_exit_requests",
        "Lookups answered 0 before looking (no registered layout, no complete chunk).",
        ("model_name", "cache_salt", "reason"),
    ),
    "stores_submitted": ("lmcache_mp_num_submitted_stores", "Store requests received.", ("device",)),
    "stores_finished": ("lmcache_mp_num_finished_stores", "Store requests finished.", ("device",)),
    "retrieves_submitted": ("lmcache_mp_num_submitted_retrieves", "Retrieve requests received.", ("device",)),
    "retrieves_finished": ("lmcache_mp_num_finished_retrieves", "Retrieve requests finished.", ("device",)),
    "num_chunks_loaded": (
        "lmcache_mp_num_chunks_loaded",
        "Chunks copied back into workers' KV caches.",
        ("worker_id", "model_name", "cache_salt"),
    ),
    "lookup_hit_l1_tokens": (
        "lmcache_mp_lookup_hit_l1_tokens",
        "Lookup hit tokens that were already in L1.",
        ("model_name", "cache_salt"),
    ),
    "lookup_hit_l2_tokens": (
        "lmcache_mp_lookup_hit_l2_tokens",
        "Lookup hit tokens loaded from L2 by the lookup's prefetch.",
        ("model_name", "cache_salt"),
    ),
    "l2_store_chunks": (
        "lmcache_mp_l2_store_completed_objects_chunks",
        "Chunks written to an L2 adapter by write-through.",
        ("l2_name", "cache_salt"),
    ),
    "l2_store_skipped": (
        "lmcache_rs_l2_store_skipped_chunks",
        "Chunks not written to L2 (queue_full, unavailable, error, evicted_from_l1); '*': every adapter.",
        ("l2_name", "reason"),
    ),
    "l2_errors": (
        "lmcache_rs_l2_errors",
        "Failed L2 operations, by adapter and operation.",
        ("l2_name", "op"),
    ),
    "l2_clears": ("lmcache_rs_l2_clears", "L2 adapter clears (POST /cache/clear).", ("l2_name",)),
    "l2_corrupt_objects": (
        "lmcache_rs_l2_corrupt_objects",
        "L2 objects that failed verification (deleted, served as a miss).",
        ("l2_name",),
    ),
    "l2_prefetch_lookup_chunks": (
        "lmcache_mp_l2_prefetch_lookup_objects_chunks",
        "Chunks a lookup found in L2 (every rank) and set out to load.",
        ("l2_name", "cache_salt"),
    ),
    "l2_prefetch_load_chunks": (
        "lmcache_mp_l2_prefetch_load_completed_chunks",
        "Chunks loaded from L2 into L1 (per rank).",
        ("l2_name", "cache_salt"),
    ),
    "l2_prefetch_failure_chunks": (
        "lmcache_mp_l2_prefetch_failure_chunks",
        "Chunks a prefetch could not load (l1_oom, in_flight, not_found).",
        ("reason", "model_name"),
    ),
    "l2_prefetch_skipped": (
        "lmcache_rs_l2_prefetch_skipped_requests",
        "Lookups that did not ask L2 because the prefetch backlog was full.",
        ("model_name", "reason"),
    ),
    "l2_evicted_chunks": (
        "lmcache_mp_l2_evicted_objects_chunks",
        "Objects evicted from an L2 adapter, by reason (quota, watermark).",
        ("l2_name", "reason"),
    ),
    "block_allocation_records": (
        "lmcache_rs_block_allocation_records",
        "report_block_allocation records received.",
        ("model_name",),
    ),
}

# Rust counter -> (metric name, documentation, extra labels)
CORE_COUNTERS: dict[CounterName, tuple[str, str, dict[str, str]]] = {
    "eviction_cycles": ("lmcache_mp_l1_eviction_loop_ticks", "Runs of the L1 eviction cycle.", {}),
    "eviction_triggered": (
        "lmcache_mp_l1_eviction_loop_triggered",
        "Eviction cycles that found usage at or above the watermark.",
        {},
    ),
    "evicted_watermark_objects": ("lmcache_rs_l1_evicted_objects", "", {"reason": "watermark"}),
    "evicted_quota_objects": ("lmcache_rs_l1_evicted_objects", "", {"reason": "quota"}),
    "evicted_demand_objects": ("lmcache_rs_l1_evicted_objects", "", {"reason": "demand"}),
    "deleted_objects": ("lmcache_rs_l1_evicted_objects", "", {"reason": "deleted"}),
    "cleared_objects": ("lmcache_rs_l1_evicted_objects", "", {"reason": "cleared"}),
    "expired_read_locks": ("lmcache_rs_l1_expired_read_locks", "Read leases ended by their TTL.", {}),
    "expired_staging": ("lmcache_rs_l1_expired_staging", "Write reservations reclaimed by their TTL.", {}),
    "duplicate_writes": (
        "lmcache_rs_l1_duplicate_writes",
        "Staged copies dropped because another writer finished first.",
        {},
    ),
    "read_leases": (
        "lmcache_rs_l1_read_leases",
        "Read leases taken (a lookup rank, a copy out, a read-locked L2 load).",
        {},
    ),
    "dropped_writes": (
        "lmcache_rs_l1_dropped_writes",
        "Staged writes refused at their commit because a forced clear dropped them meanwhile.",
        {},
    ),
    "allocation_failures": (
        "lmcache_rs_l1_allocation_failures",
        "Chunk allocations L1 refused for lack of space (stores and L2 loads; /status L1 health).",
        {},
    ),
    "admitted_bytes": (
        "lmcache_rs_l1_admitted_bytes",
        "Bytes admitted into L1 (stores and L2 prefetch loads).",
        {},
    ),
    "pending_released_objects": (
        "lmcache_rs_l1_pending_released_objects",
        "Objects dropped while leased whose bytes returned to L1 when their last lease ended.",
        {},
    ),
}
EVICTED_DOC = "Objects that left L1, by reason."


class ServerCollector(Collector):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._lock = threading.Lock()
        self._core_base: dict[CounterName, int] = {}
        self._error_base: dict[str, int] = {}
        self._timing_base: dict[str, OpTiming] = {}
        self._memo_base = (0, 0)

    def reset(self) -> None:
        stats = self.runtime.l1.index.stats()
        with self._lock:
            self._core_base = {k: stats["counters"][k] for k in CORE_COUNTERS}
            # Error replies are counters of the stats registry, which the reset below clears:
            # nothing to subtract, but the codes seen keep showing (as 0).
            self._error_base = dict.fromkeys(self.runtime.server.errors, 0)
            self._timing_base = self.runtime.server.timing_snapshot()
            memo = self.runtime.engine.chain_memo.stats()
            self._memo_base = (memo.hits, memo.misses)
        self.runtime.engine.stats.reset()

    def collect(self) -> Iterator[Metric]:
        rt = self.runtime
        stats = rt.l1.index.stats()
        with self._lock:
            core_base = dict(self._core_base)
            error_base = dict(self._error_base)
            timing_base = dict(self._timing_base)
            memo_base = self._memo_base
        # Engine counters.
        families: dict[str, CounterMetricFamily] = {}
        for key, value in rt.engine.stats.snapshot().items():
            spec = ENGINE_COUNTERS.get(key[0])
            if spec is None:
                continue
            name, doc, labels = spec
            fam = families.get(name)
            if fam is None:
                fam = families[name] = CounterMetricFamily(name, doc, labels=list(labels))
            fam.add_metric(list(key[1:]), value)
        yield from families.values()
        # Core counters (evictions are one family with a reason label).
        evicted = CounterMetricFamily("lmcache_rs_l1_evicted_objects", EVICTED_DOC, labels=["reason"])
        total_evicted = 0
        for key, (name, doc, labels) in CORE_COUNTERS.items():
            value = stats["counters"][key] - core_base.get(key, 0)
            if name == "lmcache_rs_l1_evicted_objects":
                evicted.add_metric([labels["reason"]], value)
                if labels["reason"] in ("watermark", "quota", "demand"):
                    total_evicted += value
                continue
            fam = CounterMetricFamily(name, doc, labels=[])
            fam.add_metric([], value)
            yield fam
        yield evicted
        fam = CounterMetricFamily(
            "lmcache_mp_l1_evicted_chunks",
            "Chunks evicted from L1 (watermark, quota, demand).",
            labels=["l1_tag"],
        )
        fam.add_metric([L1_TAG], total_evicted)
        yield fam
        errors = CounterMetricFamily(
            "lmcache_rs_request_errors", "Requests answered with an error reply, by code.", labels=["code"]
        )
        counts = {**error_base, **rt.server.errors}
        for code, n in sorted(counts.items()):
            errors.add_metric([code], n - error_base.get(code, 0))
        yield errors
        memo_stats = rt.engine.chain_memo.stats()
        memo = CounterMetricFamily(
            "lmcache_rs_hash_memo_chunks",
            "Chunk hashes of requests found in the hash memo (hit) or computed with blake3 (miss).",
            labels=["result"],
        )
        memo.add_metric(["hit"], memo_stats.hits - memo_base[0])
        memo.add_metric(["miss"], memo_stats.misses - memo_base[1])
        yield memo
        yield GaugeMetricFamily(
            "lmcache_rs_hash_memo_entries", "Chunk hashes the memo holds.", value=memo_stats.entries
        )
        yield GaugeMetricFamily(
            "lmcache_rs_hash_memo_bytes",
            "Bytes of the hash inputs the memo holds.",
            value=memo_stats.key_bytes,
        )
        handler = SummaryMetricFamily(
            "lmcache_rs_request_seconds",
            "Time in the handler per request (server side), by op.",
            labels=["op"],
        )
        queued = SummaryMetricFamily(
            "lmcache_rs_request_queue_seconds",
            "Time a request waited for a pool thread, by op.",
            labels=["op"],
        )
        duration = HistogramMetricFamily(
            "lmcache_rs_request_duration_seconds",
            "Time from a request's arrival to its reply (pool queue + handler), by op.",
            labels=["op"],
        )
        for op, t in sorted(timing.diff(rt.server.timing_snapshot(), timing_base).items()):
            handler.add_metric([op], count_value=t.count, sum_value=t.handler_seconds)
            queued.add_metric([op], count_value=t.count, sum_value=t.queue_seconds)
            cumulative, acc = [], 0
            for bound, n in zip((*timing.BUCKETS, math.inf), t.buckets, strict=True):
                acc += n
                # prometheus_client.utils has no annotations
                cumulative.append((floatToGoString(bound), acc))  # type: ignore[no-untyped-call]
            duration.add_metric([op], cumulative, sum_value=t.handler_seconds + t.queue_seconds)
        yield handler
        yield queued
        yield duration
        # Gauges.
        backend = "pinned" if rt.l1.pinned else "dram"
        for name, doc, value in (
            ("lmcache_mp_l1_memory_usage_bytes", "Bytes allocated in L1.", stats["used_bytes"]),
            ("lmcache_mp_l1_usage_ratio", "L1 used / capacity.", stats["usage_ratio"]),
            ("lmcache_mp_l1_staging_bytes", "Bytes reserved by writes in flight.", stats["staging_bytes"]),
            ("lmcache_rs_l1_capacity_bytes", "L1 capacity.", stats["capacity_bytes"]),
        ):
            g = GaugeMetricFamily(name, doc, labels=["backend", "l1_tag"])
            g.add_metric([backend, L1_TAG], value)
            yield g
        objects = GaugeMetricFamily("lmcache_rs_l1_objects", "Objects in L1 by state.", labels=["state"])
        objects.add_metric(["resident"], stats["resident_objects"])
        objects.add_metric(["read_locked"], stats["read_locked_objects"])
        objects.add_metric(["staging"], stats["staging_objects"])
        objects.add_metric(["temporary"], stats["temporary_objects"])
        objects.add_metric(["pending_release"], stats["pending_release_objects"])
        yield objects
        yield GaugeMetricFamily(
            "lmcache_rs_l1_pending_release_bytes",
            "Bytes of objects dropped from L1 (clear, delete) that transfers in flight still hold.",
            value=stats["pending_release_bytes"],
        )
        yield GaugeMetricFamily(
            "lmcache_rs_l1_live_read_leases", "Read leases held now.", value=stats["read_leases"]
        )
        jobs = GaugeMetricFamily("lmcache_mp_active_prefetch_jobs", "Prefetch jobs in progress.")
        l2 = rt.l2.status() if rt.l2 is not None else None
        jobs.add_metric([], 0 if l2 is None else l2.prefetch_in_flight)
        yield jobs
        if l2 is not None:
            used = GaugeMetricFamily(
                "lmcache_mp_l2_usage_bytes", "Bytes stored in an L2 adapter.", labels=["l2_name"]
            )
            up = GaugeMetricFamily(
                "lmcache_rs_l2_adapter_up",
                "1 while an L2 adapter answers, 0 after an error.",
                labels=["l2_name"],
            )
            capacity = GaugeMetricFamily(
                "lmcache_rs_l2_capacity_bytes",
                "Bytes an L2 adapter may hold (0: unlimited).",
                labels=["l2_name"],
            )
            l2_objects = GaugeMetricFamily(
                "lmcache_rs_l2_objects", "Objects stored in an L2 adapter.", labels=["l2_name"]
            )
            for a in l2.adapters:
                used.add_metric([a.name], a.total_bytes_used)
                up.add_metric([a.name], int(a.is_healthy))
                capacity.add_metric([a.name], a.total_capacity_bytes)
                l2_objects.add_metric([a.name], a.total_objects)
            yield used
            yield up
            yield capacity
            yield l2_objects
            depth = GaugeMetricFamily(
                "lmcache_rs_l2_write_queue_depth", "Chunks waiting for L2 write-through."
            )
            depth.add_metric([], l2.write_queue_depth)
            yield depth
        yield from self._health()
        yield from self._workers()
        sessions = GaugeMetricFamily("lmcache_rs_active_sessions", "Request sessions held.")
        sessions.add_metric([], rt.engine.control.session_count)
        yield sessions
        limit = GaugeMetricFamily(
            "lmcache_rs_quota_limit_bytes", "IsolatedLRU quota per cache_salt.", labels=["cache_salt"]
        )
        usage = GaugeMetricFamily(
            "lmcache_rs_quota_usage_bytes", "Bytes a cache_salt holds in L1.", labels=["cache_salt"]
        )
        for s in stats["salts"]:
            if s["quota_bytes"] is not None:
                limit.add_metric([s["cache_salt"]], s["quota_bytes"])
            usage.add_metric([s["cache_salt"]], s["bytes"])
        yield limit
        yield usage

    def _health(self) -> Iterator[Metric]:
        rt = self.runtime
        io = rt.io_status()
        yield GaugeMetricFamily(
            "lmcache_rs_healthy",
            "1 while /healthcheck answers 200 (I/O loop and critical/high periodic threads tick).",
            value=int(rt.health_problem(io) is None),
        )
        yield GaugeMetricFamily(
            "lmcache_rs_io_thread_up",
            "1 while the request I/O loop is alive and ticks within --io-stall-timeout-seconds.",
            value=int(rt.io_problem(io) is None),
        )
        yield GaugeMetricFamily(
            "lmcache_rs_l1_healthy",
            "1 unless L1 is full while refusing allocations or its eviction thread is unhealthy "
            "(/status l1_manager.is_healthy).",
            value=int(not rt.l1_problems()),
        )
        up = GaugeMetricFamily(
            "lmcache_rs_periodic_thread_up",
            "1 while a periodic thread runs, ticked within 3 intervals and is not failing.",
            labels=["thread", "level"],
        )
        for t in rt.periodic.threads():
            up.add_metric([t.name, t.level.value], int(t.is_running and t.is_active and not t.is_failing))
        yield up

    def _workers(self) -> Iterator[Metric]:
        seen = GaugeMetricFamily(
            "lmcache_rs_worker_last_seen_seconds",
            "Seconds since a registered worker's last request, by instance.",
            labels=["instance_id", "model_name", "world_size", "transfer_mode", "device"],
        )
        for w in history.workers(self.runtime):
            labels = [str(w.instance_id), w.model_name, str(w.world_size), w.transfer_mode, w.device]
            seen.add_metric(labels, w.last_seen_ago)
        yield seen
        chunk = GaugeMetricFamily(
            "lmcache_rs_kv_chunk_bytes",
            "Bytes of one chunk object of a registered model's layout (per rank).",
            labels=["model_name"],
        )
        for model, n in sorted(history.chunk_bytes_by_model(self.runtime).items()):
            chunk.add_metric([model], n)
        yield chunk


class Metrics:
    """The server's registry and its collector."""

    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = ServerCollector(runtime)
        self.registry.register(self.collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def reset(self) -> None:
        self.collector.reset()
