"""Request sessions (spec C.5): the cached hash chain of a request and its lookup locks.

Unlike LMCache, the chain is replaced when the request's tokens change (LMCache keeps stale
hashes) and the TTL counts from the last use, not from creation (spec L.5).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from lmcache_rs import ChainMemo, KeyScope, L1Index, chunk_hashes, chunk_hashes_msgpack
from lmcache_rs.protocol.messages import IPCCacheServerKey, ServerKey


@dataclass
class LookupLocks:
    """Read locks a lookup holds for a request: `shares[row][chunk]` locks still owed per key.

    A row is one key scope: one kv rank (`ranks[row]`; without `ranks`, row i is rank i) of one
    object group (a hybrid model has several, engine/groups.py; a row owes 0 on chunks it does
    not need). Retrieve releases one share of its own rank's chunks, free_lookup_locks releases
    what is left in a range, end_session or expiry release everything; each release is
    idempotent."""

    scopes: list[KeyScope]
    hashes: list[bytes]
    shares: list[list[int]]
    ranks: list[int] | None = None

    def release(self, index: L1Index, rank: int | None, start: int, end: int, n: int | None) -> int:
        """Releases up to `n` (None: all) shares of chunks [start, end) for `rank` (None: all).
        One `finish_read` per run of equal shares (usually one per rank)."""
        released = 0
        if rank is None:
            rows = range(len(self.scopes))
        elif self.ranks is None:
            rows = range(rank, rank + 1) if 0 <= rank < len(self.scopes) else range(0)
        else:
            rows = [i for i, r in enumerate(self.ranks) if r == rank]
        start, end = max(start, 0), min(end, len(self.hashes))
        if start >= end:
            return 0
        for r in rows:
            row = self.shares[r]
            owed = row[start:end]
            takes = owed if n is None else [min(n, v) for v in owed]
            i = start
            for take, run in itertools.groupby(takes):
                j = i + len(list(run))
                if take:
                    index.finish_read(self.scopes[r], self.hashes[i:j], take)
                    released += take * (j - i)
                i = j
            row[start:end] = (
                [0] * (end - start) if n is None else [v - t for v, t in zip(owed, takes, strict=True)]
            )
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
            self.locks.release(index, None, 0, len(self.locks.hashes), None)
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
