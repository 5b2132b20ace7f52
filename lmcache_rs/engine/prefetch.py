"""L2 prefetch: the `l2-prefetch-pump` thread hands the native lookups' L2 prefetch jobs
(`ControlPlane.next_prefetch`) to the L2 tier's pool and reports each job's end back to the
control plane, which completes the lookup's result if its session still waits for it."""

from __future__ import annotations

import functools
import logging
import threading

from lmcache_rs import KeyScope, PrefetchJob, mp_kv_rank
from lmcache_rs.engine.shared import Shared

log = logging.getLogger(__name__)


class Prefetch:
    def __init__(self, sh: Shared) -> None:
        self.sh = sh
        self._pump: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        """Starts the thread that hands the native lookups' L2 prefetch jobs to the L2 tier."""
        if self.sh.l2 is not None and self._pump is None:
            self._pump = threading.Thread(target=self._run, name="l2-prefetch-pump", daemon=True)
            self._pump.start()

    def stop(self) -> None:
        self._stop.set()
        if self._pump is not None:
            self._pump.join(5.0)

    def _run(self) -> None:
        l2, control = self.sh.l2, self.sh.control
        assert l2 is not None
        while not self._stop.is_set():
            job = control.next_prefetch(0.5)
            if job is None:
                continue
            if not l2.submit(functools.partial(self._prefetch, job)):
                self.sh.stats.add("l2_prefetch_skipped", job.model_name, "busy")
                control.prefetch_done(job, 0, [])

    def _prefetch(self, job: PrefetchJob) -> None:
        """Loads what L1 missed from L2 and completes the lookup's result (installed by the
        control plane only if the session still waits for this lookup)."""
        assert self.sh.l2 is not None
        loaded, leases = 0, list[int]()
        try:
            scopes = [
                KeyScope(job.model_name, mp_kv_rank(job.world_size, r), 0, job.cache_salt)
                for r in range(job.world_size)
            ]
            loaded, leases = self.sh.l2.load(scopes, job.hashes, job.readers, job.model_name)
        except Exception:
            log.exception("L2 prefetch for %s failed", job.request_id)
        finally:
            self.sh.control.prefetch_done(job, loaded, leases)
