"""L1: one torch byte buffer (pinned when CUDA is present) indexed by the Rust core.

With a shared-memory pool (engine-driven workers, `storage/shm_pool.py`) the buffer is that
pool's mapping, registered with CUDA as pinned memory where CUDA exists. Otherwise, without
CUDA, the buffer is an anonymous mapping with transparent huge pages requested, and
its pages are committed up front by a background thread (`MADV_POPULATE_WRITE`: page tables
filled, contents untouched, so it can run while stores write). Otherwise the first store into
each 4 KiB page pays a page fault: measured 0.05-0.13x memcpy for a cold store.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from lmcache_rs import KeyScope, L1Index, checksum
from lmcache_rs.config import StorageConfig
from lmcache_rs.storage.shm_pool import SHM_DIR, ShmPool, ShmPoolError

if TYPE_CHECKING:
    from lmcache_rs.storage.warm import Journal, Sealer


def _salt(name: str) -> str:
    """The HTTP/CLI spelling of the empty salt is `_default` (seed document, /quota)."""
    return "" if name == "_default" else name


log = logging.getLogger(__name__)

#: Linux >= 5.14: fault pages in writable without changing their contents.
MADV_POPULATE_WRITE = 23
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _cuda_host_register(buf: torch.Tensor) -> bool:
    """Pins an existing mapping for DMA (cudaHostRegister); False, logged, when CUDA refuses."""
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
    if int(err) != 0:
        log.warning("cudaHostRegister of the L1 pool failed (error %d): L1 is not pinned", int(err))
        return False
    return True


class L1Store:
    """Owns the L1 buffer and its index. Offsets from the index address `buffer`.

    `shm_name`: put the buffer in the POSIX shm pool of that name; when the pool cannot be had,
    raise (`shm_required`) or keep L1 private and say why in `pool_error`."""

    def __init__(
        self,
        cfg: StorageConfig,
        shm_name: str | None = None,
        shm_required: bool = False,
        shm_dir: str = SHM_DIR,
        keep_pool: bool = False,
        spare_pool: Callable[[str], bool] | None = None,
    ) -> None:
        """`keep_pool`: a warm-restart pool (`ShmPool`'s `keep`; `spare_pool` its `spare`)."""
        self.index = L1Index(
            cfg.l1_size_bytes,
            align_bytes=cfg.l1_align_bytes,
            policy=cfg.eviction_policy,
            trigger_watermark=cfg.eviction_trigger_watermark,
            eviction_ratio=cfg.eviction_ratio,
            write_ttl_secs=cfg.l1_write_ttl_seconds,
            read_ttl_secs=cfg.l1_read_ttl_seconds,
            demand_eviction=cfg.demand_eviction,
            drop_log_entries=cfg.drop_log_entries,
        )
        for salt, gb in cfg.quotas_gb.items():
            self.index.set_quota(_salt(salt), int(gb * (1 << 30)))
        #: With --verify-checksums: blake3 of the object at each L1 offset, set by every writer
        #: (store, L2 prefetch) before the object is admitted, checked by retrieve.
        self.digests: dict[int, bytes] | None = {} if cfg.verify_checksums else None
        #: The warm-restart journal (storage/warm.py), set by the runtime; None: not kept.
        self.journal: Journal | None = None
        #: Checksums admitted objects for the journal in the background (storage/warm.py).
        self.sealer: Sealer | None = None
        self.pinned = torch.cuda.is_available()
        size = self.index.capacity_bytes
        self.prefaulted_bytes = 0
        self._mm: mmap.mmap | None = None
        self.pool: ShmPool | None = None
        #: Why L1 is private although a pool was asked for (engine-driven workers are told).
        self.pool_error: str | None = None
        if shm_name:
            try:
                self.pool = ShmPool(shm_name, size, shm_dir, keep_pool, spare_pool)
            except ShmPoolError as e:
                if shm_required:
                    raise
                self.pool_error = str(e)
                log.warning("L1 stays private, engine-driven workers will be refused: %s", e)
        if self.pool is not None:
            self._mm = self.pool.mm
        elif self.pinned:  # cudaHostAlloc commits (and pins) every page now
            self.buffer = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self.prefaulted_bytes = size
            return
        else:
            self._mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.buffer = torch.frombuffer(self._mm, dtype=torch.uint8)
        with contextlib.suppress(OSError, AttributeError):
            self._mm.madvise(mmap.MADV_HUGEPAGE)
        if self.pinned:  # the pool with CUDA: registering it faults in and locks every page
            self.pinned = _cuda_host_register(self.buffer)
            if self.pinned:
                self.prefaulted_bytes = size
                return
        if cfg.l1_prefault:
            threading.Thread(target=self._prefault, name="l1-prefault", daemon=True).start()

    def _prefault(self) -> None:
        """Commits the buffer's pages in 256 MiB steps (ctypes drops the GIL around madvise)."""
        assert self._mm is not None
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._mm))
        size = len(self._mm)
        step = 256 << 20
        for off in range(0, size, step):
            n = min(step, size - off)
            if _libc.madvise(ctypes.c_void_p(base + off), ctypes.c_size_t(n), MADV_POPULATE_WRITE) != 0:
                log.info(
                    "L1 pages not prefaulted (madvise: errno %d); first stores fault them", ctypes.get_errno()
                )
                return
            self.prefaulted_bytes = off + n

    @property
    def shm_name(self) -> str:
        """The pool's name as workers open it ("" when L1 is private)."""
        return self.pool.name if self.pool is not None else ""

    def close(self) -> None:
        """Closes the journal, then unlinks the shared-memory pool, if any and not kept (the
        mapping lives as long as the buffer)."""
        if self.sealer is not None:
            self.sealer.close()
        if self.journal is not None:
            self.journal.close()
        if self.pool is not None:
            self.pool.close()

    def view(self, offset: int, size: int) -> torch.Tensor:
        return self.buffer[offset : offset + size]

    def seal(self, offset: int, size: int, digest: bytes | None = None) -> bytes | None:
        """With --verify-checksums, records the checksum of a freshly written object and
        returns it (else a no-op: None); `digest` when the writer already verified the bytes
        against one (an L2 load)."""
        if self.digests is None:
            return digest
        digest = digest or checksum(self.view(offset, size).numpy().data)
        self.digests[offset] = digest
        return digest

    # ---- the warm-restart journal (no-ops without one) ----------------------------------------

    def journal_reserved(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Allocated `(offset, size)` ranges about to be written: call before any copy."""
        if self.journal is not None and ranges:
            self.journal.reserved(ranges)

    def journal_sealed(
        self,
        scope: KeyScope,
        hashes: Sequence[bytes],
        slots: Sequence[tuple[int, int]],
        digests: Sequence[bytes | None],
    ) -> None:
        """Objects written (`slots`: `(offset, bytes written)`, `digests`: what `seal` returned):
        call after the copy, before `finish_write`. Only objects with a digest (verification
        on, or an L2 load) are journaled here; `journal_admitted` hands the others to the
        background sealer once resident."""
        if self.journal is None or not hashes:
            return
        objs = [
            (h, off, self.index.object_footprint(n), n, d)
            for h, (off, n), d in zip(hashes, slots, digests, strict=True)
            if d is not None
        ]
        self.journal.sealed(scope, objs)

    def journal_admitted(self, scope: KeyScope, hashes: Sequence[bytes], nbytes: int) -> None:
        """Objects of `nbytes` just admitted by `finish_write`: without --verify-checksums (no
        digest at the store) the background sealer checksums and journals them, off the
        store's path (storage/warm.py `Sealer`)."""
        if self.sealer is not None and self.digests is None and hashes:
            self.sealer.submit(scope, [(h, nbytes) for h in hashes])

    def journal_cleared(self) -> None:
        if self.journal is not None:
            self.journal.cleared()

    def journal_forgot(self, scope: KeyScope, hashes: Sequence[bytes]) -> None:
        if self.journal is not None and hashes:
            self.journal.forgot(scope, hashes)

    def sealed(self, offset: int) -> bytes | None:
        """The checksum sealed for the object at `offset`, if verification is on."""
        return self.digests.get(offset) if self.digests is not None else None

    def intact(self, offset: int, size: int) -> bool:
        """Whether the object still has the bytes it was sealed with (True without verification)."""
        if self.digests is None:
            return True
        want = self.digests.get(offset)
        return want is not None and checksum(self.view(offset, size).numpy().data) == want
