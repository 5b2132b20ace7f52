"""The MP cache engine: the composition root of the data services (spec B.4, D.1, D.2, E.3).

The control operations (lookup, prefetch status, sessions, ping, clear...) run in Rust on the
request I/O thread (`_core.ControlPlane`, rust/control/); their state (sessions, worker
liveness, layouts, stats) lives there. The data operations run on the transport's Python
workers, split into services with one job each, every one holding the same small context
(`shared.Shared`: config, L1, index, control plane, stats, worker contexts, L2):

| module | service | what |
|---|---|---|
| `registrations.py` | `Registrations` | register/unregister (both modes), drop, reap, block reports |
| `lmcache_driven.py` | `LmcacheDriven` | `store`, `retrieve`: the server copies the KV |
| `engine_driven.py` | `EngineDriven` | prepare/commit store and retrieve, prepared-slot expiry |
| `prefetch.py` | `Prefetch` | the `l2-prefetch-pump` thread: lookups' L2 jobs to the L2 tier |
| `maintenance.py` | `Maintenance` | session expiry, `clear`, the eviction cycle |
| `shared.py` | `Shared` | the context above and the request checks the services share |

`Engine` builds them, keeps the handler table the transport serves (`handlers`, `refusal`)
and the entry points the runtime, HTTP API and tests use. A handler returns the reply payload
(None: no payload frame) or raises `ProtocolError` with a code for the error frame. A store or
retrieve calls into the Rust core once where it starts (hashes, leases or reservations of its
whole plan) and once where it ends (release or admission, counters): rust/control/data.rs,
always with the GIL released; byte copies are torch ops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lmcache_rs import ChainMemo, ControlPlane
from lmcache_rs.config import ServerConfig
from lmcache_rs.engine.contexts import ContextRegistry
from lmcache_rs.engine.engine_driven import EngineDriven
from lmcache_rs.engine.lmcache_driven import LmcacheDriven
from lmcache_rs.engine.maintenance import Maintenance
from lmcache_rs.engine.prefetch import Prefetch
from lmcache_rs.engine.registrations import Registrations
from lmcache_rs.engine.shared import EngineStats, Shared
from lmcache_rs.storage.l1 import L1Store
from lmcache_rs.storage.l2.tier import L2Tier
from lmcache_rs.transfer.copier import CpuCopier, default_threads

if TYPE_CHECKING:
    from lmcache_rs._core import ClearReport

__all__ = ["ENGINE_DRIVEN_OPS", "LMCACHE_DRIVEN_OPS", "NATIVE_OPS", "Engine", "EngineStats"]

#: The operations of each transfer mode (spec D), served only where --supported-transfer-mode
#: includes it.
LMCACHE_DRIVEN_OPS = ("register_kv_cache", "unregister_kv_cache", "store", "retrieve")
ENGINE_DRIVEN_OPS = (
    "register_kv_cache_engine_driven_context",
    "unregister_kv_cache_engine_driven_context",
    "prepare_store",
    "commit_store",
    "prepare_retrieve",
    "commit_retrieve",
)

#: The operations the Rust I/O thread answers itself (rust/control/server.rs).
NATIVE_OPS = (
    "noop",
    "ping",
    "lookup",
    "query_prefetch_status",
    "wait_prefetch_status",
    "end_session",
    "free_lookup_locks",
    "clear",
    "get_chunk_size",
    "get_experimental",
)

#: L2 prefetch jobs waiting for the L2 tier's pool at most (beyond: the lookup answers its L1
#: hit at once).
PREFETCH_QUEUE = 64


class Engine:
    def __init__(self, cfg: ServerConfig, l1: L1Store) -> None:
        memo = ChainMemo(cfg.mp.hash_memo_chunks)
        control = ControlPlane(
            l1.index,
            memo,
            cfg.mp.chunk_size,
            l2_prefetch=bool(cfg.storage_manager.l2_adapters),
            prefetch_queue=PREFETCH_QUEUE,
        )
        self.shared = sh = Shared(
            cfg=cfg,
            l1=l1,
            index=l1.index,
            chain_memo=memo,
            control=control,
            contexts=ContextRegistry(control),
            stats=EngineStats(control),
            copier=CpuCopier(cfg.mp.cpu_copy_threads or default_threads()),
        )
        self.cfg, self.l1, self.index = cfg, l1, l1.index
        self.chunk_size, self.null_block_id = sh.chunk_size, sh.null_block_id
        self.chain_memo, self.control, self.contexts, self.stats = memo, control, sh.contexts, sh.stats
        self.registrations = Registrations(sh)
        self.lmcache_driven = LmcacheDriven(sh)
        self.engine_driven = EngineDriven(sh)
        self.prefetch = Prefetch(sh)
        self.maintenance = Maintenance(sh, self.engine_driven.expire_prepared)
        reg, lm, ed = self.registrations, self.lmcache_driven, self.engine_driven
        #: The data operations served by Python workers.
        self.handlers: dict[str, Callable[..., Any]] = {
            "register_kv_cache": reg.register_kv_cache,
            "unregister_kv_cache": reg.unregister_kv_cache,
            "store": lm.store,
            "retrieve": lm.retrieve,
            "report_block_allocation": reg.report_block_allocation,
        }
        if not cfg.mp.lmcache_driven:
            for name in LMCACHE_DRIVEN_OPS:
                del self.handlers[name]
        if cfg.mp.engine_driven:
            self.handlers.update(
                {
                    "register_kv_cache_engine_driven_context": reg.register_engine_driven,
                    "unregister_kv_cache_engine_driven_context": reg.unregister_kv_cache,
                    "prepare_store": ed.prepare_store,
                    "commit_store": ed.commit_store,
                    "prepare_retrieve": ed.prepare_retrieve,
                    "commit_retrieve": ed.commit_retrieve,
                }
            )
        # Entry points of the runtime, the HTTP API, the state file and tests.
        self.register_kv_cache = reg.register_kv_cache
        self.register_engine_driven = reg.register_engine_driven
        self.unregister_kv_cache = reg.unregister_kv_cache
        self.drop_instance = reg.drop_instance
        self.reap_workers = reg.reap_workers
        self.store, self.retrieve = lm.store, lm.retrieve
        self.start_prefetch_pump, self.stop_prefetch_pump = self.prefetch.start, self.prefetch.stop
        self.expire_sessions = self.maintenance.expire_sessions
        #: Joins the copy helpers; call after the request server stopped.
        self.close_copier = sh.copier.close
        self.evict_cycle = self.maintenance.evict_cycle

    @property
    def l2(self) -> L2Tier | None:
        """The L2 tier, set by the runtime when adapters are configured."""
        return self.shared.l2

    @l2.setter
    def l2(self, tier: L2Tier | None) -> None:
        self.shared.l2 = tier

    def clear(self, force: bool) -> ClearReport:
        return self.maintenance.clear(force)

    def refusal(self, op: str) -> str | None:
        """Why a known operation is not served here (None: it is). The handler table is the one
        record of what this server serves."""
        if op in self.handlers or op in NATIVE_OPS:
            return None
        if op in LMCACHE_DRIVEN_OPS or op in ENGINE_DRIVEN_OPS:
            return (
                f"operation {op!r} is not served with --supported-transfer-mode "
                f"{self.cfg.mp.supported_transfer_mode}"
            )
        return f"operation {op!r} is not supported by this server"
