"""A warm L1 across restarts: the journal of the shared-memory pool and re-adoption from it.

L1's bytes live in a POSIX shared-memory pool (`storage/shm_pool.py`) that outlives the server
process: a SIGKILL leaves it, and with a state directory a SIGTERM keeps it too. What a new
server needs besides the bytes is the index: which object (scope, chunk hash) lies at which
offset, and proof that its bytes are whole. This module keeps that in an append-only
**journal** in the state directory and, at start, re-adopts every object the journal lists
whose bytes still match the checksum it was sealed with.

# Journal
Records, each framed `u32 length | u32 crc32 | msgpack payload`, appended with one `write()`:
* `Header` (first): format version, pool name, capacity and alignment.
* `Reserve(ranges)`: ranges handed to writers, logged *before* any writer may touch them.
* `Seal(scope, objects)`: objects whose copy is complete, with their blake3 checksums, logged
  after the copy and *before* `finish_write` makes them resident.
* `Clear` (after a clear of the index) and `Forget(scope, hashes)` (after a delete).

Why an append log and not a snapshot rewritten with temp + rename: a snapshot is stale the
moment after it is written, and a range freed (evicted) after it can be handed to a writer
that dies mid-copy; the snapshot would still name the old object there. Its checksum would
catch the half-written bytes, but not a worker that survived the crash and writes into the
pool *after* the new server verified and adopted the old object. The log is exact instead:
because a range is logged as reserved before anybody can write it, and a seal is logged before
the object can be evicted and its range reused, the records of one range appear in the order
that range changed hands (one lock orders the appends). Replay walks the log newest first: a
seal is adopted only if no newer record claims any of its bytes (a newer reserve: a write that
may be half done; a newer seal: another object), no newer clear or forget drops it, and its
bytes still hash to its checksum. A staged write that was never sealed is therefore never
adopted, and neither is anything under it.

Cost per store: one `os.write` of ~40 bytes per reserved range before the copy (page cache,
no fsync: a process crash keeps it, and a machine crash loses /dev/shm anyway). The blake3
checksum of each object (4.3 GB/s on one core here) is *not* on the store's path: sealed
synchronously, a store of 8 x 2 MiB chunks took 9.4 ms median instead of 4.0-4.7 ms on 2 cores
(16 MiB / 4.3 GB/s = 3.9 ms). The `Sealer` thread checksums objects once they are resident,
each under a read lease (so its range cannot be reused meanwhile), and appends its seal only
if the object is still resident at that offset, checked under the journal's lock: a clear,
delete or eviction either precedes the check (the object is skipped) or its record follows
the seal. An object not yet sealed when the server dies is simply not re-adopted. With
--verify-checksums the store computes the checksum anyway and seals at once. The journal is
compacted (rewritten with temp + rename to just the objects it still lists) when it doubles, at
start and at a clean stop.

# Failure handling
A journal that cannot be read, whose header does not match this server's pool, or holding a
record whose CRC does not match, gives a cold start with one error line saying why; a record
cut short at the end (a write interrupted by the crash) ends the log, since its ranges were
never handed out. Objects whose bytes do not match their checksum are dropped one by one.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import msgspec

from lmcache_rs import KeyScope, checksum
from lmcache_rs.storage.l1 import L1Store

log = logging.getLogger(__name__)

VERSION = 1
JOURNAL = "l1.journal"
_FRAME = struct.Struct("<II")
#: Compaction waits until the journal is at least this large (and twice its compacted size).
MIN_COMPACT_BYTES = 16 << 20


class Header(msgspec.Struct, array_like=True, tag=0):
    version: int
    pool: str
    capacity: int
    align: int


class Reserve(msgspec.Struct, array_like=True, tag=1):
    #: (offset, size) of each range handed to a writer.
    ranges: list[tuple[int, int]]


class Seal(msgspec.Struct, array_like=True, tag=2):
    model: str
    kv_rank: int
    group: int
    salt: str
    #: (chunk hash, offset, allocated size, bytes written, blake3 of those bytes) per object.
    objects: list[tuple[bytes, int, int, int, bytes]]


class Clear(msgspec.Struct, array_like=True, tag=3):
    pass


class Forget(msgspec.Struct, array_like=True, tag=4):
    model: str
    kv_rank: int
    group: int
    salt: str
    hashes: list[bytes]


Record = Header | Reserve | Seal | Clear | Forget
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Record)


class JournalError(Exception):
    """The journal cannot be trusted; the message says why (a cold start follows)."""


class Listed(msgspec.Struct, frozen=True):
    """An object the journal lists as resident: where it is and what it hashes to."""

    model: str
    kv_rank: int
    group: int
    salt: str
    hash: bytes
    offset: int
    #: Allocated bytes (the range adopted) and bytes written (the range checksummed).
    size: int
    nbytes: int
    digest: bytes

    def scope(self) -> KeyScope:
        return KeyScope(self.model, self.kv_rank, self.group, self.salt)


class WarmReport(msgspec.Struct, kw_only=True):
    """What a start did with the previous server's L1 (`/status` `warm_start`)."""

    #: warm (re-adopted what it could), cold (started empty: flag, first start, or why below),
    #: off (no state directory or no shared-memory pool: restarts always start empty).
    mode: str
    reason: str | None = None
    journal: str | None = None
    listed_objects: int = 0
    adopted_objects: int = 0
    adopted_bytes: int = 0
    #: Listed objects not adopted: bytes that no longer match their checksum, or refused by
    #: the index (overlap, out of range).
    dropped_objects: int = 0
    dropped_bytes: int = 0
    checksum_mismatches: int = 0
    seconds: float = 0.0


def _frame(rec: Record) -> bytes:
    payload = _encoder.encode(rec)
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def read_records(path: str) -> Iterator[Record]:
    """The journal's records in order. Raises JournalError on a damaged record; stops
    quietly at a record cut short by the end of the file."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        if pos + _FRAME.size > len(data):
            log.warning("L1 journal %s: ignoring %d bytes of a record cut short", path, len(data) - pos)
            return
        n, crc = _FRAME.unpack_from(data, pos)
        end = pos + _FRAME.size + n
        if end > len(data):
            log.warning("L1 journal %s: ignoring %d bytes of a record cut short", path, len(data) - pos)
            return
        payload = data[pos + _FRAME.size : end]
        if zlib.crc32(payload) != crc:
            raise JournalError(f"record at byte {pos} fails its CRC (the journal was damaged)")
        try:
            yield _decoder.decode(payload)
        except msgspec.DecodeError as e:
            raise JournalError(f"record at byte {pos} cannot be decoded: {e}") from None
        pos = end


class _Ranges:
    """A union of byte ranges: sorted disjoint `[start, end)` intervals, merged on insert."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start)
        if i > 0 and self.ends[i - 1] > start:
            return True
        return i < len(self.starts) and self.starts[i] < end

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self.ends, start)  # first interval ending at or after start
        j = bisect.bisect_right(self.starts, end)  # intervals [i, j) touch [start, end)
        if i < j:
            start = min(start, self.starts[i])
            end = max(end, self.ends[j - 1])
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]


def listed_objects(records: Iterable[Record], header: Header) -> list[Listed]:
    """The objects the log says are resident, least recently admitted first: the newest-first
    replay of the module documentation (without the checksum check)."""
    recs = list(records)
    if not recs or not isinstance(recs[0], Header):
        raise JournalError("the journal does not start with its header")
    first = recs[0]
    if first.version != VERSION:
        raise JournalError(f"journal format {first.version}, this server reads {VERSION}")
    if (first.pool, first.capacity, first.align) != (header.pool, header.capacity, header.align):
        raise JournalError(
            f"the journal describes pool {first.pool!r} of {first.capacity} bytes aligned to "
            f"{first.align}; this server has {header.pool!r} of {header.capacity} aligned to {header.align} "
            "(--l1-size-gb or --l1-align-bytes changed)"
        )
    claimed = _Ranges()
    forgotten: set[tuple[str, int, int, str, bytes]] = set()
    seen: set[tuple[str, int, int, str, bytes]] = set()
    out: list[Listed] = []
    for rec in reversed(recs[1:]):
        if isinstance(rec, Clear):
            break
        if isinstance(rec, Reserve):
            for off, size in rec.ranges:
                claimed.add(off, off + size)
        elif isinstance(rec, Forget):
            forgotten.update((rec.model, rec.kv_rank, rec.group, rec.salt, h) for h in rec.hashes)
        elif isinstance(rec, Seal):
            for h, off, size, nbytes, digest in reversed(rec.objects):
                key = (rec.model, rec.kv_rank, rec.group, rec.salt, h)
                newer = claimed.overlaps(off, off + size)
                claimed.add(off, off + size)
                if newer or key in forgotten or key in seen:
                    continue
                seen.add(key)
                out.append(Listed(rec.model, rec.kv_rank, rec.group, rec.salt, h, off, size, nbytes, digest))
        else:
            raise JournalError("a second header in the journal")
    out.reverse()
    return out


class Journal:
    """The append side: one file, one lock, one `write()` per record."""

    def __init__(self, path: str, header: Header) -> None:
        self.path = path
        self.header = header
        self._lock = threading.Lock()
        self._fd = -1
        self._compacted_size = 0
        self.closed = False

    # ---- writing -------------------------------------------------------------------------

    def rewrite(self, objects: Sequence[Listed]) -> None:
        """Replaces the journal (temp + rename) with the header and `objects`, in order, and
        appends from there on."""
        with self._lock:
            self._rewrite(objects)

    def _rewrite(self, objects: Sequence[Listed]) -> None:
        tmp = f"{self.path}.tmp{os.getpid()}"
        buf = bytearray(_frame(self.header))
        for run in _runs(objects):
            o = run[0]
            buf += _frame(
                Seal(
                    o.model,
                    o.kv_rank,
                    o.group,
                    o.salt,
                    [(x.hash, x.offset, x.size, x.nbytes, x.digest) for x in run],
                )
            )
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, bytes(buf))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._compacted_size = len(buf)

    def _append(self, rec: Record) -> None:
        data = _frame(rec)
        with self._lock:
            if self._fd < 0:
                return
            try:
                _write_all(self._fd, data)
            except OSError as e:
                self._fail(e)

    def _fail(self, e: OSError) -> None:
        """A record could not be written: the journal no longer covers every range, so it must
        never be replayed. It is removed and journaling stops (the next start is cold); the
        request path is not failed for it."""
        log.error(
            "L1 journal %s: write failed (%s); warm restart disabled until the next start", self.path, e
        )
        os.close(self._fd)
        self._fd = -1
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def reserved(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Ranges about to be handed to writers (call before any copy into them)."""
        if ranges:
            self._append(Reserve(list(ranges)))

    def sealed(self, scope: KeyScope, objects: Sequence[tuple[bytes, int, int, int, bytes]]) -> None:
        """Objects whose copy is complete, `(hash, offset, allocated size, bytes written,
        digest)` (call before `finish_write`)."""
        if objects:
            self._append(
                Seal(scope.model_name, scope.kv_rank, scope.object_group, scope.cache_salt, list(objects))
            )

    def sealed_if(
        self,
        scope: KeyScope,
        objects: Sequence[tuple[bytes, int, int, int, bytes]],
        still_resident: Callable[[], bool],
    ) -> bool:
        """`sealed`, if `still_resident()` holds when checked under the journal's lock (the
        background sealer: see the module docstring)."""
        seal = Seal(scope.model_name, scope.kv_rank, scope.object_group, scope.cache_salt, list(objects))
        data = _frame(seal)
        with self._lock:
            if self._fd < 0 or not still_resident():
                return False
            try:
                _write_all(self._fd, data)
            except OSError as e:
                self._fail(e)
                return False
            return True

    def cleared(self) -> None:
        """After a clear of the index: nothing written before is adopted again."""
        self._append(Clear())

    def forgot(self, scope: KeyScope, hashes: Sequence[bytes]) -> None:
        """After a delete: these keys are not adopted again."""
        if hashes:
            self._append(
                Forget(scope.model_name, scope.kv_rank, scope.object_group, scope.cache_salt, list(hashes))
            )

    # ---- upkeep --------------------------------------------------------------------------

    def size(self) -> int:
        with contextlib.suppress(OSError):
            return os.stat(self.path).st_size
        return 0

    def maybe_compact(self) -> tuple[str, dict[str, int]]:
        """The periodic job: rewrites the journal to the objects it lists once it is at least
        MIN_COMPACT_BYTES and twice its last compacted size. Appends wait meanwhile."""
        size = self.size()
        if size < max(MIN_COMPACT_BYTES, 2 * self._compacted_size):
            return "journal small", {"bytes": size}
        return "compacted", self.compact()

    def compact(self) -> dict[str, int]:
        with self._lock:
            if self._fd < 0:
                return {}
            before = self.size()
            objects = listed_objects(read_records(self.path), self.header)
            self._rewrite(objects)
            return {"bytes_before": before, "bytes_after": self._compacted_size, "objects": len(objects)}

    def close(self, compact: bool = True) -> None:
        """A clean stop: compacts (the next start reads less) and stops appending."""
        if self.closed:
            return
        if compact:
            try:
                self.compact()
            except (OSError, JournalError) as e:
                log.warning("L1 journal not compacted at stop: %s", e)
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = -1
            self.closed = True


class Sealer:
    """Checksums admitted objects for the journal on one background thread (module docstring).

    Bounded: at most `max_pending` objects wait; beyond that they are skipped (not re-adopted
    after a restart, never wrong)."""

    def __init__(self, l1: L1Store, journal: Journal, max_pending: int = 1 << 16) -> None:
        self._l1 = l1
        self._journal = journal
        self._max = max_pending
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[KeyScope, list[tuple[bytes, int]]] | None] = queue.SimpleQueue()
        #: Objects waiting or being sealed; objects sealed, and skipped (queue full, or gone
        #: from L1 before their turn).
        self.pending = 0
        self.sealed = 0
        self.skipped = 0
        self._thread = threading.Thread(target=self._run, name="l1-sealer", daemon=True)
        self._thread.start()

    def submit(self, scope: KeyScope, objects: list[tuple[bytes, int]]) -> bool:
        """Objects `(chunk hash, bytes written)` just admitted (or about to be) in `scope`."""
        with self._lock:
            if self.pending + len(objects) > self._max:
                self.skipped += len(objects)
                return False
            self.pending += len(objects)
        self._queue.put((scope, objects))
        return True

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"pending": self.pending, "sealed": self.sealed, "skipped": self.skipped}

    def close(self, timeout: float = 30.0) -> None:
        """Seals what is queued (a clean stop keeps it warm), then ends the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            scope, objects = item
            # A read lease moves an object to the recent end of its LRU list when it ends: sealing
            # a store's chunks last first keeps the order the store gave them (its last chunk is
            # evicted first, so a prefix survives longest).
            for h, n in reversed(objects):
                try:
                    ok = self._seal(scope, h, n)
                except Exception:
                    log.exception("sealing an L1 object for the journal failed")
                    ok = False
                with self._lock:
                    self.pending -= 1
                    if ok:
                        self.sealed += 1
                    else:
                        self.skipped += 1

    def _seal(self, scope: KeyScope, h: bytes, n: int) -> bool:
        index = self._l1.index
        grant = index.lease_read(scope, [h], 1)
        if not grant.hit:
            return False  # evicted, deleted or cleared already (or its write failed)
        try:
            off = grant.offsets[0]
            digest = checksum(self._l1.view(off, n).numpy().data)
            obj = (h, off, index.object_footprint(n), n, digest)

            def still_resident() -> bool:
                slot = index.resolve(scope, [h])[0]
                return slot is not None and slot.offset == off

            return self._journal.sealed_if(scope, [obj], still_resident)
        finally:
            index.release(grant.lease)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _runs(objects: Sequence[Listed]) -> Iterator[list[Listed]]:
    """Consecutive objects of one scope, as one Seal record each."""
    run: list[Listed] = []
    for o in objects:
        if run and (o.model, o.kv_rank, o.group, o.salt) != (
            run[0].model,
            run[0].kv_rank,
            run[0].group,
            run[0].salt,
        ):
            yield run
            run = []
        run.append(o)
    if run:
        yield run


# ---- start --------------------------------------------------------------------------------


def journal_path(state_dir: str, pool_name: str) -> str:
    return os.path.join(state_dir, pool_name, JOURNAL)


def spare(state_dir: str) -> Callable[[str], bool]:
    """For stale-pool cleanup: a pool segment with a journal here waits for its server's
    restart (another port's server on this host), so it is not removed."""
    return lambda segment: os.path.exists(journal_path(state_dir, segment))


def open_warm(
    l1: L1Store, state_dir: str, warm: bool, threads: int | None = None
) -> tuple[Journal | None, WarmReport]:
    """Re-adopts what the previous server left in `l1`'s pool (when `warm` and the pool was
    found, not created) and starts the journal for this server. Returns the journal (None when
    L1 has no pool) and what happened."""
    t0 = time.perf_counter()
    pool = l1.pool
    if pool is None:
        why = l1.pool_error or "L1 is private (--shm-name '')"
        log.info("warm restarts off: L1 is not in a shared-memory pool (%s)", why)
        return None, WarmReport(mode="off", reason=f"no shared-memory pool: {why}")
    path = journal_path(state_dir, pool.name)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    header = Header(VERSION, pool.name, l1.index.capacity_bytes, l1.index.object_footprint(1))
    journal = Journal(path, header)
    report = WarmReport(mode="cold", journal=path)
    adopted: list[Listed] = []
    if not warm:
        report.reason = "--cold-start"
    elif not pool.reused:
        report.reason = "no pool of a previous server (first start, or it was removed)"
    elif not os.path.exists(path):
        report.reason = f"the pool has no journal at {path}"
    else:
        try:
            listed = listed_objects(read_records(path), header)
        except (OSError, JournalError) as e:
            report.reason = f"L1 journal {path} unusable, starting cold: {e}"
            log.error("%s", report.reason)
        else:
            report.mode = "warm"
            adopted = _adopt(l1, listed, report, threads)
    journal.rewrite(adopted)
    report.seconds = round(time.perf_counter() - t0, 3)
    if report.mode == "warm":
        log.info(
            "warm start: re-adopted %d of %d L1 objects (%.2f GiB) left by the previous server in "
            "%.2f s; dropped %d (%.2f GiB, %d failing their checksum)",
            report.adopted_objects,
            report.listed_objects,
            report.adopted_bytes / (1 << 30),
            report.seconds,
            report.dropped_objects,
            report.dropped_bytes / (1 << 30),
            report.checksum_mismatches,
        )
    else:
        log.info("cold start: L1 starts empty (%s); journal %s", report.reason, path)
    return journal, report


def _adopt(l1: L1Store, listed: list[Listed], report: WarmReport, threads: int | None) -> list[Listed]:
    cap = l1.index.capacity_bytes

    def intact(o: Listed) -> bool:
        if o.offset < 0 or not 0 < o.nbytes <= o.size or o.offset + o.size > cap:
            return False
        return checksum(l1.view(o.offset, o.nbytes).numpy().data) == o.digest

    # blake3 runs with the GIL released: verify on every core.
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as ex:
        ok = list(ex.map(intact, listed, chunksize=64))
    good = [o for o, k in zip(listed, ok, strict=True) if k]
    report.listed_objects = len(listed)
    report.checksum_mismatches = len(listed) - len(good)
    outcome = l1.index.adopt([(o.scope(), o.hash, o.offset, o.size) for o in good])
    adopted = [o for o, st in zip(good, outcome, strict=True) if st == "adopted"]
    if l1.digests is not None:
        for o in adopted:
            l1.digests[o.offset] = o.digest
    report.adopted_objects = len(adopted)
    report.adopted_bytes = sum(o.size for o in adopted)
    report.dropped_objects = len(listed) - len(adopted)
    report.dropped_bytes = sum(o.size for o in listed) - report.adopted_bytes
    return adopted
