"""The L1 arena in POSIX shared memory, for engine-driven workers (spec D.3, E.1).

Engine-driven workers copy KV straight into and out of L1 slots, so L1 lives in a segment
`/dev/shm/lmcache_l1_pool_<name>` that they map by name. Three rules keep it safe:

* **Committed up front.** tmpfs allocates pages on first touch; if /dev/shm is full by then
  (Docker's default is 64 MiB) the writing process gets SIGBUS. So the pool checks the free
  space first and `posix_fallocate`s the whole segment at start: either every page exists or
  the server says why it cannot have the pool (measured here: 0.38 s per GiB).
* **Owned while alive.** The server holds an exclusive `flock` on the segment for its whole
  life. At start a segment with the target name (or a default-named one) that nobody holds is
  the leftover of a crashed server and is unlinked; one that is held belongs to a live server
  and is left alone (the start fails with a clear message if it has our name).
* **Unlinked on exit**, unless it is *kept* for a warm restart (`keep`, with a state directory:
  `storage/warm.py`). Then a stop leaves the segment, a restarted server with the same name
  opens it again (`reused`) and re-adopts what its journal proves intact; stale-pool cleanup
  spares it and any other server's pool that has a journal (`spare`). Otherwise `close()`
  unlinks the name; workers that still map it keep their pages until they unmap, new workers
  cannot attach to a stopped server's pool.

The segment is created 0600: it holds every tenant's KV, so only the server's user (and the
workers running as that user) may map it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import re
from collections.abc import Callable

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
#: Prefix of every L1 pool segment (LMCache names its pools the same way).
POOL_PREFIX = "lmcache_l1_pool_"
#: Prefix of the names this server picks itself (`--shm-name auto`): only those, and the exact
#: name configured, are candidates for stale cleanup; other servers' pools are never touched.
AUTO_PREFIX = "lmcache_rs_"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")


class ShmPoolError(RuntimeError):
    """The pool cannot be created; the message says why and what to change."""


def auto_name(port: int) -> str:
    """The pool name a server on `port` uses by default (ports are unique per host)."""
    return f"{AUTO_PREFIX}{port}"


def shm_free_bytes(shm_dir: str = SHM_DIR) -> int:
    st = os.statvfs(shm_dir)
    return st.f_bavail * st.f_frsize


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def remove_stale(
    name: str,
    shm_dir: str = SHM_DIR,
    keep: bool = False,
    spare: Callable[[str], bool] | None = None,
) -> list[str]:
    """Unlinks pool segments nobody holds: the one named `name` (unless `keep`) and any
    auto-named one for which `spare(segment name)` is not true. Returns the names removed. A
    held segment named `name` raises ShmPoolError."""
    removed: list[str] = []
    try:
        entries = os.listdir(shm_dir)
    except OSError:
        return removed
    target = POOL_PREFIX + name
    for entry in entries:
        if entry != target and not entry.startswith(POOL_PREFIX + AUTO_PREFIX):
            continue
        path = os.path.join(shm_dir, entry)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue  # gone meanwhile, or not ours to open
        try:
            if not _try_lock(fd):
                if entry == target:
                    raise ShmPoolError(
                        f"shared-memory pool {entry!r} is in use by another running server; "
                        "give this one another --shm-name (or --port, with --shm-name auto)"
                    )
                continue
            if (keep and entry == target) or (entry != target and spare is not None and spare(entry)):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            removed.append(entry)
        finally:
            os.close(fd)  # also drops the lock
    if removed:
        log.info("removed %d stale shared-memory pool(s) of crashed servers: %s", len(removed), removed)
    return removed


class ShmPool:
    """One committed, locked, shared mapping of `size` bytes. With `keep`, an unheld segment of
    this name and size is opened again (`reused`: its bytes are the previous server's) and
    `close()` leaves the segment in place."""

    def __init__(
        self,
        name: str,
        size: int,
        shm_dir: str = SHM_DIR,
        keep: bool = False,
        spare: Callable[[str], bool] | None = None,
    ) -> None:
        if not _NAME.match(name) or name in (".", ".."):
            raise ShmPoolError(f"--shm-name {name!r}: use letters, digits, '_', '-', '.' (at most 200)")
        self.name = POOL_PREFIX + name
        self.size = size
        self.path = os.path.join(shm_dir, self.name)
        self.keep = keep
        self.reused = False
        remove_stale(name, shm_dir, keep, spare)
        if keep and self._reopen(size):
            return
        free = shm_free_bytes(shm_dir)
        if free < size:
            raise ShmPoolError(
                f"{shm_dir} has {free / (1 << 30):.2f} GiB free, the L1 pool needs "
                f"{size / (1 << 30):.2f} GiB: "
                "enlarge it (docker run --shm-size, a Kubernetes emptyDir with medium: Memory), "
                "lower --l1-size-gb, or pass --shm-name '' to keep L1 private (engine-driven "
                "workers are then refused)"
            )
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ShmPoolError(f"shared-memory pool {self.name!r} appeared while starting; retry") from None
        try:
            if not _try_lock(self._fd):
                raise ShmPoolError(f"shared-memory pool {self.name!r} was locked by another process")
            try:
                os.posix_fallocate(self._fd, 0, size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.ENOMEM):
                    raise ShmPoolError(
                        f"{shm_dir} ran out of space committing the {size / (1 << 30):.2f} GiB L1 pool "
                        f"({e.strerror}); enlarge it or lower --l1-size-gb"
                    ) from None
                raise
            self.mm = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            raise
        self._closed = False
        log.info("L1 pool %s: %d bytes committed in %s", self.name, size, shm_dir)

    def _reopen(self, size: int) -> bool:
        """Opens the previous server's segment of this name (left unheld by `remove_stale`).
        False when there is none; one of another size is unlinked (a cold start follows)."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            if not _try_lock(fd):
                raise ShmPoolError(f"shared-memory pool {self.name!r} was locked by another process")
            have = os.fstat(fd).st_size
            if have != size:
                log.warning(
                    "L1 pool %s holds %d bytes, this server needs %d: recreating it (cold start)",
                    self.name,
                    have,
                    size,
                )
                os.unlink(self.path)
                os.close(fd)
                return False
            # Commits pages the previous server never touched; keeps the contents.
            os.posix_fallocate(fd, 0, size)
            self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        self._fd = fd
        self._closed = False
        self.reused = True
        log.info("L1 pool %s: reopened the previous server's %d bytes", self.name, size)
        return True

    def close(self) -> None:
        """Unlinks the name (if it is still this pool's; not when kept) and drops the lock. The
        mapping itself lives on while the L1 buffer does."""
        if self._closed:
            return
        self._closed = True
        if self.keep:
            os.close(self._fd)
            return
        try:
            same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.unlink(self.path)
        os.close(self._fd)
