"""Server configuration: one msgspec tree, validated once at startup (spec A.2/A.3).

Every section checks its own values in `__post_init__`, so a bad value fails at startup with a
message naming the flag; nothing downstream re-validates.
"""

from __future__ import annotations

import math
import os
import uuid

import msgspec

from lmcache_rs import InvalidKeyError, validate_salt

GiB = 1 << 30


def default_l1_size_gb() -> float:
    """8 GiB, or a quarter of physical memory on smaller machines."""
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - non-POSIX
        return 8.0
    return round(min(8.0, phys / GiB / 4), 2)


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the flag."""


def _check(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{flag}: {message}")


class MPConfig(msgspec.Struct, kw_only=True):
    """The request server (ZMQ) and engine."""

    instance_id: str = msgspec.field(default_factory=lambda: str(uuid.uuid4()))
    host: str = "localhost"
    port: int = 5555
    chunk_size: int = 256
    null_block_id: int = 0
    max_workers: int = 4
    max_gpu_workers: int | None = None
    max_cpu_workers: int | None = None
    hash_algorithm: str = "blake3"
    worker_reap_timeout_seconds: float = 120.0
    worker_registration_grace_seconds: float = 3600.0
    session_ttl_seconds: float = 600.0
    max_message_bytes: int = 256 << 20
    max_pending_requests: int = 4096

    def __post_init__(self) -> None:
        _check(0 < self.port < 65536, "--port", f"must be in 1..65535, got {self.port}")
        _check(self.chunk_size > 0, "--chunk-size", f"must be > 0, got {self.chunk_size}")
        _check(self.max_workers >= 1, "--max-workers", f"must be >= 1, got {self.max_workers}")
        if self.max_gpu_workers is None:
            self.max_gpu_workers = self.max_workers
        if self.max_cpu_workers is None:
            self.max_cpu_workers = self.max_workers
        _check(self.max_gpu_workers >= 1, "--max-gpu-workers", "must be >= 1")
        _check(self.max_cpu_workers >= 1, "--max-cpu-workers", "must be >= 1")
        _check(
            self.hash_algorithm == "blake3",
            "--hash-algorithm",
            f"only 'blake3' is built in (got {self.hash_algorithm!r}); vLLM clients default to it",
        )
        r = self.worker_reap_timeout_seconds
        _check(r == 0 or r >= 1, "--worker-reap-timeout-seconds", f"must be 0 (off) or >= 1, got {r}")
        _check(
            self.worker_registration_grace_seconds >= r,
            "--worker-registration-grace-seconds",
            "must be >= --worker-reap-timeout-seconds",
        )
        _check(self.session_ttl_seconds > 0, "--session-ttl-seconds", "must be > 0")
        _check(self.max_message_bytes >= 1 << 20, "--max-message-bytes", "must be >= 1 MiB")
        _check(self.max_pending_requests >= 1, "--max-pending-requests", "must be >= 1")


class StorageConfig(msgspec.Struct, kw_only=True):
    """L1 (spec A.3)."""

    l1_size_gb: float = msgspec.field(default_factory=default_l1_size_gb)
    l1_align_bytes: int = 4096
    eviction_policy: str = "LRU"
    eviction_trigger_watermark: float = 0.8
    eviction_ratio: float = 0.2
    l1_write_ttl_seconds: float = 600.0
    l1_read_ttl_seconds: float = 300.0
    demand_eviction: bool = True
    #: Initial IsolatedLRU quotas, GiB per cache_salt (`_default` is the empty salt).
    quotas_gb: dict[str, float] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        for salt, gb in self.quotas_gb.items():
            try:
                validate_salt("" if salt == "_default" else salt)
            except InvalidKeyError as e:
                raise ConfigError(f"--quota: {e}") from None
            _check(math.isfinite(gb) and gb >= 0, "--quota", f"{salt}: must be a finite GiB >= 0")
        _check(self.l1_size_gb > 0, "--l1-size-gb", f"must be > 0, got {self.l1_size_gb}")
        a = self.l1_align_bytes
        _check(a > 0 and a & (a - 1) == 0, "--l1-align-bytes", f"must be a power of two, got {a}")
        _check(
            int(self.l1_size_gb * GiB) >= a,
            "--l1-size-gb",
            "must hold at least one aligned block",
        )
        _check(
            self.eviction_policy in ("LRU", "IsolatedLRU", "noop"),
            "--eviction-policy",
            f"must be LRU, IsolatedLRU or noop, got {self.eviction_policy!r}",
        )
        w = self.eviction_trigger_watermark
        _check(0 < w <= 1, "--eviction-trigger-watermark", f"must be in (0, 1], got {w}")
        _check(0 <= self.eviction_ratio <= 1, "--eviction-ratio", "must be in [0, 1]")
        _check(self.l1_write_ttl_seconds > 0, "--l1-write-ttl-seconds", "must be > 0")
        _check(self.l1_read_ttl_seconds > 0, "--l1-read-ttl-seconds", "must be > 0")

    @property
    def l1_size_bytes(self) -> int:
        return int(self.l1_size_gb * GiB)


class HttpConfig(msgspec.Struct, kw_only=True):
    """The operator HTTP API."""

    http_host: str = "0.0.0.0"
    http_port: int = 8080
    enabled: bool = True

    def __post_init__(self) -> None:
        _check(0 <= self.http_port < 65536, "--http-port", f"must be in 0..65535, got {self.http_port}")


class ServerConfig(msgspec.Struct, kw_only=True):
    mp: MPConfig = msgspec.field(default_factory=MPConfig)
    storage_manager: StorageConfig = msgspec.field(default_factory=StorageConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
