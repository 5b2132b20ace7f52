"""The L2 adapter contract, the object format every adapter stores, and the eviction policy.

An L2 object is one L1 chunk plus a header that makes it self-describing and verifiable:

    offset  size  field
    0       8     magic b"LMRSKV01"
    8       4     key_len (u32 LE)
    12      8     payload_len (u64 LE)
    20      32    blake3 of the payload
    52      ..    the key: msgpack [model_name, kv_rank, object_group, cache_salt, chunk_hash]
    ..      ..    payload (the chunk's bytes, exactly as in L1)

A reader checks the magic, that the stored key is the key it asked for, the length, and the
checksum (over the bytes after they landed in L1, so nothing is copied twice). Anything that
does not match raises `IntegrityError`: the caller treats it as a miss and deletes the object.

Adapters are synchronous and thread-safe; the tier calls them from its flush, prefetch and
eviction threads, never from the ZMQ I/O thread. Per-salt usage and recency live with each
adapter (in memory for `fs`, in the shared server for `redis`), so quotas hold per adapter.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

import msgspec

from lmcache_rs import KeyScope, checksum
from lmcache_rs.config import L2Eviction

log = logging.getLogger(__name__)

MAGIC = b"LMRSKV01"
HEADER = struct.Struct("<8sIQ32s")
#: How long an adapter that failed is left alone before it is tried again.
RETRY_AFTER_SECONDS = 1.0


class IntegrityError(Exception):
    """A stored object is truncated, corrupt, or holds another key."""


class L2Unavailable(Exception):
    """The adapter's backend is unreachable (it is retried after a pause)."""


class L2Key(msgspec.Struct, array_like=True, frozen=True):
    model_name: str
    kv_rank: int
    object_group: int
    cache_salt: str
    chunk_hash: bytes

    @classmethod
    def of(cls, scope: KeyScope, chunk_hash: bytes) -> L2Key:
        return cls(scope.model_name, scope.kv_rank, scope.object_group, scope.cache_salt, chunk_hash)

    def encode(self) -> bytes:
        return _encoder.encode(self)

    @property
    def object_id(self) -> str:
        """A fixed-length name for the object (file name, Redis key): blake3 of the key, hex."""
        return checksum(self.encode()).hex()


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(L2Key)


def pack_header(key: L2Key, payload: memoryview, digest: bytes | None = None) -> bytes:
    """The object's header; `digest` is the payload's blake3 when the caller already has it."""
    kb = key.encode()
    return HEADER.pack(MAGIC, len(kb), payload.nbytes, digest or checksum(payload)) + kb


def parse_header(head: bytes | memoryview, expect: L2Key | None) -> tuple[L2Key, int, bytes, int]:
    """(key, payload_len, checksum, header_len) of an object whose first bytes are `head`
    (at least HEADER.size + key_len of them). Raises IntegrityError."""
    if len(head) < HEADER.size:
        raise IntegrityError(f"object shorter than its header ({len(head)} bytes)")
    magic, key_len, payload_len, digest = HEADER.unpack_from(head)
    if magic != MAGIC:
        raise IntegrityError("bad magic: not an lmcache-rs object")
    end = HEADER.size + key_len
    if len(head) < end:
        raise IntegrityError("truncated header")
    try:
        key = _decoder.decode(head[HEADER.size : end])
    except msgspec.DecodeError as e:
        raise IntegrityError(f"undecodable key: {e}") from None
    if expect is not None and key != expect:
        raise IntegrityError("the object holds another key")
    return key, payload_len, digest, end


def key_of_header(head: bytes | memoryview) -> L2Key | None:
    """The key in an object's first bytes (its header), None if they are not one."""
    try:
        return parse_header(head, None)[0]
    except IntegrityError:
        return None


def verify(payload: memoryview, digest: bytes) -> None:
    if checksum(payload) != digest:
        raise IntegrityError("checksum mismatch")


class SaltUsage(msgspec.Struct):
    objects: int = 0
    bytes: int = 0


class AdapterStatus(msgspec.Struct, kw_only=True):
    name: str
    type: str
    is_healthy: bool
    last_error: str | None
    eviction_policy: str
    trigger_watermark: float
    eviction_ratio: float
    total_objects: int
    total_bytes_used: int
    total_capacity_bytes: int
    bytes_by_cache_salt: dict[str, int]
    stored_objects: int
    loaded_objects: int
    errors: int
    corrupt_objects: int
    evicted_objects: int


class EvictReport(msgspec.Struct):
    quota_objects: int = 0
    watermark_objects: int = 0
    bytes: int = 0


class L2Adapter(ABC):
    """One L2 backend. Subclasses implement the storage primitives; health, counters and the
    eviction policy (LRU by capacity, IsolatedLRU by quota) live here once."""

    type_name = "?"

    def __init__(self, name: str, capacity_bytes: int, eviction: L2Eviction, default_policy: str) -> None:
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.policy = eviction.eviction_policy or default_policy
        self.watermark = eviction.trigger_watermark
        self.ratio = eviction.eviction_ratio
        self._health_lock = threading.Lock()
        self._retry_at = 0.0
        self.last_error: str | None = None
        self.stored = self.loaded = self.errors = self.corrupt = self.evicted = 0
        #: Called with (adapter name, operation) on every failure (the tier counts them).
        self.on_error: Callable[[str, str], None] | None = None

    # ---- health ------------------------------------------------------------------------------

    def available(self) -> bool:
        with self._health_lock:
            return time.monotonic() >= self._retry_at

    def healthy(self) -> bool:
        with self._health_lock:
            return self.last_error is None

    def failed(self, op: str, err: BaseException) -> None:
        with self._health_lock:
            self.errors += 1
            first = self.last_error is None
            self.last_error = f"{op}: {err}"
            self._retry_at = time.monotonic() + RETRY_AFTER_SECONDS
        if self.on_error is not None:
            self.on_error(self.name, op)
        if first:
            log.warning(
                "L2 %s unavailable (%s: %s); retrying every %.0fs", self.name, op, err, RETRY_AFTER_SECONDS
            )

    def succeeded(self) -> None:
        if self.last_error is not None:
            with self._health_lock:
                if self.last_error is not None:
                    log.info("L2 %s is back", self.name)
                self.last_error = None

    # ---- primitives (subclasses) -------------------------------------------------------------

    @abstractmethod
    def put(self, key: L2Key, payload: memoryview, digest: bytes | None = None) -> bool:
        """Stores the object unless present; True when this call stored it. `digest`: the
        payload's blake3 if known (L1 sealed it), else it is computed."""

    @abstractmethod
    def lengths(self, keys: list[L2Key]) -> list[int | None]:
        """Payload length of each key, None where absent."""

    @abstractmethod
    def get_into(self, key: L2Key, out: memoryview) -> bytes | None:
        """Reads the payload into `out` (exactly its length) and verifies it; returns its
        verified blake3, or None when the object is absent. Raises IntegrityError (the object
        is deleted first)."""

    @abstractmethod
    def delete(self, keys: Iterable[L2Key]) -> int:
        """Deletes objects; returns how many existed."""

    @abstractmethod
    def usage(self) -> dict[str, SaltUsage]:
        """Objects and bytes (header included) per cache_salt."""

    @abstractmethod
    def oldest(self, salt: str | None, limit: int) -> list[tuple[str, str, int, float]]:
        """Up to `limit` least recently used objects of `salt` (None: of every salt), oldest
        first, as (salt, object_id, bytes, last_used)."""

    @abstractmethod
    def remove_ids(self, salt: str, object_ids: list[str]) -> int:
        """Deletes objects by id (eviction); returns the bytes freed."""

    @abstractmethod
    def object_ids(self, after: str, limit: int) -> list[tuple[str, str, int]]:
        """Up to `limit` objects whose id sorts after `after` ("" : from the first), in id
        order, as (salt, object_id, payload bytes): the pages of a listing."""

    @abstractmethod
    def read_keys(self, object_ids: list[str]) -> list[L2Key | None]:
        """The key each object's header holds (None: gone, or not a readable object)."""

    def close(self) -> None:  # noqa: B027 - optional
        pass

    def clear(self) -> tuple[int, int]:
        """Deletes every object (of a shared backend: every server's under this prefix), oldest
        first; returns (objects, bytes) deleted. Objects written meanwhile may stay."""
        objects = freed = 0
        while True:
            batch = self.oldest(None, 1024)
            by_salt: dict[str, list[str]] = {}
            for salt, oid, _, _ in batch:
                by_salt.setdefault(salt, []).append(oid)
            got = sum(self.remove_ids(salt, ids) for salt, ids in by_salt.items())
            if got == 0:
                return objects, freed  # nothing left (or nothing removable): never spin
            objects += len(batch)
            freed += got

    # ---- eviction policy -------------------------------------------------------------------------

    def evict_cycle(self, quota_of: Callable[[str], int | None]) -> EvictReport:
        """IsolatedLRU: every salt above its quota (unregistered: 0, allowlist) is trimmed to
        it, oldest first. Then, with a capacity, usage at or above the watermark loses
        `eviction_ratio` of it, least recently used first across salts."""
        report = EvictReport()
        if self.policy == "noop":
            return report
        usage = self.usage()
        if self.policy == "IsolatedLRU":
            for salt, u in usage.items():
                limit = quota_of(salt) or 0
                if u.bytes > limit:
                    freed, n = self._trim(salt, u.bytes - limit)
                    report.quota_objects += n
                    report.bytes += freed
            if report.quota_objects:
                usage = self.usage()
        if self.capacity_bytes > 0:
            used = sum(u.bytes for u in usage.values())
            if used >= self.watermark * self.capacity_bytes:
                freed, n = self._trim(None, max(int(used * self.ratio), 1))
                report.watermark_objects += n
                report.bytes += freed
        self.evicted += report.quota_objects + report.watermark_objects
        return report

    def make_room(self, size: int) -> None:
        """Frees least recently used objects until `size` more bytes fit in the capacity."""
        if self.capacity_bytes <= 0:
            return
        used = sum(u.bytes for u in self.usage().values())
        if used + size > self.capacity_bytes:
            _, n = self._trim(None, used + size - self.capacity_bytes)
            self.evicted += n

    def _trim(self, salt: str | None, need: int) -> tuple[int, int]:
        freed = count = 0
        while freed < need:
            batch = self.oldest(salt, 64)
            by_salt: dict[str, list[str]] = {}
            planned = 0
            for s, oid, size, _ in batch:
                if freed + planned >= need:
                    break
                by_salt.setdefault(s, []).append(oid)
                planned += size
            got = 0
            for s, ids in by_salt.items():
                got += self.remove_ids(s, ids)
                count += len(ids)
            if got == 0:
                break  # nothing left (or nothing removable): never spin
            freed += got
        return freed, count

    def status(self) -> AdapterStatus:
        try:
            usage = self.usage()
        except L2Unavailable as e:
            self.failed("usage", e)
            usage = {}
        return AdapterStatus(
            name=self.name,
            type=self.type_name,
            is_healthy=self.healthy(),
            last_error=self.last_error,
            eviction_policy=self.policy,
            trigger_watermark=self.watermark,
            eviction_ratio=self.ratio,
            total_objects=sum(u.objects for u in usage.values()),
            total_bytes_used=sum(u.bytes for u in usage.values()),
            total_capacity_bytes=self.capacity_bytes,
            bytes_by_cache_salt={s: u.bytes for s, u in usage.items()},
            stored_objects=self.stored,
            loaded_objects=self.loaded,
            errors=self.errors,
            corrupt_objects=self.corrupt,
            evicted_objects=self.evicted,
        )
