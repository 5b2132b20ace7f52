"""Warm-up prefetches (`POST /cache/prefetches`, spec I.1): load a prompt's chunks from L2 into
L1 before its traffic arrives, so its first lookup hits in L1.

A warm-up hashes the prompt as a lookup does, finds how much of it every kv rank already has in
L1, and asks the L2 tier for the rest on the tier's prefetch pool, exactly as a lookup's L2
prefetch does (the longest prefix one adapter holds for every rank), except that:

* the objects it loads are **ordinary** L1 objects whatever `--l2-prefetch-policy` says (a
  lookup's are temporary by default: gone after their reads), and
* it holds nothing: the read leases the tier hands back are released at once, so the warmed
  chunks are evictable like any other resident object.

Only prefix semantics make sense for a prompt's KV, so `found_keys` counts the keys of the
prefix that is now resident for every rank (a chunk after the first missing one is useless to
a lookup and is not loaded). Jobs are kept in a bounded record of recent ones (`MAX_JOBS`).

Hybrid layouts (several object groups or a sliding window) are refused: a lookup does not
prefetch them from L2 either (engine.lookup), and a windowed group stores only the chunks of
each prompt's last window, which a prefix load cannot express.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from lmcache_rs import (
    InvalidKeyError,
    KeyScope,
    LmcacheCoreError,
    chunk_hashes,
    mp_kv_rank,
    validate_model,
    validate_salt,
)

if TYPE_CHECKING:
    from lmcache_rs.engine.engine import Engine
    from lmcache_rs.storage.l2.tier import L2Tier

log = logging.getLogger(__name__)

#: Most tokens one warm-up may name (LMCache's limit).
MAX_TOKENS = 1_000_000
#: The key's kv rank field holds the world size in 8 bits.
MAX_WORLD_SIZE = 255
#: Jobs remembered for `GET /cache/prefetches/{id}`; the oldest finished ones are forgotten
#: first (pending ones are bounded by the tier's backlog, far below this).
MAX_JOBS = 1024

Refusal = Literal["bad_request", "no_l2", "no_layout", "hybrid", "busy"]
JobStatus = Literal["pending", "completed", "failed"]


class WarmupRefused(Exception):
    """A warm-up that was not started; `kind` says why (the HTTP layer picks the code)."""

    def __init__(self, kind: Refusal, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class WarmupJob:
    request_id: str
    model_name: str
    world_size: int
    cache_salt: str
    #: Complete chunks of the prompt.
    chunks: int
    #: Keys of the prompt: chunks x kv ranks.
    total_keys: int
    status: JobStatus = "pending"
    #: Chunks from the start resident for every rank when the job ended: already in L1, or
    #: loaded from L2 by it.
    found_chunks: int = 0
    #: Of those, chunks that were already in L1 when it started.
    l1_chunks: int = 0
    error: str | None = None
    submitted_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    @property
    def ranks(self) -> int:
        return self.total_keys // self.chunks if self.chunks else 0

    @property
    def found_keys(self) -> int:
        return self.found_chunks * self.ranks


class Warmups:
    """Starts warm-ups on the L2 tier's prefetch pool and remembers recent ones."""

    def __init__(self, engine: Engine, l2: L2Tier | None, max_jobs: int = MAX_JOBS) -> None:
        self.engine = engine
        self.l2 = l2
        self.max_jobs = max_jobs
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, WarmupJob] = OrderedDict()

    def submit(
        self, model_name: str, world_size: int, token_ids: list[int], cache_salt: str
    ) -> WarmupJob | None:
        """Starts a warm-up; None when the prompt has no complete chunk (nothing to do).
        Raises WarmupRefused when it cannot start."""
        if len(token_ids) > MAX_TOKENS:
            raise WarmupRefused("bad_request", f"{len(token_ids)} tokens: at most {MAX_TOKENS:,} a call")
        if not 1 <= world_size <= MAX_WORLD_SIZE:
            raise WarmupRefused("bad_request", f"world_size must be in 1..{MAX_WORLD_SIZE}")
        try:
            validate_model(model_name)
            validate_salt(cache_salt)
        except (InvalidKeyError, LmcacheCoreError) as e:
            raise WarmupRefused("bad_request", str(e)) from None
        l2 = self.l2
        if l2 is None or not l2.adapters:
            raise WarmupRefused("no_l2", "no L2 adapters configured: there is nothing to warm L1 from")
        layout = self.engine.contexts.layout(model_name, world_size)
        if layout is None:
            raise WarmupRefused(
                "no_layout",
                f"no layout registered for model_name={model_name!r} world_size={world_size}: no "
                "worker of that model has registered its KV cache with this server",
            )
        if len(layout) != 1 or layout[0].windowed:
            raise WarmupRefused(
                "hybrid",
                f"{model_name!r} world {world_size} has a hybrid layout ({len(layout)} object groups, "
                "sliding windows): warm-ups load full-attention layouts only (its lookups are "
                "served from L1 alone too)",
            )
        try:
            ids = np.asarray(token_ids, dtype=np.uint32)
            hashes = chunk_hashes(ids, self.engine.chunk_size, memo=self.engine.chain_memo)
        except (LmcacheCoreError, OverflowError, ValueError) as e:
            raise WarmupRefused("bad_request", f"token_ids: {e}") from None
        if not hashes:
            return None
        group = layout[0].id
        scopes = [
            KeyScope(model_name, mp_kv_rank(world_size, r), group, cache_salt) for r in range(world_size)
        ]
        job = WarmupJob(
            request_id=uuid.uuid4().hex,
            model_name=model_name,
            world_size=world_size,
            cache_salt=cache_salt,
            chunks=len(hashes),
            total_keys=len(hashes) * len(scopes),
        )
        with self._lock:
            self._jobs[job.request_id] = job
            self._trim()
        if not l2.submit(lambda: self._run(l2, job, scopes, hashes)):
            with self._lock:
                self._jobs.pop(job.request_id, None)
            raise WarmupRefused("busy", "the L2 prefetch pool is full (or stopping): retry shortly")
        return job

    def get(self, request_id: str) -> WarmupJob | None:
        with self._lock:
            return self._jobs.get(request_id)

    def pending(self) -> int:
        with self._lock:
            return sum(j.status == "pending" for j in self._jobs.values())

    def _trim(self) -> None:
        """Forgets the oldest finished jobs beyond `max_jobs` (caller holds the lock)."""
        excess = len(self._jobs) - self.max_jobs
        if excess <= 0:
            return
        for rid in [rid for rid, j in self._jobs.items() if j.status != "pending"][:excess]:
            del self._jobs[rid]

    def _run(self, l2: L2Tier, job: WarmupJob, scopes: list[KeyScope], hashes: list[bytes]) -> None:
        index = self.engine.index
        try:
            hit = min(index.peek(s, hashes) for s in scopes)
            loaded = 0
            if hit < len(hashes):
                loaded, leases = l2.load(scopes, hashes[hit:], 1, job.model_name, temporary=False)
                for lease in leases:  # a warm-up holds nothing: the chunks stay, evictable
                    index.release(lease)
            status: JobStatus = "completed"
            error = None
        except Exception as e:  # a bug or an L1 error: recorded for the poller
            log.exception("warm-up %s failed", job.request_id)
            hit, loaded, status, error = 0, 0, "failed", f"{type(e).__name__}: {e}"
        with self._lock:
            job.l1_chunks = hit
            job.found_chunks = hit + loaded
            job.error = error
            job.finished_at = time.time()
            job.status = status
