"""The L2 tier: write-through from L1, prefetch into L1, eviction, status (spec F, E.3, E.7).

* **Write-through.** `enqueue` puts every chunk a store admitted into L1 on a bounded queue
  (never blocks the store: a full queue skips the chunk and counts it). `flush`, a periodic
  job, read-locks each chunk in L1, writes its bytes from the L1 buffer to every available
  adapter (making room under the adapter's capacity first) and unlocks it.
* **Prefetch.** `load` (run by a lookup that missed in L1, on the prefetch pool) asks each
  adapter how much of the missing prefix it holds for *every* rank, takes the adapter with the
  longest prefix, reserves L1 space and reads the objects straight into it (verifying each),
  and admits them read-locked for the lookup's readers: temporary objects (gone after their
  reads) or, with `--l2-prefetch-policy retain`, ordinary ones.
* **Failures.** An adapter that raises is paused for a second (`available()` is false) and
  its error counted; its writes are skipped and counted, lookups just see a shorter hit. A
  corrupt object is deleted and reported as a miss. L1 keeps serving throughout.
* **Eviction.** `evict_cycle`, periodic: per adapter, IsolatedLRU quotas (the same registry
  as L1's, allowlist) and capacity watermark/ratio; with a Redis TTL, forgets expired objects.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from lmcache_rs import KeyScope
from lmcache_rs.config import FsL2Config, L2AdapterConfig, RedisL2Config, StorageConfig
from lmcache_rs.storage.l1 import L1Store
from lmcache_rs.storage.l2.base import HEADER, AdapterStatus, IntegrityError, L2Adapter, L2Key, L2Unavailable

log = logging.getLogger(__name__)

#: Writer ids of prefetch loads in the L1 index (client instance ids stay far below).
PREFETCH_WRITER_BASE = 1 << 62
#: Longest one flush run writes before it yields (the next run goes on).
FLUSH_BUDGET_SECONDS = 0.5
#: Time a graceful stop gives the write queue to drain.
DRAIN_SECONDS = 30.0

Count = Callable[..., None]


def build_adapter(cfg: L2AdapterConfig, default_policy: str) -> L2Adapter:
    assert cfg.name is not None
    if isinstance(cfg, FsL2Config):
        from lmcache_rs.storage.l2.fs import FsAdapter  # noqa: PLC0415

        return FsAdapter(cfg.name, cfg.base_path, cfg.capacity_bytes, cfg.eviction, default_policy, cfg.fsync)
    if isinstance(cfg, RedisL2Config):
        from lmcache_rs.storage.l2.redis import RedisAdapter  # noqa: PLC0415

        return RedisAdapter(
            cfg.name,
            cfg.url,
            cfg.key_prefix,
            cfg.ttl_seconds,
            cfg.capacity_bytes,
            cfg.eviction,
            default_policy,
            cluster=cfg.cluster,
            socket_timeout=cfg.socket_timeout_seconds,
        )
    raise TypeError(f"no adapter for {type(cfg).__name__}")  # pragma: no cover - config is closed


class TierStatus(msgspec.Struct, kw_only=True):
    is_healthy: bool
    store_policy: str
    prefetch_policy: str
    write_queue_depth: int
    write_queue_capacity: int
    prefetch_max_in_flight: int
    prefetch_in_flight: int
    adapters: list[AdapterStatus]


class L2Tier:
    def __init__(self, cfg: StorageConfig, l1: L1Store, count: Count) -> None:
        self.l1 = l1
        self.index = l1.index
        self.count = count
        self.adapters: list[L2Adapter] = []
        try:
            for a in cfg.l2_adapters:
                self.adapters.append(build_adapter(a, cfg.eviction_policy))
        except BaseException:
            self.close()
            raise
        for a in self.adapters:
            a.on_error = lambda name, op: count("l2_errors", name, op)
        self.store_policy = cfg.l2_store_policy
        self.prefetch_policy = cfg.l2_prefetch_policy
        self.temporary = cfg.l2_prefetch_policy != "retain"
        self.queue: queue.Queue[tuple[KeyScope, bytes]] = queue.Queue(cfg.l2_write_queue_size)
        self.max_in_flight = cfg.l2_prefetch_max_in_flight
        self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="l2-prefetch")
        self._jobs_lock = threading.Lock()
        self.jobs = 0
        self._writers = itertools.count(PREFETCH_WRITER_BASE)
        self._flush_lock = threading.Lock()

    def close(self) -> None:
        if hasattr(self, "_pool"):
            self._pool.shutdown(wait=True, cancel_futures=True)
        for a in self.adapters:
            a.close()

    # ---- write-through -----------------------------------------------------------------------

    def enqueue(self, scope: KeyScope, hashes: list[bytes]) -> None:
        for i, h in enumerate(hashes):
            try:
                self.queue.put_nowait((scope, h))
            except queue.Full:
                self.count("l2_store_skipped", "*", "queue_full", n=len(hashes) - i)
                return

    def flush(self, budget: float = FLUSH_BUDGET_SECONDS) -> tuple[str, dict[str, Any]]:
        """Writes queued chunks to L2 for up to `budget` seconds (a periodic job)."""
        deadline = time.monotonic() + budget
        written = 0
        with self._flush_lock:
            while time.monotonic() < deadline:
                try:
                    scope, h = self.queue.get_nowait()
                except queue.Empty:
                    break
                written += self._write_through(scope, h)
        depth = self.queue.qsize()
        return f"wrote {written} objects, {depth} queued", {"written": written, "queue_depth": depth}

    def drain(self, timeout: float = DRAIN_SECONDS) -> int:
        """On a graceful stop: flushes what is queued, for at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.queue.empty() and time.monotonic() < deadline:
            self.flush(budget=max(deadline - time.monotonic(), 0.0))
        return self.queue.qsize()

    def _write_through(self, scope: KeyScope, h: bytes) -> int:
        grant = self.index.lease_read(scope, [h], 1)
        if grant.hit == 0:
            self.count("l2_store_skipped", "*", "evicted_from_l1")
            return 0
        written = 0
        all_stored = True
        try:
            offset, size = grant.offsets[0], grant.sizes[0]
            payload = self.l1.view(offset, size).numpy().data
            key = L2Key.of(scope, h)
            for a in self.adapters:
                if not a.available():
                    self.count("l2_store_skipped", a.name, "unavailable")
                    all_stored = False
                    continue
                try:
                    a.make_room(HEADER.size + len(key.encode()) + payload.nbytes)
                    if a.put(key, payload, self.l1.sealed(offset)):
                        self.count("l2_store_chunks", a.name, scope.cache_salt)
                        written += 1
                    a.succeeded()
                except (L2Unavailable, OSError) as e:
                    a.failed("store", e)
                    self.count("l2_store_skipped", a.name, "error")
                    all_stored = False
        finally:
            self.index.release(grant.lease)
        if self.store_policy == "skip_l1" and all_stored:
            self.index.delete(scope, [h])
        return written

    # ---- prefetch ----------------------------------------------------------------------------

    def submit(self, job: Callable[[], None]) -> bool:
        """Runs `job` on the prefetch pool; False (not run) when the backlog is full."""
        with self._jobs_lock:
            if self.jobs >= 4 * self.max_in_flight:
                return False
            self.jobs += 1

        def run() -> None:
            try:
                job()
            except Exception:
                log.exception("L2 prefetch job failed")
            finally:
                with self._jobs_lock:
                    self.jobs -= 1

        try:
            self._pool.submit(run)
        except RuntimeError:  # shutting down
            with self._jobs_lock:
                self.jobs -= 1
            return False
        return True

    def load(
        self,
        scopes: list[KeyScope],
        hashes: list[bytes],
        readers: int,
        model: str,
        temporary: bool | None = None,
    ) -> tuple[int, list[int]]:
        """Loads the longest prefix of `hashes` that one adapter holds for every scope into L1,
        held by one read lease per scope with `readers` shares on each chunk. Returns its length
        (0: nothing loaded) and the leases (the caller owns them; empty when nothing loaded).
        `temporary`: whether loaded objects leave L1 with their last read (default: the
        prefetch policy's choice; a warm-up passes False to keep them as ordinary objects)."""
        temporary = self.temporary if temporary is None else temporary
        plan = self._plan(scopes, hashes)
        if plan is None:
            return 0, []
        n, adapter, lengths = plan
        self.count("l2_prefetch_lookup_chunks", adapter.name, scopes[0].cache_salt, n=n)
        writer = next(self._writers)
        got: list[tuple[int, int]] = []
        for s, row in zip(scopes, lengths, strict=True):
            try:
                k, lease = self._load_scope(
                    adapter, s, hashes[:n], row[:n], readers, writer, model, temporary
                )
            except Exception:  # release what earlier scopes leased, then report
                for _, lease in got:
                    self.index.release(lease)
                raise
            got.append((k, lease))
            n = min(n, k)
        for k, lease in got:
            self.index.release(lease, n, k)
        return n, ([lease for _, lease in got] if n else [])

    def _plan(
        self, scopes: list[KeyScope], hashes: list[bytes]
    ) -> tuple[int, L2Adapter, list[list[int | None]]] | None:
        best: tuple[int, L2Adapter, list[list[int | None]]] | None = None
        for a in self.adapters:
            if not a.available():
                continue
            try:
                rows = [a.lengths([L2Key.of(s, h) for h in hashes]) for s in scopes]
                a.succeeded()
            except (L2Unavailable, OSError) as e:
                a.failed("lookup", e)
                continue
            n = 0
            while n < len(hashes) and all(r[n] is not None for r in rows):
                n += 1
            if n and (best is None or n > best[0]):
                best = (n, a, rows)
        return best

    def _load_scope(
        self,
        a: L2Adapter,
        scope: KeyScope,
        hashes: list[bytes],
        lengths: list[int | None],
        readers: int,
        writer: int,
        model: str,
        temporary: bool,
    ) -> tuple[int, int]:
        """Loads chunks in order until one fails; returns how many are now in L1 and the read
        lease (0: none) holding them, one item per chunk. On an exception the lease is ended."""
        lease = 0
        try:
            for i, (h, size) in enumerate(zip(hashes, lengths, strict=True)):
                assert size is not None
                ok, lease = self._load_chunk(a, scope, h, size, readers, writer, model, lease, temporary)
                if not ok:
                    return i, lease
        except BaseException:
            self.index.release(lease)
            raise
        return len(hashes), lease

    def _load_chunk(
        self,
        a: L2Adapter,
        scope: KeyScope,
        h: bytes,
        size: int,
        readers: int,
        writer: int,
        model: str,
        lease: int,
        temporary: bool,
    ) -> tuple[bool, int]:
        """Loads one chunk into L1 (or finds it there) and adds it to `lease` (0: a new one).
        Returns whether it is held, and the lease."""
        r = self.index.reserve_write(scope, [h], size, writer)[0]
        status, off, alloc = r.status, r.offset, r.size
        if status == "resident":  # stored meanwhile (or by another lookup): lease it
            grant = self.index.lease_read(scope, [h], readers, lease)
            return grant.hit == 1, grant.lease
        if status != "reserved":
            self.count("l2_prefetch_failure_chunks", "l1_oom" if status == "oom" else status, model)
            return False, lease
        self.l1.journal_reserved([(off, alloc)])
        try:
            digest = a.get_into(L2Key.of(scope, h), self.l1.view(off, size).numpy().data)
            a.succeeded()
        except IntegrityError as e:
            log.warning("L2 %s: corrupt object dropped (%s)", a.name, e)
            self.count("l2_corrupt_objects", a.name)
            digest = None
        except (L2Unavailable, OSError) as e:
            a.failed("load", e)
            digest = None
        except Exception:  # a bug: the chunks locked so far stay valid, this one is dropped
            log.exception("L2 %s: load failed", a.name)
            digest = None
        if digest is not None:
            self.l1.seal(off, size, digest)  # already verified: no second hash pass
            self.l1.journal_sealed(scope, [h], [(off, size)], [digest])
        else:
            self.index.abort_write(scope, [h], writer)
            self.count("l2_prefetch_failure_chunks", "not_found", model)
            return False, lease
        # Admitted (or found resident) read-locked into the lease; a clear meanwhile drops it.
        done = self.index.finish_write(scope, [h], writer, readers, temporary, lease)
        status = done.statuses[0]
        if status == "admitted":
            self.count("l2_prefetch_load_chunks", a.name, scope.cache_salt)
        return status in ("admitted", "resident"), done.lease

    # ---- eviction and status -----------------------------------------------------------------

    def evict_cycle(self) -> tuple[str, dict[str, Any]]:
        quota_of = self.index.get_quota
        evicted = 0
        extra: dict[str, Any] = {}
        for a in self.adapters:
            if not a.available():
                continue
            try:
                expire = getattr(a, "expire_stale", None)
                expired = expire() if expire is not None else 0
                r = a.evict_cycle(quota_of)
                a.succeeded()
            except (L2Unavailable, OSError) as e:
                a.failed("evict", e)
                continue
            if r.quota_objects:
                self.count("l2_evicted_chunks", a.name, "quota", n=r.quota_objects)
            if r.watermark_objects:
                self.count("l2_evicted_chunks", a.name, "watermark", n=r.watermark_objects)
            evicted += r.quota_objects + r.watermark_objects
            extra[a.name] = {"quota": r.quota_objects, "watermark": r.watermark_objects, "expired": expired}
        return f"evicted {evicted} objects", extra

    def clear(self, name: str | None = None) -> list[tuple[str, int, int, str | None]]:
        """Deletes every object of each adapter (or of the one named): per adapter (name,
        objects, bytes, error or None). Chunks still queued for write-through are written
        afterwards if L1 still holds them."""
        out: list[tuple[str, int, int, str | None]] = []
        with self._flush_lock:  # no write-through in the middle of a clear
            for a in self.adapters:
                if name is not None and a.name != name:
                    continue
                if not a.available():
                    out.append((a.name, 0, 0, f"unavailable ({a.last_error}); retried in a second"))
                    continue
                try:
                    objects, freed = a.clear()
                    a.succeeded()
                except (L2Unavailable, OSError) as e:
                    a.failed("clear", e)
                    out.append((a.name, 0, 0, f"{type(e).__name__}: {e}"))
                    continue
                self.count("l2_clears", a.name)
                log.info("L2 %s cleared: %d objects (%d bytes)", a.name, objects, freed)
                out.append((a.name, objects, freed, None))
        return out

    def usage_by_salt(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for st in self.status().adapters:
            for salt, b in st.bytes_by_cache_salt.items():
                out[salt] = out.get(salt, 0) + b
        return out

    def status(self) -> TierStatus:
        adapters = [a.status() for a in self.adapters]
        with self._jobs_lock:
            jobs = self.jobs
        return TierStatus(
            is_healthy=all(a.is_healthy for a in adapters),
            store_policy=self.store_policy,
            prefetch_policy=self.prefetch_policy,
            write_queue_depth=self.queue.qsize(),
            write_queue_capacity=self.queue.maxsize,
            prefetch_max_in_flight=self.max_in_flight,
            prefetch_in_flight=jobs,
            adapters=adapters,
        )
