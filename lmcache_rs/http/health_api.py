"""`GET /`, `GET /healthcheck`, `GET /status`.

Health rules (observability.health): /healthcheck is 503 when the engine is not initialized,
a critical/high periodic thread is unhealthy, or the request I/O loop died or stalled. L1's
`is_healthy` in /status also turns false when L1 is full while allocations fail; that alone
does not fail /healthcheck (a restart would only empty the cache), it shows in /status.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Response, Router, get
from litestar.di import NamedDependency

from lmcache_rs.http.errors import ApiError
from lmcache_rs.http.state import HttpState

if TYPE_CHECKING:
    from lmcache_rs._core import MemoStats
    from lmcache_rs.runtime import Runtime


class Root(msgspec.Struct):
    status: str
    service: str


class Health(msgspec.Struct, omit_defaults=True):
    status: str
    reason: str | None = None


@get("/", sync_to_thread=False)
def root() -> Root:
    """Basic liveness: the HTTP server is running."""
    return Root(status="ok", service="LMCache HTTP API")


@get("/healthcheck", sync_to_thread=False)
def healthcheck(http_state: NamedDependency[HttpState]) -> Response[Health]:
    """200 when the engine is initialized, its request I/O loop ticks and its critical periodic
    threads tick; else 503 with the reason."""
    runtime = http_state.runtime
    if runtime is None:
        return Response(Health(status="unhealthy", reason="engine not initialized"), status_code=503)
    problem = runtime.health_problem()
    if problem is not None:
        return Response(Health(status="unhealthy", reason=problem), status_code=503)
    return Response(Health(status="healthy"), status_code=200)


def _memo(s: MemoStats) -> dict[str, int]:
    return {
        "entries": s.entries,
        "key_bytes": s.key_bytes,
        "capacity": s.capacity,
        "hits": s.hits,
        "misses": s.misses,
    }


@get("/status", sync_to_thread=True)
def status(runtime: NamedDependency[Runtime]) -> dict[str, Any]:
    """A snapshot of the engine: L1, registered workers, sessions, periodic threads, the
    request I/O loop. `is_healthy` at the top is /healthcheck's verdict; `storage_manager`'s
    adds L1 (`l1_manager.problems`) and L2 health."""
    stats = runtime.l1.index.stats()
    cfg = runtime.cfg
    contexts = runtime.engine.contexts.all()
    evict = runtime.periodic.get("l1-eviction-cycle")
    l1_problems = runtime.l1_problems(stats)
    l1 = {
        "is_healthy": not l1_problems,
        "problems": l1_problems,
        "recent_allocation_failures": runtime.l1_health.recent_failures(
            stats["counters"]["allocation_failures"]
        ),
        "total_object_count": stats["total_objects"],
        "resident_object_count": stats["resident_objects"],
        "write_locked_count": stats["staging_objects"],
        "read_locked_count": stats["read_locked_objects"],
        "temporary_count": stats["temporary_objects"],
        "staging_object_count": stats["staging_objects"],
        "staging_bytes": stats["staging_bytes"],
        "read_lease_count": stats["read_leases"],
        "pending_release_object_count": stats["pending_release_objects"],
        "pending_release_bytes": stats["pending_release_bytes"],
        "memory_used_bytes": stats["used_bytes"],
        "memory_total_bytes": stats["capacity_bytes"],
        "memory_configured_bytes": cfg.storage_manager.l1_size_bytes,
        "memory_usage_ratio": stats["usage_ratio"],
        "free_blocks": stats["free_blocks"],
        "largest_free_block_bytes": stats["largest_free_block"],
        "pinned": runtime.l1.pinned,
        "prefaulted_bytes": runtime.l1.prefaulted_bytes,
        "shm_pool": runtime.l1.shm_name or None,
        "shm_pool_error": runtime.l1.pool_error,
        "warm_start": msgspec.to_builtins(runtime.warm),
        "journal_seals": None if runtime.l1.sealer is None else runtime.l1.sealer.stats(),
        "write_ttl_seconds": cfg.storage_manager.l1_write_ttl_seconds,
        "read_ttl_seconds": cfg.storage_manager.l1_read_ttl_seconds,
        "counters": stats["counters"],
    }
    eviction = {
        "is_healthy": bool(evict and evict.is_running and evict.is_active and not evict.is_failing),
        "thread_alive": bool(evict and evict.is_running),
        "eviction_policy": cfg.storage_manager.eviction_policy,
        "trigger_watermark": cfg.storage_manager.eviction_trigger_watermark,
        "eviction_ratio": cfg.storage_manager.eviction_ratio,
        "demand_eviction": cfg.storage_manager.demand_eviction,
    }
    io = runtime.io_status()
    io_reason = runtime.io_problem(io)
    problem = runtime.health_problem(io)
    healthy = problem is None
    l2 = runtime.l2.status() if runtime.l2 is not None else None
    storage = {
        "is_healthy": healthy and not l1_problems and (l2 is None or l2.is_healthy),
        "l1_manager": l1,
        "l1_eviction_controller": eviction,
        "l1_usage": [stats["used_bytes"], stats["capacity_bytes"]],
        "cache_salts": stats["salts"],
        "num_l2_adapters": 0 if l2 is None else len(l2.adapters),
        "l2_adapters": [] if l2 is None else l2.adapters,
        "l2": l2,
    }
    return {
        "is_healthy": healthy,
        "reason": problem,
        "engine_type": "MPCacheEngine",
        "chunk_size": cfg.mp.chunk_size,
        "hash_algorithm": cfg.mp.hash_algorithm,
        "supported_transfer_mode": cfg.mp.supported_transfer_mode,
        "registered_gpu_ids": sorted(c.instance_id for c in contexts),
        "gpu_context_meta": {str(c.instance_id): c.status() for c in contexts},
        "active_sessions": runtime.engine.control.session_count,
        "hash_memo": _memo(runtime.engine.chain_memo.stats()),
        "active_prefetch_jobs": 0 if l2 is None else l2.prefetch_in_flight,
        "storage_manager": storage,
        "restored_workers": msgspec.to_builtins(runtime.restored),
        "worker_liveness": {
            "enabled": cfg.mp.worker_reap_timeout_seconds > 0,
            "reap_timeout_seconds": cfg.mp.worker_reap_timeout_seconds,
            "registration_grace_seconds": cfg.mp.worker_registration_grace_seconds,
            "tracked_instances": len(contexts),
        },
        "request_server": {
            "url": runtime.server.url,
            "requests_total": runtime.server.requests_total,
            "pending_requests": runtime.server.pending,
            "errors": dict(runtime.server.errors),
        },
        "io_thread": {
            "is_healthy": io_reason is None,
            "reason": io_reason,
            "alive": io.alive,
            "last_tick_ago": io.last_tick_ago,
            "stall_timeout_seconds": cfg.mp.io_stall_timeout_seconds,
            "requests_received": io.requests_received,
            "replies_sent": io.replies_sent,
            "pending_requests": io.pending_requests,
            "error": io.error,
        },
    }


router = Router(path="/", route_handlers=[root, healthcheck, status], tags=["health"])

__all__ = ["ApiError", "router"]
