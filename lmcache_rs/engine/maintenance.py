"""Maintenance of L1 and the sessions, run by the runtime's periodic loops and the HTTP API:
session expiry (with the engine-driven prepared operations whose locks expired), `clear`
(spec E.8, L1 only) and the eviction cycle."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lmcache_rs.engine.shared import Shared

if TYPE_CHECKING:
    from lmcache_rs._core import ClearReport

log = logging.getLogger(__name__)


class Maintenance:
    def __init__(self, sh: Shared, expire_prepared: Callable[[], tuple[int, int]]) -> None:
        self.sh = sh
        self._expire_prepared = expire_prepared

    def expire_sessions(self) -> tuple[str, dict[str, Any]]:
        old = self.sh.control.expire_sessions(self.sh.cfg.mp.session_ttl_seconds)
        stores, reads = self._expire_prepared()
        return f"Removed {old} expired sessions", {
            "removed_sessions": old,
            "expired_prepared_stores": stores,
            "expired_prepared_retrieves": reads,
        }

    def clear(self, force: bool) -> ClearReport:
        """Spec E.8 (L1 only), for the HTTP API (the `clear` operation runs natively).
        Forced, objects still held by transfers in flight leave the index now and their bytes
        return to the arena when those transfers end."""
        report = self.sh.index.clear(force)
        self.sh.l1.journal_cleared()
        log.info(
            "clear(force=%s): %d objects (%d bytes) dropped, %d of them (%d bytes) pending the end "
            "of transfers in flight",
            force,
            report["objects"],
            report["bytes"],
            report["pending_objects"],
            report["pending_bytes"],
        )
        self.sh.stats.add("l1_clears", "forced" if force else "normal")
        return report

    def evict_cycle(self) -> tuple[str, dict[str, Any]]:
        r = self.sh.index.evict_cycle()
        evicted = r["quota_evicted_objects"] + r["watermark_evicted_objects"]
        self.sh.stats.add("eviction_loop_ticks")
        if r["triggered"]:
            self.sh.stats.add("eviction_loop_triggered")
        return f"evicted {evicted} objects", dict(r)
