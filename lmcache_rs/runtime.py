"""Builds the server from one ServerConfig, starts it in order and stops it in reverse.

Nothing is built at import time and nothing is global: tests run several runtimes in one
process. SIGTERM/SIGINT stop intake, let in-flight requests finish and be answered, stop the
periodic threads, and exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

from lmcache_rs import ManualClock
from lmcache_rs.config import ServerConfig
from lmcache_rs.engine.engine import Engine
from lmcache_rs.engine.statefile import WORKERS, Registrations, RestoreReport
from lmcache_rs.engine.warmup import Warmups
from lmcache_rs.http.app import create_app
from lmcache_rs.http.server import HttpServer
from lmcache_rs.http.state import HttpState
from lmcache_rs.observability.health import (
    IoLoopStatus,
    L1Health,
    describe_thread,
    io_problem,
    l1_problems,
)
from lmcache_rs.observability.history import StatsHistory
from lmcache_rs.observability.metrics import Metrics
from lmcache_rs.observability.periodic import Level, PeriodicRegistry, PeriodicThread
from lmcache_rs.storage import warm
from lmcache_rs.storage.l1 import L1Store
from lmcache_rs.storage.l2.tier import L2Tier
from lmcache_rs.storage.shm_pool import auto_name
from lmcache_rs.transport.zmq_server import ZmqServer

if TYPE_CHECKING:
    from lmcache_rs._core import L1Stats

log = logging.getLogger(__name__)


#: How long a Python thread may hold the GIL while another waits (CPython default: 5 ms).
#: The server's threads hand requests to each other through queues; with the default, a busy
#: pool thread delays the I/O and HTTP threads by whole 5 ms slices (measured: /healthcheck at
#: ~46 ms p50 while lookups stream). 200 us keeps those waits short for a small throughput cost.
GIL_SWITCH_INTERVAL_S = 0.0002


#: The write-through thread wakes this often and writes for up to FLUSH_BUDGET_SECONDS a run;
#: a run stuck for longer than L2_FLUSH_MAX_RUN_S (a hung L2) makes the server unhealthy.
L2_FLUSH_INTERVAL_S = 0.1
L2_FLUSH_MAX_RUN_S = 30.0


class Runtime:
    def __init__(self, cfg: ServerConfig, *, clock: ManualClock | None = None) -> None:
        """`clock`: the request I/O loop's heartbeat clock (tests pass a manual one)."""
        self.cfg = cfg
        self._clock = clock
        self.started_at = time.time()
        mp, st = cfg.mp, cfg.storage_manager
        shm_name = None
        # With a state directory L1 lives in the pool for lmcache-driven workers too: it is
        # what a restarted server re-adopts (storage/warm.py).
        if mp.shm_name and (mp.engine_driven or st.state_dir):
            shm_name = auto_name(mp.port) if mp.shm_name == "auto" else mp.shm_name
        # An explicitly named pool must exist; the automatic one may fall back to private L1.
        self.l1 = L1Store(
            st,
            shm_name,
            shm_required=mp.shm_name != "auto",
            keep_pool=bool(st.state_dir),
            spare_pool=warm.spare(st.state_dir) if st.state_dir else None,
        )
        self.warm = warm.WarmReport(mode="off", reason="--state-dir ''")
        try:
            if st.state_dir:
                self.l1.journal, self.warm = warm.open_warm(self.l1, st.state_dir, st.warm_start)
                if self.l1.journal is not None:
                    self.l1.sealer = warm.Sealer(self.l1, self.l1.journal)
            self._build(cfg)
            self.registrations: Registrations | None = None
            self.restored = RestoreReport()
            if st.state_dir:  # engine/statefile.py: workers that never re-register keep working
                pool = self.l1.pool
                where = os.path.join(st.state_dir, pool.name if pool is not None else f"port-{mp.port}")
                os.makedirs(where, mode=0o700, exist_ok=True)
                self.registrations = Registrations(os.path.join(where, WORKERS), self.engine)
                self.restored = self.registrations.restore(engine_driven=pool is not None and pool.reused)
                self.registrations.wrap(self.engine.handlers)
        except BaseException:
            self.l1.close()
            raise

    def _build(self, cfg: ServerConfig) -> None:
        self.engine = Engine(cfg, self.l1)
        self.l1_health = L1Health(self.l1.index.stats()["counters"]["allocation_failures"])
        self.periodic = PeriodicRegistry()
        self.l2: L2Tier | None = None
        if cfg.storage_manager.l2_adapters:
            self.l2 = self.engine.l2 = L2Tier(cfg.storage_manager, self.l1, self.engine.stats.add)
            self.periodic.register(
                PeriodicThread(
                    "l2-write-through",
                    L2_FLUSH_INTERVAL_S,
                    Level.HIGH,
                    self.l2.flush,
                    max_run_seconds=L2_FLUSH_MAX_RUN_S,
                )
            )
            self.periodic.register(
                PeriodicThread("l2-eviction-cycle", 1.0, Level.MEDIUM, self.l2.evict_cycle)
            )
        #: Warm-up prefetches from L2 (`POST /cache/prefetches`), on the tier's prefetch pool.
        self.warmups = Warmups(self.engine, self.l2)
        self.periodic.register(
            PeriodicThread("l1-eviction-cycle", 1.0, Level.CRITICAL, self.l1_eviction_cycle)
        )
        if self.l1.journal is not None:
            self.periodic.register(
                PeriodicThread("l1-journal-compaction", 30.0, Level.MEDIUM, self.l1.journal.maybe_compact)
            )
        self.periodic.register(
            PeriodicThread(
                "session-cleanup",
                min(60.0, cfg.mp.session_ttl_seconds),
                Level.MEDIUM,
                self.engine.expire_sessions,
            )
        )
        if cfg.mp.worker_reap_timeout_seconds > 0:
            self.periodic.register(
                PeriodicThread(
                    "worker-reaper",
                    max(cfg.mp.worker_reap_timeout_seconds / 4, 0.25),
                    Level.MEDIUM,
                    self.reap_workers,
                )
            )
        self.server = ZmqServer(cfg.mp, self.engine, self._clock)
        self.metrics = Metrics(self)
        self.history = StatsHistory(
            self, cfg.http.stats_history_interval_seconds, cfg.http.stats_history_seconds
        )
        if cfg.http.enabled:  # only /stats/history reads it
            self.periodic.register(self.history.thread())
        self.http_state = HttpState(config=cfg)
        self.http: HttpServer | None = None
        if cfg.http.enabled:
            self.http = HttpServer(create_app(self.http_state), cfg.http.http_host, cfg.http.http_port)
        self._stopped = threading.Event()

    def reap_workers(self) -> tuple[str, dict[str, Any]]:
        """The `worker-reaper` job; reaped workers leave the recorded registrations too."""
        out = self.engine.reap_workers()
        if self.registrations is not None:
            self.registrations.sync()
        return out

    # ---- health (observability.health) -------------------------------------------------------

    def l1_eviction_cycle(self) -> tuple[str, dict[str, Any]]:
        """The `l1-eviction-cycle` job: one eviction cycle, then a sample for L1 health."""
        out = self.engine.evict_cycle()
        self.l1_health.tick(self.l1.index.stats()["counters"]["allocation_failures"])
        return out

    def io_status(self) -> IoLoopStatus:
        """The request I/O loop's heartbeat."""
        return self.server.io_status()

    def io_problem(self, io: IoLoopStatus | None = None) -> str | None:
        """Why the request I/O loop is unhealthy (dead or stalled), or None; `io`: a status
        the caller already has."""
        io = self.io_status() if io is None else io
        return io_problem(io, self.cfg.mp.io_stall_timeout_seconds)

    def health_problem(self, io: IoLoopStatus | None = None) -> str | None:
        """Why the server is unhealthy (/healthcheck's 503 reason), or None: the request I/O
        loop died or has not ticked within --io-stall-timeout-seconds, or a critical/high
        periodic thread is not running, has not ticked within 3 intervals or keeps failing
        (e.g. the L1 eviction cycle). `io`: the I/O loop's status when the caller has it."""
        parts = [describe_thread(t) for t in self.periodic.unhealthy()]
        io_reason = self.io_problem(io)
        if io_reason is not None:
            parts.insert(0, io_reason)
        return "; ".join(parts) or None

    def l1_problems(self, stats: L1Stats | None = None) -> list[str]:
        """Why L1 is unhealthy (empty: healthy), from `stats` (index.stats()) or fresh ones."""
        stats = self.l1.index.stats() if stats is None else stats
        st = self.cfg.storage_manager
        return l1_problems(
            stats,
            self.l1_health.recent_failures(stats["counters"]["allocation_failures"]),
            st.eviction_trigger_watermark,
            self.periodic.get("l1-eviction-cycle"),
            st.eviction_policy,
            st.demand_eviction,
        )

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        if self.http is not None:
            self.http.start()  # answers 503 on engine routes until the runtime is published
        self.periodic.start_all()
        self.engine.start_prefetch_pump()
        # Published to HTTP before the first request is answered: a client that got a reply
        # finds /status serving (until the I/O thread starts, /healthcheck says it is not up).
        self.http_state.runtime = self
        self.server.start()
        log.info(
            "lmcache-rs serving on %s: L1 %.2f GiB (%s%s), chunk %d tokens, policy %s, L2 %s",
            self.server.url,
            self.l1.index.capacity_bytes / (1 << 30),
            "pinned" if self.l1.pinned else "DRAM",
            f", shm pool /{self.l1.shm_name}" if self.l1.shm_name else "",
            self.cfg.mp.chunk_size,
            self.cfg.storage_manager.eviction_policy,
            ", ".join(a.name for a in self.l2.adapters) if self.l2 is not None else "none",
        )

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        log.info("stopping: finishing in-flight requests")
        self.server.stop()
        self.engine.stop_prefetch_pump()
        self.engine.close_copier()
        if self.l2 is not None:
            left = self.l2.drain()
            if left:
                log.warning("stopping with %d chunks not written to L2", left)
        self.periodic.stop_all()
        if self.l2 is not None:
            self.l2.close()
        if self.http is not None:
            self.http.stop()
        self.l1.close()
        self._stopped.set()
        log.info("stopped")

    def wait(self) -> None:
        self._stopped.wait()

    def run_until_signal(self) -> None:
        """Starts, blocks until SIGTERM/SIGINT, stops."""
        stop_requested = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("received %s", signal.Signals(signum).name)
            stop_requested.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        while not stop_requested.wait(0.5):
            pass
        self.stop()
