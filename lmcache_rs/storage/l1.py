"""L1: one torch byte buffer (pinned when CUDA is present) indexed by the Rust core."""

from __future__ import annotations

import torch

from lmcache_rs import L1Index
from lmcache_rs.config import StorageConfig


def _salt(name: str) -> str:
    """The HTTP/CLI spelling of the empty salt is `_default` (seed document, /quota)."""
    return "" if name == "_default" else name


class L1Store:
    """Owns the L1 buffer and its index. Offsets from the index address `buffer`."""

    def __init__(self, cfg: StorageConfig) -> None:
        self.index = L1Index(
            cfg.l1_size_bytes,
            align_bytes=cfg.l1_align_bytes,
            policy=cfg.eviction_policy,
            trigger_watermark=cfg.eviction_trigger_watermark,
            eviction_ratio=cfg.eviction_ratio,
            write_ttl_secs=cfg.l1_write_ttl_seconds,
            read_ttl_secs=cfg.l1_read_ttl_seconds,
            demand_eviction=cfg.demand_eviction,
        )
        for salt, gb in cfg.quotas_gb.items():
            self.index.set_quota(_salt(salt), int(gb * (1 << 30)))
        self.pinned = torch.cuda.is_available()
        # Untouched pages of a CPU buffer are not committed by the OS until written.
        self.buffer = torch.empty(self.index.capacity_bytes, dtype=torch.uint8, pin_memory=self.pinned)

    def view(self, offset: int, size: int) -> torch.Tensor:
        return self.buffer[offset : offset + size]
