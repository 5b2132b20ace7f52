"""`fs` L2 adapter: one file per object under a directory, written atomically.

Layout: `<base_path>/<id[:2]>/<id>.kv`, where `id` is the object id (blake3 of the key), plus
`<base_path>/.tmp/` for writes in progress (write, optionally fsync, then rename: a reader or a
crash never sees half an object). The key lives in each file's header, so the directory is
self-describing: at start the adapter scans it, rebuilds its per-salt ledger (recency from the
files' mtimes), deletes leftovers of interrupted writes and any file whose header or length is
wrong, and serves what an earlier server stored.

The ledger (object id -> size, per salt, in recency order) is this process's view: one server
owns a directory. Several servers share an L2 through `redis`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from lmcache_rs.config import L2Eviction
from lmcache_rs.storage.l2.base import (
    HEADER,
    IntegrityError,
    L2Adapter,
    L2Key,
    SaltUsage,
    key_of_header,
    pack_header,
    parse_header,
    verify,
)

log = logging.getLogger(__name__)

SUFFIX = ".kv"


class _Entry:
    __slots__ = ("last_used", "payload", "size")

    def __init__(self, size: int, payload: int, last_used: float) -> None:
        self.size = size
        self.payload = payload
        self.last_used = last_used


class FsAdapter(L2Adapter):
    type_name = "fs"

    def __init__(
        self,
        name: str,
        base_path: str,
        capacity_bytes: int,
        eviction: L2Eviction,
        default_policy: str,
        fsync: bool = False,
    ) -> None:
        super().__init__(name, capacity_bytes, eviction, default_policy)
        self.base = Path(base_path)
        self.tmp = self.base / ".tmp"
        self.fsync = fsync
        self._lock = threading.Lock()
        self._salts: dict[str, OrderedDict[str, _Entry]] = {}
        self._usage: dict[str, SaltUsage] = {}
        self._seq = itertools.count()
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.recovered_objects, self.dropped_files = self._scan()

    def _path(self, oid: str) -> Path:
        return self.base / oid[:2] / (oid + SUFFIX)

    # ---- ledger (caller holds _lock) ---------------------------------------------------------

    def _add(self, salt: str, oid: str, entry: _Entry) -> None:
        self._salts.setdefault(salt, OrderedDict())[oid] = entry
        u = self._usage.setdefault(salt, SaltUsage())
        u.objects += 1
        u.bytes += entry.size

    def _drop(self, salt: str, oid: str) -> _Entry | None:
        bucket = self._salts.get(salt)
        entry = bucket.pop(oid, None) if bucket is not None else None
        if entry is not None:
            u = self._usage[salt]
            u.objects -= 1
            u.bytes -= entry.size
            if not bucket:
                del self._salts[salt]
                del self._usage[salt]
        return entry

    def _scan(self) -> tuple[int, int]:
        dropped = 0
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
            dropped += 1
        found: list[tuple[float, str, str, _Entry]] = []
        for sub in self.base.iterdir():
            if not sub.is_dir() or sub == self.tmp:
                continue
            for f in sub.iterdir():
                if f.suffix != SUFFIX:
                    continue
                try:
                    st = f.stat()
                    with open(f, "rb") as fh:
                        head = fh.read(HEADER.size)
                        if len(head) == HEADER.size:
                            key_len = HEADER.unpack(head)[1]
                            head += fh.read(key_len)
                    key, payload, _, header_len = parse_header(head, None)
                    if f.stem != key.object_id or st.st_size != header_len + payload:
                        raise IntegrityError("name or length does not match the header")
                except (IntegrityError, OSError) as e:
                    log.warning("L2 %s: dropping %s (%s)", self.name, f, e)
                    f.unlink(missing_ok=True)
                    dropped += 1
                    continue
                found.append((st.st_mtime, key.cache_salt, f.stem, _Entry(st.st_size, payload, st.st_mtime)))
        found.sort(key=lambda t: t[0])
        with self._lock:
            for _, salt, oid, entry in found:
                self._add(salt, oid, entry)
        if found or dropped:
            log.info(
                "L2 %s: recovered %d objects from %s (%d files dropped)",
                self.name,
                len(found),
                self.base,
                dropped,
            )
        return len(found), dropped

    # ---- primitives ----------------------------------------------------------------------------

    def put(self, key: L2Key, payload: memoryview, digest: bytes | None = None) -> bool:
        oid = key.object_id
        with self._lock:
            if oid in self._salts.get(key.cache_salt, ()):
                return False
        header = pack_header(key, payload, digest)
        final = self._path(oid)
        tmp = self.tmp / f"{oid}.{os.getpid()}.{next(self._seq)}"
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(payload)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with self._lock:
            if oid not in self._salts.get(key.cache_salt, ()):
                self._add(
                    key.cache_salt, oid, _Entry(len(header) + payload.nbytes, payload.nbytes, time.time())
                )
        self.stored += 1
        return True

    def lengths(self, keys: list[L2Key]) -> list[int | None]:
        with self._lock:
            out: list[int | None] = []
            for k in keys:
                bucket = self._salts.get(k.cache_salt)
                e = None if bucket is None else bucket.get(k.object_id)
                out.append(None if e is None else e.payload)
            return out

    def get_into(self, key: L2Key, out: memoryview) -> bytes | None:
        oid = key.object_id
        try:
            with open(self._path(oid), "rb", buffering=0) as f:
                head = f.read(HEADER.size)
                if len(head) == HEADER.size:
                    head += f.read(HEADER.unpack(head)[1])
                try:
                    _, payload, digest, _ = parse_header(head, key)
                    if payload != out.nbytes:
                        raise IntegrityError(f"payload is {payload} bytes, expected {out.nbytes}")
                    got = 0
                    while got < payload:
                        n = f.readinto(out[got:])
                        if not n:
                            raise IntegrityError(f"truncated: {got} of {payload} payload bytes")
                        got += n
                    if f.read(1):
                        raise IntegrityError("trailing bytes after the payload")
                    verify(out, digest)
                except IntegrityError:
                    self.corrupt += 1
                    self.delete([key])
                    raise
        except FileNotFoundError:
            with self._lock:
                self._drop(key.cache_salt, oid)
            return None
        with self._lock:
            bucket = self._salts.get(key.cache_salt)
            if bucket is not None and oid in bucket:
                bucket.move_to_end(oid)
                bucket[oid].last_used = time.time()
        self.loaded += 1
        return digest

    def delete(self, keys: Iterable[L2Key]) -> int:
        n = 0
        for k in keys:
            oid = k.object_id
            with self._lock:
                self._drop(k.cache_salt, oid)
            try:
                self._path(oid).unlink()
                n += 1
            except FileNotFoundError:
                pass
        return n

    def usage(self) -> dict[str, SaltUsage]:
        with self._lock:
            return {s: SaltUsage(u.objects, u.bytes) for s, u in self._usage.items()}

    def oldest(self, salt: str | None, limit: int) -> list[tuple[str, str, int, float]]:
        with self._lock:
            salts = [salt] if salt is not None else list(self._salts)
            heads = (
                (s, oid, e.size, e.last_used)
                for s in salts
                for oid, e in itertools.islice(self._salts.get(s, {}).items(), limit)
            )
            return heapq.nsmallest(limit, heads, key=lambda t: t[3])

    def object_ids(self, after: str, limit: int) -> list[tuple[str, str, int]]:
        with self._lock:
            found = (
                (oid, salt, e.payload)
                for salt, bucket in self._salts.items()
                for oid, e in bucket.items()
                if oid > after
            )
            return [(salt, oid, n) for oid, salt, n in heapq.nsmallest(limit, found)]

    def read_keys(self, object_ids: list[str]) -> list[L2Key | None]:
        out: list[L2Key | None] = []
        for oid in object_ids:
            try:
                with open(self._path(oid), "rb", buffering=0) as f:
                    head = f.read(HEADER.size)
                    if len(head) == HEADER.size:
                        head += f.read(HEADER.unpack(head)[1])
                out.append(key_of_header(head))
            except OSError:
                out.append(None)
        return out

    def remove_ids(self, salt: str, object_ids: list[str]) -> int:
        freed = 0
        for oid in object_ids:
            with self._lock:
                e = self._drop(salt, oid)
            if e is not None:
                freed += e.size
                self._path(oid).unlink(missing_ok=True)
        return freed
