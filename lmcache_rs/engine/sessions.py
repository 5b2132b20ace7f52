"""Request sessions (spec C.5): the cached hash chain of a request and its lookup locks.

Unlike LMCache, the chain is replaced when the request's tokens change (LMCache keeps stale
hashes) and the TTL counts from the last use, not from creation (spec L.5).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from lmcache_rs import ChainMemo, KeyScope, L1Index, chunk_hashes, chunk_hashes_msgpack
from lmcache_rs.protocol.messages import IPCCacheServerKey, ServerKey

#: A run of one lease: (lease, first chunk, chunks), its items being those chunks in order.
Run = tuple[int, int, int]


@dataclass
class LookupLocks:
    """The read leases a lookup holds for a request. A row is one key scope: one kv rank
    (`ranks[row]`) of one object group (a hybrid model has several, engine/groups.py; a
    windowed group's row holds only the chunks its window needs). Each row is a list of runs
    `(lease, first chunk, chunks)` in chunk order: the L1 hit, then what an L2 prefetch loaded.

    Retrieve releases one share of its own rank's chunks, free_lookup_locks releases what is
    left in a range, end_session or expiry release everything. The core counts the shares each
    lease still owes, so every release is idempotent and can only give back what these leases
    took, whatever happened to the keys meanwhile."""

    runs: list[list[Run]]
    ranks: list[int]

    @classmethod
    def of(cls, rows: list[tuple[int, Run]]) -> LookupLocks:
        """The locks of `(rank, run)` rows (lease 0 or no chunks: nothing held)."""
        return cls([[run] if run[0] and run[2] else [] for _, run in rows], [rank for rank, _ in rows])

    def extend(self, leases: list[int], first: int, chunks: int) -> None:
        """Adds one row per rank (lease i: rank i) covering chunks `[first, first + chunks)`
        (no leases: nothing was taken)."""
        for rank, lease in enumerate(leases):
            if lease and chunks:
                self.runs.append([(lease, first, chunks)])
                self.ranks.append(rank)

    def leases(self) -> list[int]:
        return [lease for row in self.runs for lease, _, _ in row]

    def release(self, index: L1Index, rank: int | None, start: int, end: int, n: int | None) -> int:
        """Releases up to `n` (None: all) shares of chunks [start, end) for `rank` (None: all)."""
        released = 0
        for row, r in zip(self.runs, self.ranks, strict=True):
            if rank is not None and r != rank:
                continue
            for lease, first, count in row:
                lo, hi = max(start - first, 0), min(end - first, count)
                if lo < hi:
                    released += index.release(lease, lo, hi, n)
        return released


@dataclass
class Session:
    request_id: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: The tokens `hashes` belong to: (parsed u32 ids?, their bytes); none at first.
    tokens: tuple[bool, bytes] | None = None
    hashes: list[bytes] = field(default_factory=list)
    n_tokens: int = 0
    last_used: float = field(default_factory=time.monotonic)
    result: int | None = None
    result_ready: threading.Event = field(default_factory=threading.Event)
    #: A lookup's L2 prefetch is still loading (queries answer nil until it is done).
    pending: bool = False
    #: Bumped by every lookup; a prefetch that finds it changed (or the session closed)
    #: releases what it loaded instead of installing it.
    generation: int = 0
    closed: bool = False
    locks: LookupLocks | None = None
    #: Scopes (all ranks) of the keys this request touched, for end_session's LRU touch.
    scopes: list[KeyScope] = field(default_factory=list)

    def chain(self, key: IPCCacheServerKey, chunk_size: int, memo: ChainMemo) -> tuple[list[bytes], int]:
        """Hashes of every complete chunk of the request's tokens and the token count. Cached
        while the request sends the same tokens, replaced as soon as they differ (LMCache keeps
        stale hashes). A key the server decoded carries its ids parsed already (compared and
        hashed as such, through the server's memo); any other is compared and parsed as its
        msgpack bytes."""
        if isinstance(key, ServerKey) and key.token_u32:
            tokens: tuple[bool, bytes] = (True, key.token_u32)
        else:
            tokens = (False, bytes(key.token_ids))
        if tokens != self.tokens:
            if tokens[0]:
                ids = np.frombuffer(tokens[1], dtype=np.uint32)
                self.hashes, self.n_tokens = chunk_hashes(ids, chunk_size, memo=memo), len(ids)
            else:
                self.hashes, self.n_tokens = chunk_hashes_msgpack(tokens[1], chunk_size)
            self.tokens = tokens
        return self.hashes, self.n_tokens

    def drop_locks(self, index: L1Index) -> None:
        """Releases every lock the last lookup still holds (caller holds `lock`)."""
        if self.locks is not None:
            for lease in self.locks.leases():
                index.release(lease)
            self.locks = None

    def set_result(self, hit_chunks: int) -> None:
        self.result = hit_chunks
        self.pending = False
        self.result_ready.set()

    def take_result(self) -> int | None:
        """The lookup's hit in chunks, once (later calls and unknown lookups give 0); None
        while its L2 prefetch is still running (spec B.4: nil while running)."""
        if self.pending:
            return None
        out, self.result = self.result, None
        self.result_ready.clear()
        return out or 0


class SessionManager:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def get(self, request_id: str, create: bool = True) -> Session | None:
        with self._lock:
            s = self._sessions.get(request_id)
            if s is None and create:
                s = self._sessions[request_id] = Session(request_id)
            if s is not None:
                s.last_used = time.monotonic()
            return s

    def peek(self, request_id: str) -> Session | None:
        """The session, if any, without counting this as a use (its TTL runs on)."""
        with self._lock:
            return self._sessions.get(request_id)

    def pop(self, request_id: str) -> Session | None:
        with self._lock:
            return self._sessions.pop(request_id, None)

    def expired(self, ttl: float) -> list[Session]:
        """Removes and returns sessions idle for more than `ttl` seconds."""
        now = time.monotonic()
        with self._lock:
            old = [s for s in self._sessions.values() if now - s.last_used > ttl]
            for s in old:
                del self._sessions[s.request_id]
            return old

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
