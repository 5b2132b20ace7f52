"""`redis` / `valkey` L2 adapter: one shared pool for many servers, through redis-py.

Objects are plain string values `<prefix>o:<object id>` (header + payload, see base.py),
written with SET NX so concurrent servers storing the same chunk agree on one copy; with
`ttl_seconds` each object expires that long after its last use (a read refreshes it).

Usage and recency are kept *in Redis*, so every server sharing the pool sees the same numbers
and IsolatedLRU quotas govern the pool as a whole:

    {<prefix>}r:<salt id>   ZSET  object id -> last use (unix seconds)
    {<prefix>}s:<salt id>   HASH  object id -> "<bytes>:<payload bytes>"
    {<prefix>}ub / un       HASH  cache_salt -> bytes / objects
    {<prefix>}salts         HASH  salt id -> cache_salt

Accounting changes run as Lua scripts (atomic; the ZSET membership is the gate, so an object
is counted exactly once however many servers race). The accounting keys share one hash tag,
so the scripts also run on a Redis Cluster while the objects themselves spread over slots.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import redis
import redis.cluster

from lmcache_rs import checksum
from lmcache_rs.config import L2Eviction
from lmcache_rs.storage.l2.base import (
    HEADER,
    IntegrityError,
    L2Adapter,
    L2Key,
    L2Unavailable,
    SaltUsage,
    key_of_header,
    pack_header,
    parse_header,
    verify,
)

#: Key bytes read with each header when listing (a longer key costs one more read).
HEAD_GUESS = 512

P = ParamSpec("P")
R = TypeVar("R")

_ADD = """
if redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
  redis.call('HINCRBY', KEYS[3], ARGV[5], ARGV[4])
  redis.call('HINCRBY', KEYS[4], ARGV[5], 1)
  redis.call('HSET', KEYS[5], ARGV[6], ARGV[5])
  return 1
end
return 0
"""

_DEL = """
local freed = 0
for i = 2, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    local f = redis.call('HGET', KEYS[2], ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i])
    local size = tonumber(string.match(f or '0', '^(%d+)')) or 0
    freed = freed + size
    if redis.call('HINCRBY', KEYS[3], ARGV[1], -size) <= 0 then redis.call('HDEL', KEYS[3], ARGV[1]) end
    if redis.call('HINCRBY', KEYS[4], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[4], ARGV[1]) end
  end
end
return freed
"""


def _b(reply: bytes | str) -> bytes:
    """A reply of our client as bytes: redis-py types replies `bytes | str` (its choice depends on
    `decode_responses`, which we leave off, so they are bytes)."""
    assert isinstance(reply, bytes), type(reply)
    return reply


def _s(reply: bytes | str) -> str:
    """A reply that holds text (a salt, an object id), decoded."""
    return _b(reply).decode()


def _unavailable(fn: Callable[P, R]) -> Callable[P, R]:
    """Connection and server errors become L2Unavailable (the tier pauses the adapter)."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as e:
            raise L2Unavailable(f"{type(e).__name__}: {e}") from None

    return wrapper


class RedisAdapter(L2Adapter):
    type_name = "redis"

    def __init__(
        self,
        name: str,
        url: str,
        key_prefix: str,
        ttl_seconds: float,
        capacity_bytes: int,
        eviction: L2Eviction,
        default_policy: str,
        cluster: bool = False,
        socket_timeout: float = 2.0,
    ) -> None:
        super().__init__(name, capacity_bytes, eviction, default_policy)
        opts: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
        self.r: redis.Redis | redis.cluster.RedisCluster = (
            redis.cluster.RedisCluster.from_url(url, **opts) if cluster else redis.Redis.from_url(url, **opts)
        )
        self.url = url
        self.prefix = key_prefix
        self.ttl_ms = int(ttl_seconds * 1000)
        tag = "{" + key_prefix + "}"
        self._k_bytes, self._k_objects, self._k_salts = tag + "ub", tag + "un", tag + "salts"
        self._tag = tag
        self._add = self.r.register_script(_ADD)
        self._del = self.r.register_script(_DEL)

    def _sid(self, salt: str) -> str:
        return checksum(salt.encode()).hex()[:32]

    def _okey(self, oid: str) -> str:
        return f"{self.prefix}o:{oid}"

    def _rkeys(self, salt: str) -> tuple[str, str]:
        sid = self._sid(salt)
        return f"{self._tag}r:{sid}", f"{self._tag}s:{sid}"

    def close(self) -> None:
        self.r.close()

    @_unavailable
    def ping(self) -> bool:
        return bool(self.r.ping())

    # ---- primitives ----------------------------------------------------------------------------

    @_unavailable
    def put(self, key: L2Key, payload: memoryview, digest: bytes | None = None) -> bool:
        oid = key.object_id
        blob = pack_header(key, payload, digest) + payload
        if not self.r.set(self._okey(oid), blob, nx=True, px=self.ttl_ms or None):
            return False
        zset, sizes = self._rkeys(key.cache_salt)
        self._add(
            keys=[zset, sizes, self._k_bytes, self._k_objects, self._k_salts],
            args=[
                oid,
                time.time(),
                f"{len(blob)}:{payload.nbytes}",
                len(blob),
                key.cache_salt,
                self._sid(key.cache_salt),
            ],
        )
        self.stored += 1
        return True

    @_unavailable
    def lengths(self, keys: list[L2Key]) -> list[int | None]:
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.hget(self._rkeys(k.cache_salt)[1], k.object_id)
        out: list[int | None] = []
        for v in pipe.execute():
            out.append(None if v is None else int(v.split(b":")[1]))
        return out

    @_unavailable
    def get_into(self, key: L2Key, out: memoryview) -> bytes | None:
        oid = key.object_id
        blob = self.r.get(self._okey(oid))
        if blob is None:
            self._forget(key.cache_salt, [oid])  # expired (TTL) or deleted by another server
            return None
        try:
            blob = _b(blob)
            _, payload, digest, header_len = parse_header(blob, key)
            if payload != out.nbytes or len(blob) != header_len + payload:
                raise IntegrityError(
                    f"object is {len(blob) - header_len} payload bytes (header says {payload}), "
                    f"expected {out.nbytes}"
                )
            out[:] = memoryview(blob)[header_len:]
            verify(out, digest)
        except IntegrityError:
            self.corrupt += 1
            self.delete([key])
            raise
        zset, _ = self._rkeys(key.cache_salt)
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(zset, {oid: time.time()}, xx=True)
        if self.ttl_ms:
            pipe.pexpire(self._okey(oid), self.ttl_ms)
        pipe.execute()
        self.loaded += 1
        return digest

    def _forget(self, salt: str, oids: list[str]) -> int:
        zset, sizes = self._rkeys(salt)
        return int(self._del(keys=[zset, sizes, self._k_bytes, self._k_objects], args=[salt, *oids]))

    @_unavailable
    def delete(self, keys: Iterable[L2Key]) -> int:
        n = 0
        for k in keys:
            n += int(self.r.delete(self._okey(k.object_id)))
            self._forget(k.cache_salt, [k.object_id])
        return n

    @_unavailable
    def usage(self) -> dict[str, SaltUsage]:
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self._k_bytes)
        pipe.hgetall(self._k_objects)
        by_bytes, by_objects = pipe.execute()
        return {
            s.decode(): SaltUsage(int(by_objects.get(s, 0)), int(b))
            for s, b in by_bytes.items()
            if int(b) > 0
        }

    @_unavailable
    def oldest(self, salt: str | None, limit: int) -> list[tuple[str, str, int, float]]:
        salts = [_s(s) for s in self.r.hvals(self._k_salts)] if salt is None else [salt]
        found: list[tuple[str, str, int, float]] = []
        for s in salts:
            zset, sizes = self._rkeys(s)
            # redis-py types every zrange reply alike; withscores=True gives (member, score) pairs.
            members: list[tuple[bytes, float]] = self.r.zrange(zset, 0, limit - 1, withscores=True)  # type: ignore[assignment]
            if not members:
                continue
            raw = self.r.hmget(sizes, [m for m, _ in members])
            for (m, score), v in zip(members, raw, strict=True):
                size = int(_b(v).split(b":")[0]) if v else 0
                found.append((s, m.decode(), size, float(score)))
        found.sort(key=lambda t: t[3])
        return found[:limit]

    @_unavailable
    def object_ids(self, after: str, limit: int) -> list[tuple[str, str, int]]:
        salts = [_s(s) for s in self.r.hvals(self._k_salts)]
        found: list[tuple[str, str, int]] = []
        for s in salts:
            for oid, v in self.r.hgetall(self._rkeys(s)[1]).items():
                o = _s(oid)
                if o > after:
                    found.append((o, s, int(_b(v).split(b":")[1])))
        return [(salt, oid, n) for oid, salt, n in heapq.nsmallest(limit, found)]

    @_unavailable
    def read_keys(self, object_ids: list[str]) -> list[L2Key | None]:
        pipe = self.r.pipeline(transaction=False)
        for oid in object_ids:
            pipe.getrange(self._okey(oid), 0, HEADER.size + HEAD_GUESS - 1)
        heads: list[bytes] = pipe.execute()
        out: list[L2Key | None] = []
        for oid, first in zip(object_ids, heads, strict=True):
            head = first
            if len(first) >= HEADER.size and len(first) < HEADER.size + HEADER.unpack_from(first)[1]:
                head = self.r.getrange(self._okey(oid), 0, HEADER.size + HEADER.unpack_from(first)[1] - 1)
            out.append(key_of_header(_b(head)) if head else None)
        return out

    @_unavailable
    def remove_ids(self, salt: str, object_ids: list[str]) -> int:
        if not object_ids:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for oid in object_ids:
            pipe.delete(self._okey(oid))
        pipe.execute()
        return self._forget(salt, object_ids)

    @_unavailable
    def expire_stale(self) -> int:
        """With a TTL: forgets ledger entries whose objects Redis has expired (unused for
        longer than the TTL), so usage does not count them. Returns how many."""
        if not self.ttl_ms:
            return 0
        cutoff = time.time() - self.ttl_ms / 1000
        n = 0
        for s in [_s(s) for s in self.r.hvals(self._k_salts)]:
            zset, _ = self._rkeys(s)
            # redis-py types every zrangebyscore reply alike; without scores it is the members.
            members: list[bytes] = self.r.zrangebyscore(zset, "-inf", cutoff, start=0, num=1024)  # type: ignore[assignment]
            stale = [m.decode() for m in members]
            if not stale:
                continue
            pipe = self.r.pipeline(transaction=False)
            for oid in stale:
                pipe.exists(self._okey(oid))
            gone = [oid for oid, live in zip(stale, pipe.execute(), strict=True) if not live]
            if gone:
                self._forget(s, gone)
                n += len(gone)
        return n
