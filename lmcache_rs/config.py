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


def default_state_dir() -> str:
    """Where a server keeps what outlives it (the L1 journal): under $XDG_RUNTIME_DIR (a tmpfs
    that, like /dev/shm, is gone after a reboot), else ~/.cache/lmcache-rs/state; the
    environment variable LMCACHE_RS_STATE_DIR overrides both ("": keep nothing)."""
    env = os.environ.get("LMCACHE_RS_STATE_DIR")
    if env is not None:
        return env
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run and os.path.isdir(run):
        return os.path.join(run, "lmcache-rs")
    return os.path.join(os.path.expanduser("~"), ".cache", "lmcache-rs", "state")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the flag."""


def _check(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{flag}: {message}")


TRANSFER_MODES = ("auto", "lmcache_driven", "engine_driven")


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
    #: Memory for chunk hashes remembered across requests (each keeps its exact blake3 input:
    #: ~1.1 KiB at 256 tokens a chunk): a prompt seen before is hashed by probes instead of
    #: blake3. 0: off.
    hash_memo_mib: float = 16.0
    #: Which worker kinds are served (spec D): lmcache_driven (register_kv_cache, store,
    #: retrieve), engine_driven (prepare/commit, ops 14-19) or both.
    supported_transfer_mode: str = "auto"
    #: The L1 pool in POSIX shared memory for engine-driven workers:
    #: `/dev/shm/lmcache_l1_pool_<name>`. "auto": named after the port, and L1 stays private
    #: (engine-driven workers refused) when /dev/shm cannot hold it; "": always private.
    shm_name: str = "auto"
    #: /healthcheck turns 503 when the request I/O loop has not ticked for this long (it ticks
    #: at least every 0.1 s when idle): a handler blocking it, a deadlock.
    io_stall_timeout_seconds: float = 10.0
    #: Threads copying one request's chunk objects between L1 and CPU workers' KV (the
    #: request's own thread and shared helpers), each object whole at one torch thread. 0: the
    #: cores, at most 4 (transfer/copier.py says why not torch's intra-op threads).
    cpu_copy_threads: int = 0

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
        _check(self.cpu_copy_threads >= 0, "--cpu-copy-threads", f"must be >= 0, got {self.cpu_copy_threads}")
        _check(self.hash_memo_mib >= 0, "--hash-memo-mib", "must be >= 0 (0: off)")
        s = self.io_stall_timeout_seconds
        _check(math.isfinite(s) and s >= 1, "--io-stall-timeout-seconds", f"must be >= 1, got {s}")
        _check(
            self.supported_transfer_mode in TRANSFER_MODES,
            "--supported-transfer-mode",
            f"must be one of {', '.join(TRANSFER_MODES)}, got {self.supported_transfer_mode!r}",
        )

    @property
    def hash_memo_chunks(self) -> int:
        """Chunk hashes each of the memo's two tables holds within `hash_memo_mib`: keyed by
        the ids (32 + 4 bytes a token) and by their msgpack bytes (40 + at most 5 bytes a
        token), each entry with ~64 bytes of table."""
        per_chunk = (32 + 4 * self.chunk_size + 64) + (40 + 5 * self.chunk_size + 64)
        return int(self.hash_memo_mib * (1 << 20)) // per_chunk

    @property
    def engine_driven(self) -> bool:
        return self.supported_transfer_mode in ("engine_driven", "auto")

    @property
    def lmcache_driven(self) -> bool:
        return self.supported_transfer_mode in ("lmcache_driven", "auto")


POLICIES = ("LRU", "IsolatedLRU", "noop")


class L2Eviction(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An L2 adapter's eviction (spec F `eviction`). No policy: the server's --eviction-policy."""

    eviction_policy: str | None = None
    trigger_watermark: float = 0.8
    eviction_ratio: float = 0.2

    def check(self, flag: str) -> None:
        p = self.eviction_policy
        _check(p is None or p in POLICIES, flag, f"eviction_policy must be one of {POLICIES}, got {p!r}")
        w = self.trigger_watermark
        _check(0 < w <= 1, flag, f"trigger_watermark must be in (0, 1], got {w}")
        _check(0 <= self.eviction_ratio <= 1, flag, "eviction_ratio must be in [0, 1]")


class _L2Base(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag_field="type"):
    #: Shown in /status and metrics (default: `<type>-<position>`).
    name: str | None = None
    #: 0: unlimited (then only quotas evict).
    max_capacity_gb: float = 0.0
    eviction: L2Eviction = msgspec.field(default_factory=L2Eviction)

    def check(self, flag: str) -> None:
        c = self.max_capacity_gb
        _check(math.isfinite(c) and c >= 0, flag, f"max_capacity_gb must be >= 0, got {c}")
        self.eviction.check(flag)

    @property
    def capacity_bytes(self) -> int:
        return int(self.max_capacity_gb * GiB)


class FsL2Config(_L2Base, tag="fs"):
    """A local directory, one file per object (written to a temp file, then renamed)."""

    base_path: str
    #: fsync each object before it becomes visible (survives power loss, slower).
    fsync: bool = False

    def check(self, flag: str) -> None:
        super().check(flag)
        _check(bool(self.base_path), flag, "base_path must not be empty")


class RedisL2Config(_L2Base, tag="redis"):
    """A Redis (or Valkey) server or cluster, shared by every server that names it."""

    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "lmcache-rs:"
    #: Objects unused this long expire (0: never; quotas and capacity still evict).
    ttl_seconds: float = 0.0
    cluster: bool = False
    socket_timeout_seconds: float = 2.0

    def check(self, flag: str) -> None:
        super().check(flag)
        _check(self.ttl_seconds >= 0, flag, "ttl_seconds must be >= 0")
        _check(self.socket_timeout_seconds > 0, flag, "socket_timeout_seconds must be > 0")
        _check(self.url.startswith(("redis://", "rediss://", "unix://")), flag, f"bad url {self.url!r}")


class ValkeyL2Config(RedisL2Config, tag="valkey"):
    """Same as `redis` (Valkey speaks the same protocol)."""


L2AdapterConfig = FsL2Config | RedisL2Config | ValkeyL2Config


def parse_l2_adapter(text: str) -> L2AdapterConfig:
    """One `--l2-adapter` JSON value, e.g. `{"type": "fs", "base_path": "/var/cache/kv"}`."""
    try:
        return msgspec.json.decode(text, type=L2AdapterConfig)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ConfigError(f"--l2-adapter {text!r}: {e}") from None


class StorageConfig(msgspec.Struct, kw_only=True):
    """L1 and L2 (spec A.3, F)."""

    l1_size_gb: float = msgspec.field(default_factory=default_l1_size_gb)
    l1_align_bytes: int = 4096
    eviction_policy: str = "LRU"
    eviction_trigger_watermark: float = 0.8
    eviction_ratio: float = 0.2
    l1_write_ttl_seconds: float = 600.0
    l1_read_ttl_seconds: float = 300.0
    demand_eviction: bool = True
    #: Chunks whose drop from L1 the index remembers, to explain misses (0: none).
    drop_log_entries: int = 65536
    #: Commit L1's pages at start (in the background), so stores never pay first-touch faults.
    l1_prefault: bool = True
    #: Checksum every chunk written into L1 and verify it before each retrieve copies it out.
    verify_checksums: bool = False
    #: What outlives the process (storage/warm.py): the L1 journal that lets a restarted server
    #: re-adopt the shared-memory pool's objects. "": nothing is kept, the pool is unlinked at
    #: exit and no checksum is computed per store.
    state_dir: str = msgspec.field(default_factory=default_state_dir)
    #: Re-adopt what the previous server left (False: start empty, keep journaling).
    warm_start: bool = True
    #: Initial IsolatedLRU quotas, GiB per cache_salt (`_default` is the empty salt).
    quotas_gb: dict[str, float] = msgspec.field(default_factory=dict)
    l2_adapters: list[L2AdapterConfig] = msgspec.field(default_factory=list)
    #: default: L1 keeps what it wrote to L2; skip_l1: L1 drops it once every adapter has it.
    l2_store_policy: str = "default"
    #: default: objects loaded from L2 leave L1 after their reads; retain: they stay.
    l2_prefetch_policy: str = "default"
    l2_prefetch_max_in_flight: int = 8
    #: Chunks waiting for write-through; when full, new ones are skipped (and counted).
    l2_write_queue_size: int = 4096

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
            self.eviction_policy in POLICIES,
            "--eviction-policy",
            f"must be LRU, IsolatedLRU or noop, got {self.eviction_policy!r}",
        )
        w = self.eviction_trigger_watermark
        _check(0 < w <= 1, "--eviction-trigger-watermark", f"must be in (0, 1], got {w}")
        _check(0 <= self.eviction_ratio <= 1, "--eviction-ratio", "must be in [0, 1]")
        _check(self.l1_write_ttl_seconds > 0, "--l1-write-ttl-seconds", "must be > 0")
        _check(self.l1_read_ttl_seconds > 0, "--l1-read-ttl-seconds", "must be > 0")
        _check(0 <= self.drop_log_entries <= 1 << 30, "--drop-log-entries", "must be in [0, 2^30]")
        names = set()
        for i, a in enumerate(self.l2_adapters):
            a.check("--l2-adapter")
            if a.name is None:
                a.name = f"{type(a).__struct_config__.tag}-{i}"
            _check(a.name not in names, "--l2-adapter", f"duplicate name {a.name!r}")
            names.add(a.name)
        _check(
            self.l2_store_policy in ("default", "skip_l1"), "--l2-store-policy", "must be default or skip_l1"
        )
        _check(
            self.l2_prefetch_policy in ("default", "retain"),
            "--l2-prefetch-policy",
            "must be default or retain",
        )
        _check(self.l2_prefetch_max_in_flight >= 1, "--l2-prefetch-max-in-flight", "must be >= 1")
        _check(self.l2_write_queue_size >= 1, "--l2-write-queue-size", "must be >= 1")

    @property
    def l1_size_bytes(self) -> int:
        return int(self.l1_size_gb * GiB)


class HttpConfig(msgspec.Struct, kw_only=True):
    """The operator HTTP API."""

    http_host: str = "0.0.0.0"
    http_port: int = 8080
    enabled: bool = True
    #: Bearer token required by mutating and sensitive endpoints (None: open). Never shown.
    auth_token: str | None = None
    #: The dashboard's history (GET /stats/history): one sample this often, kept this long.
    stats_history_interval_seconds: float = 2.0
    stats_history_seconds: float = 600.0

    def __post_init__(self) -> None:
        _check(0 <= self.http_port < 65536, "--http-port", f"must be in 0..65535, got {self.http_port}")
        every, keep = self.stats_history_interval_seconds, self.stats_history_seconds
        _check(0.1 <= every <= 3600, "--stats-history-interval-seconds", f"must be in 0.1..3600, got {every}")
        _check(
            every <= keep <= 100_000 * every,
            "--stats-history-seconds",
            f"must be at least the interval ({every} s) and hold at most 100000 samples, got {keep}",
        )
        t = self.auth_token
        _check(
            t is None or (len(t) >= 16 and t.isprintable() and " " not in t),
            "--http-auth-token-file",
            "the token must be at least 16 printable characters without spaces",
        )


class ServerConfig(msgspec.Struct, kw_only=True):
    mp: MPConfig = msgspec.field(default_factory=MPConfig)
    storage_manager: StorageConfig = msgspec.field(default_factory=StorageConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
