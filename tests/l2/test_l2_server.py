"""The L2 tier through real servers: write-through, prefetch on an L1 miss, restarts, a shared
Redis between two servers, Redis failures, corruption and quotas."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from kvsim import MODEL, Worker, lookup, tokens
from prometheus_client.parser import text_string_to_metric_families

from lmcache_rs import KeyScope, chunk_hashes, mp_kv_rank
from lmcache_rs.storage.l2.base import L2Key

C = 256
BPC = C // 16
CHUNK_BYTES = 2 * 2 * C * 2 * 32 * 2  # Worker defaults: 2 layers, K+V, 2 heads x 32, fp16


def blocks(first: int, chunks: int) -> list[int]:
    return list(range(first, first + chunks * BPC))


def same(a: Worker, src: list[int], b: Worker, dst: list[int]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.kv.blocks_view(src), b.kv.blocks_view(dst), strict=True))


def fs_flags(path: Path, **kw: Any) -> list[str]:
    return ["--l2-adapter", json.dumps({"type": "fs", "base_path": str(path), **kw})]


def redis_flags(url: str, **kw: Any) -> list[str]:
    return ["--l2-adapter", json.dumps({"type": "redis", "url": url, **kw})]


def status(server) -> dict[str, Any]:
    return httpx.get(server.http + "/status", timeout=10).json()


def l2(server, i: int = 0) -> dict[str, Any]:
    return status(server)["storage_manager"]["l2_adapters"][i]


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def wait_written(server, n: int, i: int = 0) -> None:
    wait_for(f"{n} objects in L2", lambda: l2(server, i)["total_objects"] >= n)


def metric(server, name: str, **labels: str) -> float:
    text = httpx.get(server.http + "/metrics", timeout=10).text
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def l1_objects(server) -> int:
    return status(server)["storage_manager"]["l1_manager"]["total_object_count"]


def test_l1_miss_is_served_from_fs_byte_exact(server_factory, tmp_path: Path) -> None:
    # With L1 checksums on, write-through reuses L1's checksum for the L2 header and a load
    # seals L1 with the checksum it verified: the retrieve's verification checks both.
    s = server_factory(*fs_flags(tmp_path / "l2"), "--verify-checksums")
    with s.client() as c:
        w = Worker(c)
        t = tokens(3 * C + 10)
        assert w.store(t, blocks(1, 3))
        wait_written(s, 3)
        c.clear(True)
        assert l1_objects(s) == 0
        assert lookup(c, t, "r") == 3
        assert w.retrieve(t, blocks(100, 3), "r", end=3 * C)
        assert same(w, blocks(1, 3), w, blocks(100, 3))
        c.end_session("r")
        # Default prefetch policy: loaded objects are temporary and leave L1 after their read.
        assert l1_objects(s) == 0
        assert metric(s, "lmcache_mp_lookup_hit_l2_tokens_total") == 3 * C
        assert metric(s, "lmcache_mp_l2_store_completed_objects_chunks_total") == 3
        w.close()


def test_retain_policy_keeps_loaded_objects(server_factory, tmp_path: Path) -> None:
    s = server_factory(*fs_flags(tmp_path / "l2"), "--l2-prefetch-policy", "retain")
    with s.client() as c:
        w = Worker(c)
        t = tokens(2 * C, seed=3)
        assert w.store(t, blocks(1, 2))
        wait_written(s, 2)
        c.clear(True)
        assert lookup(c, t, "r") == 2
        assert w.retrieve(t, blocks(100, 2), "r")
        c.end_session("r")
        assert l1_objects(s) == 2
        assert lookup(c, t, "again") == 2  # now an L1 hit
        c.end_session("again")
        assert metric(s, "lmcache_mp_lookup_hit_l1_tokens_total") == 2 * C
        w.close()


def test_partial_l2_prefix_extends_the_l1_hit(server_factory, tmp_path: Path) -> None:
    s = server_factory(*fs_flags(tmp_path / "l2"))
    with s.client() as c:
        w = Worker(c)
        t = tokens(4 * C, seed=4)
        assert w.store(t, blocks(1, 4))
        wait_written(s, 4)
        c.clear(True)
        assert w.store(t, blocks(1, 1), end=C)  # chunk 0 back in L1, chunks 1..3 only in L2
        assert lookup(c, t, "r") == 4
        assert w.retrieve(t, blocks(100, 4), "r")
        assert same(w, blocks(1, 4), w, blocks(100, 4))
        c.end_session("r")
        w.close()


@pytest.mark.parametrize("kind", ["fs", "redis"])
def test_restart_serves_what_was_stored(server_factory, tmp_path: Path, request, kind: str) -> None:
    flags = (
        fs_flags(tmp_path / "l2")
        if kind == "fs"
        else redis_flags(request.getfixturevalue("redis_server").url)
    )
    a = server_factory(*flags)
    t = tokens(3 * C, seed=5)
    with a.client() as c:
        w = Worker(c)
        assert w.store(t, blocks(1, 3))
    assert a.stop() == 0  # graceful stop drains the write-through queue
    b = server_factory(*flags)
    with b.client() as c:
        w2 = Worker(c)
        assert lookup(c, t, "r") == 3
        assert w2.retrieve(t, blocks(100, 3), "r")
        assert same(w, blocks(1, 3), w2, blocks(100, 3))
        c.end_session("r")
        w2.close()
    w.close()


def test_two_servers_share_one_redis(server_factory, redis_server) -> None:
    a = server_factory(*redis_flags(redis_server.url))
    b = server_factory(*redis_flags(redis_server.url))
    t = tokens(3 * C + 5, seed=6)
    with a.client() as ca, b.client() as cb:
        wa = Worker(ca)
        wb = Worker(cb, seed=1)
        assert wa.store(t, blocks(1, 3))
        wait_written(a, 3)
        assert l2(b)["total_objects"] == 3, "B sees the pool's accounting"
        assert lookup(cb, t, "r") == 3
        assert wb.retrieve(t, blocks(100, 3), "r")
        assert same(wa, blocks(1, 3), wb, blocks(100, 3))
        cb.end_session("r")
        # Other salts never share a prefix, across servers either.
        assert lookup(cb, t, "salted", salt="tenant-b") == 0
        cb.end_session("salted")
        wa.close()
        wb.close()


def test_redis_down_l1_keeps_serving_and_writes_resume(server_factory, redis_server) -> None:
    s = server_factory(*redis_flags(redis_server.url, socket_timeout_seconds=0.5))
    with s.client() as c:
        w = Worker(c)
        t0 = tokens(C, seed=10)
        assert w.store(t0, blocks(1, 1))
        wait_written(s, 1)
        redis_server.kill()
        t1 = tokens(2 * C, seed=11)
        assert w.store(t1, blocks(10, 2)), "stores succeed in L1 while L2 is down"
        assert lookup(c, t1, "r1") == 2
        assert w.retrieve(t1, blocks(100, 2), "r1")
        assert same(w, blocks(10, 2), w, blocks(100, 2))
        c.end_session("r1")
        wait_for("an L2 error", lambda: metric(s, "lmcache_rs_l2_errors_total") > 0)
        assert httpx.get(s.http + "/healthcheck").status_code == 200, "L1 serving: healthy"
        assert metric(s, "lmcache_rs_l2_adapter_up") == 0
        st = status(s)["storage_manager"]
        assert not st["l2_adapters"][0]["is_healthy"]
        assert not st["is_healthy"]
        # Lookups that miss L1 still answer (the L2 part is skipped).
        assert lookup(c, tokens(C, seed=12), "miss") == 0
        c.end_session("miss")

        redis_server.start()  # same port, empty (no persistence)
        n = 0

        def stored_again() -> bool:
            nonlocal n
            n += 1
            assert w.store(tokens(C, seed=100 + n), blocks(30, 1))
            return l2(s)["total_objects"] > 0

        wait_for("writes to resume", stored_again)
        wait_for("the adapter to be healthy", lambda: l2(s)["is_healthy"])
        w.close()


def test_corrupt_object_is_a_miss_never_served(server_factory, tmp_path: Path) -> None:
    base = tmp_path / "l2"
    s = server_factory(*fs_flags(base))
    with s.client() as c:
        w = Worker(c)
        t = tokens(3 * C, seed=13)
        assert w.store(t, blocks(1, 3))
        wait_written(s, 3)
        c.clear(True)
        scope = KeyScope(MODEL, mp_kv_rank(1, 0), 0, "")
        oid = L2Key.of(scope, chunk_hashes(t)[1]).object_id
        path = base / oid[:2] / f"{oid}.kv"
        blob = bytearray(path.read_bytes())
        blob[-7] ^= 0x40
        path.write_bytes(bytes(blob))
        assert lookup(c, t, "r") == 1, "the hit stops before the corrupt chunk"
        assert w.retrieve(t, blocks(100, 1), "r", end=C)
        assert same(w, blocks(1, 1), w, blocks(100, 1))
        c.end_session("r")
        assert not path.exists()
        assert metric(s, "lmcache_rs_l2_corrupt_objects_total") == 1
        w.close()


@pytest.mark.parametrize("kind", ["fs", "redis"])
def test_quotas_evict_l2_by_salt(server_factory, tmp_path: Path, request, kind: str) -> None:
    adapter = (
        fs_flags(tmp_path / "l2")
        if kind == "fs"
        else redis_flags(request.getfixturevalue("redis_server").url)
    )
    s = server_factory(*adapter, "--eviction-policy", "IsolatedLRU", "--quota", "alice=1", "--quota", "bob=1")
    gib = 1 << 30
    with s.client() as c:
        w = Worker(c)
        for salt in ("alice", "bob"):
            assert w.store(tokens(3 * C, seed=hash(salt) % 1000), blocks(1, 3), salt=salt)
        wait_written(s, 6)
        q = httpx.get(s.http + "/quota/alice").json()
        assert q["l2_usage_gb"] > 0
        assert q["current_usage_gb"] == q["l1_usage_gb"] + q["l2_usage_gb"]
        limit_gb = 1.5 * CHUNK_BYTES / gib
        assert httpx.put(s.http + "/quota/alice", json={"limit_gb": limit_gb}).status_code == 200
        assert httpx.delete(s.http + "/quota/bob").status_code == 200

        def trimmed() -> bool:
            alice = httpx.get(s.http + "/quota/alice").json()
            bob = httpx.get(s.http + "/quota/bob").json()
            return 0 < alice["l2_usage_gb"] <= limit_gb and bob["l2_usage_gb"] == 0 == bob["l1_usage_gb"]

        wait_for("L2 to follow the quotas", trimmed)
        assert l2(s)["bytes_by_cache_salt"].keys() == {"alice"}
        assert metric(s, "lmcache_mp_l2_evicted_objects_chunks_total", reason="quota") == 3 + 2
        w.close()


def test_bad_adapter_config_exits_2(tmp_path: Path) -> None:
    for bad in ('{"type": "s3"}', '{"type": "fs"}', "not json", '{"type": "redis", "url": "http://x"}'):
        r = subprocess.run(
            [sys.executable, "-m", "lmcache_rs", "server", "--l2-adapter", bad],
            capture_output=True,
            text=True,
            check=False,
        )
        assert r.returncode == 2, bad
        assert "--l2-adapter" in r.stderr


def test_server_sigkilled_and_restarted_serves_l2_data(server_factory, redis_server) -> None:
    """A crash (no drain) loses only what was not yet written through; the worker's client
    reconnects, re-registers as the vLLM heartbeat does, and gets the stored prefix back."""
    flags = redis_flags(redis_server.url)
    a = server_factory(*flags)
    port = int(a.url.rsplit(":", 1)[1])
    t = tokens(3 * C, seed=21)
    with a.client() as c:
        w = Worker(c)
        assert w.store(t, blocks(1, 3))
        wait_written(a, 3)
        a.kill()
        b = server_factory(*flags, port=port)
        c.register_kv_cache(w.instance_id, w.kv.handles(), w.model, 1, {"kv_layout": "NHD"})
        assert lookup(c, t, "r") == 3
        assert w.retrieve(t, blocks(100, 3), "r")
        assert same(w, blocks(1, 3), w, blocks(100, 3))
        c.end_session("r")
        w.close()
    assert b.proc.poll() is None


def test_skip_l1_store_policy_moves_chunks_to_l2(server_factory, tmp_path: Path) -> None:
    s = server_factory(*fs_flags(tmp_path / "l2"), "--l2-store-policy", "skip_l1")
    with s.client() as c:
        w = Worker(c)
        t = tokens(2 * C, seed=31)
        assert w.store(t, blocks(1, 2))
        wait_written(s, 2)
        wait_for("L1 to drop what L2 holds", lambda: l1_objects(s) == 0)
        assert lookup(c, t, "r") == 2
        assert w.retrieve(t, blocks(100, 2), "r")
        assert same(w, blocks(1, 2), w, blocks(100, 2))
        c.end_session("r")
        w.close()


def test_full_write_queue_skips_and_counts(server_factory, tmp_path: Path) -> None:
    s = server_factory(*fs_flags(tmp_path / "l2"), "--l2-write-queue-size", "1")
    with s.client() as c:
        w = Worker(c)
        t = tokens(8 * C, seed=32)
        assert w.store(t, blocks(1, 8)), "the store itself succeeds"
        wait_for(
            "skipped writes to be counted",
            lambda: metric(s, "lmcache_rs_l2_store_skipped_chunks_total", reason="queue_full") >= 1,
        )
        wait_for("the queue to drain", lambda: status(s)["storage_manager"]["l2"]["write_queue_depth"] == 0)
        skipped = metric(s, "lmcache_rs_l2_store_skipped_chunks_total", reason="queue_full")
        wait_for("the queued chunks to be written", lambda: l2(s)["total_objects"] + skipped == 8)
        w.close()
