"""`lmcache-rs server [flags]`: the flags of spec A.2/A.3 that apply, with working defaults."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lmcache_rs.config import (
    TRANSFER_MODES,
    ConfigError,
    HttpConfig,
    MPConfig,
    ServerConfig,
    StorageConfig,
    default_l1_size_gb,
    parse_l2_adapter,
)

TOKEN_ENV = "LMCACHE_RS_HTTP_TOKEN"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmcache-rs", description="lmcache-rs KV-cache server")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "server",
        help="run the KV-cache server",
        description="Run the KV-cache server: a ZMQ endpoint for LMCache 0.5.x MP clients (vLLM's "
        "LMCacheMPConnector) and an operator HTTP API. Every flag has a working default.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    mp = MPConfig()
    st = StorageConfig()
    http = HttpConfig()
    g = s.add_argument_group("request server")
    g.add_argument("--host", default=mp.host, help="address the ZMQ ROUTER socket binds to")
    g.add_argument("--port", type=int, default=mp.port, help="ZMQ port (clients use tcp://HOST:PORT)")
    g.add_argument("--instance-id", default=None, help="server identity (default: a random UUID)")
    g.add_argument(
        "--chunk-size",
        type=int,
        default=mp.chunk_size,
        help="tokens per chunk; must match the clients and be a multiple of the engine block size",
    )
    g.add_argument(
        "--null-block-id",
        type=int,
        default=mp.null_block_id,
        help="engine block id meaning 'no data' (e.g. freed out of a sliding window): a chunk is "
        "stored for an object group only where its blocks there are all live",
    )
    g.add_argument(
        "--separate-object-groups",
        action="store_true",
        help="accepted for LMCache compatibility and always on (a no-op): a hybrid model's "
        "full-attention and sliding-window layers are stored as separate object groups, one per "
        "window size, so KV that fell out of a window is never stored or served",
    )
    g.add_argument("--max-workers", type=int, default=mp.max_workers, help="threads of each request pool")
    g.add_argument(
        "--max-gpu-workers",
        type=int,
        default=None,
        help="threads of the transfer pool (store/retrieve, FIFO per client); default --max-workers",
    )
    g.add_argument(
        "--max-cpu-workers",
        type=int,
        default=None,
        help="threads of the control pool (lookup, query, ping...); default --max-workers",
    )
    g.add_argument("--hash-algorithm", default=mp.hash_algorithm, help="chunk hash; only blake3 is built in")
    g.add_argument(
        "--worker-reap-timeout-seconds",
        type=float,
        default=mp.worker_reap_timeout_seconds,
        help="drop a worker registration silent this long after it pinged (0: never)",
    )
    g.add_argument(
        "--worker-registration-grace-seconds",
        type=float,
        default=mp.worker_registration_grace_seconds,
        help="silence allowed to a registered worker that never pinged",
    )
    g.add_argument(
        "--session-ttl-seconds",
        type=float,
        default=mp.session_ttl_seconds,
        help="a request session (hash chain, lookup locks) idle this long is dropped",
    )
    g.add_argument(
        "--max-message-bytes",
        type=int,
        default=mp.max_message_bytes,
        help="largest accepted ZMQ message; larger ones are dropped by the transport",
    )
    g.add_argument(
        "--max-pending-requests",
        type=int,
        default=mp.max_pending_requests,
        help="queued requests beyond this get an immediate 'overloaded' error reply",
    )
    g.add_argument(
        "--hash-memo-mib",
        type=float,
        default=mp.hash_memo_mib,
        help="memory for chunk hashes remembered across requests, by token ids and by their "
        "msgpack bytes (about 2.4 KiB a chunk at 256 tokens a chunk), so a prompt seen before is "
        "neither parsed nor hashed again; 0: off",
    )
    g.add_argument(
        "--supported-transfer-mode",
        choices=TRANSFER_MODES,
        default=mp.supported_transfer_mode,
        help="workers served: lmcache_driven (the server copies: GPU workers, CPU workers sharing "
        "KV in shm), engine_driven (workers copy into L1 slots: CPU vLLM's default), or both",
    )
    g.add_argument(
        "--shm-name",
        default=mp.shm_name,
        help="engine-driven L1 pool /dev/shm/lmcache_l1_pool_NAME; 'auto': named after --port, and "
        "L1 stays private (engine-driven workers refused) if /dev/shm is too small; '': private",
    )
    g.add_argument(
        "--cpu-copy-threads",
        type=int,
        default=mp.cpu_copy_threads,
        help="threads copying one request's chunk objects to or from a CPU worker's KV, each "
        "object whole (torch runs one intra-op thread); 0: the cores, at most 4",
    )
    g.add_argument(
        "--io-stall-timeout-seconds",
        type=float,
        default=mp.io_stall_timeout_seconds,
        help="/healthcheck answers 503 when the request I/O loop has not ticked for this long "
        "(it ticks at least every 0.1 s when idle)",
    )
    g = s.add_argument_group("L1 (CPU memory)")
    g.add_argument(
        "--l1-size-gb",
        type=float,
        default=None,
        help=f"L1 capacity in GiB (default: 8, or a quarter of RAM if smaller; here {default_l1_size_gb()})",
    )
    g.add_argument("--l1-align-bytes", type=int, default=st.l1_align_bytes, help="allocation alignment")
    g.add_argument(
        "--eviction-policy",
        default=st.eviction_policy,
        choices=["LRU", "IsolatedLRU", "noop"],
        help="LRU: one recency list; IsolatedLRU: one per cache_salt with per-salt quotas "
        "(allowlist: a salt without a quota is evicted); noop: never evict",
    )
    g.add_argument(
        "--eviction-trigger-watermark",
        type=float,
        default=st.eviction_trigger_watermark,
        help="L1 used/capacity at which the 1 s eviction cycle frees memory",
    )
    g.add_argument(
        "--eviction-ratio",
        type=float,
        default=st.eviction_ratio,
        help="fraction of the used bytes a triggered cycle frees",
    )
    g.add_argument(
        "--l1-write-ttl-seconds",
        type=float,
        default=st.l1_write_ttl_seconds,
        help="a write reservation not finished in this time is reclaimed",
    )
    g.add_argument(
        "--l1-read-ttl-seconds",
        type=float,
        default=st.l1_read_ttl_seconds,
        help="a read lock (lookup) not released in this time stops protecting its object",
    )
    g.add_argument(
        "--quota",
        action="append",
        default=[],
        metavar="SALT=GIB",
        help="initial IsolatedLRU quota of a cache_salt (repeatable; _default is the empty salt); "
        "change them at run time with PUT /quota/{salt}",
    )
    g.add_argument(
        "--no-demand-eviction",
        dest="demand_eviction",
        action="store_false",
        help="do not evict on the store path when L1 is full (LMCache's behaviour)",
    )
    g.add_argument(
        "--drop-log-entries",
        type=int,
        default=st.drop_log_entries,
        metavar="N",
        help="chunks whose drop from L1 (eviction, delete, clear...) the server remembers to answer "
        "why a request missed (POST /cache/explain; about 100 bytes each; 0: none). "
        "Default: %(default)s",
    )
    g.add_argument(
        "--no-l1-prefault",
        dest="l1_prefault",
        action="store_false",
        help="do not commit L1's memory at start (pages are then faulted in by the first stores)",
    )
    g.add_argument(
        "--verify-checksums",
        action="store_true",
        help="blake3 every chunk written into L1 and verify it on every retrieve (a mismatch is "
        "reported as a miss and counted, never copied to the engine)",
    )
    g = s.add_argument_group("restarts")
    g.add_argument(
        "--state-dir",
        default=st.state_dir,
        metavar="PATH",
        help="where the server keeps the journal of its shared-memory L1 pool, so that a restart "
        "(crash, upgrade) re-adopts every object whose bytes still match their checksum; '': keep "
        "nothing (the pool is removed at exit, stores compute no checksum). See docs/operations.md",
    )
    g.add_argument(
        "--warm-start",
        dest="warm_start",
        action="store_true",
        default=st.warm_start,
        help="re-adopt the L1 objects the previous server left in the pool (the default)",
    )
    g.add_argument(
        "--cold-start",
        dest="warm_start",
        action="store_false",
        help="start with an empty L1 even if the previous server left one (journaling goes on)",
    )
    g = s.add_argument_group("L2 (disk, Redis/Valkey)")
    g.add_argument(
        "--l2-adapter",
        action="append",
        default=[],
        metavar="JSON",
        help='an L2 adapter (repeatable), e.g. \'{"type": "fs", "base_path": "/var/cache/lmcache", '
        '"max_capacity_gb": 100}\' or \'{"type": "redis", "url": "redis://127.0.0.1:6379/0"}\'; '
        "optional keys: name, max_capacity_gb, eviction {eviction_policy, trigger_watermark, "
        "eviction_ratio}; fs: fsync; redis/valkey: key_prefix, ttl_seconds, cluster, "
        "socket_timeout_seconds. See docs/operations.md",
    )
    g.add_argument(
        "--l2-store-policy",
        default=st.l2_store_policy,
        choices=["default", "skip_l1"],
        help="default: every chunk stored in L1 is also written to every adapter; skip_l1: and "
        "then dropped from L1",
    )
    g.add_argument(
        "--l2-prefetch-policy",
        default=st.l2_prefetch_policy,
        choices=["default", "retain"],
        help="default: chunks a lookup loads from L2 leave L1 after they are retrieved; retain: they stay",
    )
    g.add_argument(
        "--l2-prefetch-max-in-flight",
        type=int,
        default=st.l2_prefetch_max_in_flight,
        help="concurrent lookups loading from L2",
    )
    g.add_argument(
        "--l2-write-queue-size",
        type=int,
        default=st.l2_write_queue_size,
        help="chunks waiting to be written to L2; beyond it writes are skipped and counted",
    )
    g = s.add_argument_group("HTTP API")
    g.add_argument("--http-host", default=http.http_host, help="address of the operator HTTP API")
    g.add_argument(
        "--http-port",
        type=int,
        default=http.http_port,
        help="port of the operator HTTP API (0: any free port)",
    )
    g.add_argument("--no-http", dest="http_enabled", action="store_false", help="do not serve the HTTP API")
    g.add_argument(
        "--http-auth-token-file",
        metavar="PATH",
        help="require 'Authorization: Bearer <token>' (the file's first line) on mutating and "
        "sensitive endpoints (/clear-cache, /cache/clear, quota writes, /loglevel changes, /env, "
        "/threads, /metrics/reset, /stats/history); the environment variable "
        "LMCACHE_RS_HTTP_TOKEN does the same",
    )
    g.add_argument(
        "--stats-history-interval-seconds",
        type=float,
        default=http.stats_history_interval_seconds,
        help="the dashboard's history (/dashboard, /stats/history) takes a sample this often",
    )
    g.add_argument(
        "--stats-history-seconds",
        type=float,
        default=http.stats_history_seconds,
        help="how long the dashboard's history reaches back (memory: about 1 KiB per sample)",
    )
    g = s.add_argument_group("logging")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def auth_token(ns: argparse.Namespace) -> str | None:
    if ns.http_auth_token_file:
        try:
            with open(ns.http_auth_token_file, encoding="utf-8") as f:
                return f.readline().strip()
        except OSError as e:
            raise ConfigError(f"--http-auth-token-file: {e}") from None
    return os.environ.get(TOKEN_ENV) or None


def build_config(ns: argparse.Namespace) -> ServerConfig:
    mp_kw = {
        k: getattr(ns, k)
        for k in (
            "host",
            "port",
            "chunk_size",
            "null_block_id",
            "max_workers",
            "max_gpu_workers",
            "max_cpu_workers",
            "hash_algorithm",
            "worker_reap_timeout_seconds",
            "worker_registration_grace_seconds",
            "session_ttl_seconds",
            "max_message_bytes",
            "max_pending_requests",
            "hash_memo_mib",
            "supported_transfer_mode",
            "shm_name",
            "io_stall_timeout_seconds",
            "cpu_copy_threads",
        )
    }
    if ns.instance_id:
        mp_kw["instance_id"] = ns.instance_id
    st_kw = {
        k: getattr(ns, k)
        for k in (
            "l1_align_bytes",
            "eviction_policy",
            "eviction_trigger_watermark",
            "eviction_ratio",
            "l1_write_ttl_seconds",
            "l1_read_ttl_seconds",
            "demand_eviction",
            "drop_log_entries",
            "l1_prefault",
            "verify_checksums",
            "state_dir",
            "warm_start",
            "l2_store_policy",
            "l2_prefetch_policy",
            "l2_prefetch_max_in_flight",
            "l2_write_queue_size",
        )
    }
    st_kw["l2_adapters"] = [parse_l2_adapter(a) for a in ns.l2_adapter]
    if ns.l1_size_gb is not None:
        st_kw["l1_size_gb"] = ns.l1_size_gb
    quotas: dict[str, float] = {}
    for item in ns.quota:
        salt, sep, gb = item.rpartition("=")
        try:
            quotas[salt] = float(gb)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"--quota: expected SALT=GIB, got {item!r}")
    st_kw["quotas_gb"] = quotas
    return ServerConfig(
        mp=MPConfig(**mp_kw),
        storage_manager=StorageConfig(**st_kw),
        http=HttpConfig(
            http_host=ns.http_host,
            http_port=ns.http_port,
            enabled=ns.http_enabled,
            auth_token=auth_token(ns),
            stats_history_interval_seconds=ns.stats_history_interval_seconds,
            stats_history_seconds=ns.stats_history_seconds,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, ns.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = build_config(ns)
    except (ConfigError, TypeError) as e:
        print(f"lmcache-rs: invalid configuration: {e}", file=sys.stderr)
        return 2
    # Heavy imports (torch) only once the configuration is valid, so --help and errors are fast.
    from lmcache_rs.runtime import Runtime  # noqa: PLC0415
    from lmcache_rs.storage.shm_pool import ShmPoolError  # noqa: PLC0415

    try:
        runtime = Runtime(cfg)
    except ShmPoolError as e:
        print(f"lmcache-rs: cannot start: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"lmcache-rs: cannot start: {e}", file=sys.stderr)
        return 1
    runtime.run_until_signal()
    return 0


if __name__ == "__main__":
    sys.exit(main())
