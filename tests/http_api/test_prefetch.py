"""Warm-up prefetches through a real server (issue 16): `POST /cache/prefetches` loads a
prompt's chunks from L2 into L1 as ordinary objects, and `GET /cache/prefetches/{id}` reports
the job."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from kvsim import MODEL, HybridWorker, Worker, lookup, tokens
from prometheus_client.parser import text_string_to_metric_families

C = 256
BPC = C // 16


def blocks(first: int, chunks: int) -> list[int]:
    return list(range(first, first + chunks * BPC))


def fs_flags(path: Path) -> list[str]:
    return ["--l2-adapter", json.dumps({"type": "fs", "base_path": str(path)})]


def l1(api: httpx.Client) -> dict[str, Any]:
    return api.get("/status").json()["storage_manager"]["l1_manager"]


def wait_written(api: httpx.Client, n: int) -> None:
    deadline = time.monotonic() + 30
    while api.get("/status").json()["storage_manager"]["l2_adapters"][0]["total_objects"] < n:
        assert time.monotonic() < deadline, "write-through did not finish"
        time.sleep(0.05)


def metric(api: httpx.Client, name: str) -> float:
    return sum(
        s.value
        for fam in text_string_to_metric_families(api.get("/metrics").text)
        for s in fam.samples
        if s.name == name
    )


def warm(api: httpx.Client, **body: Any) -> dict[str, Any]:
    """Submits a warm-up and polls it until it is no longer pending."""
    r = api.post("/cache/prefetches", json={"model_name": MODEL, "world_size": 1, **body})
    assert r.status_code == 202, r.text
    sub = r.json()
    assert sub["status"] == "submitted", sub
    deadline = time.monotonic() + 30
    while True:
        r = api.get(f"/cache/prefetches/{sub['request_id']}")
        assert r.status_code == 200, r.text
        if r.json()["status"] != "pending":
            assert r.json()["request_id"] == sub["request_id"]
            return {**r.json(), "submitted_chunks": sub["chunks"]}
        assert time.monotonic() < deadline, "warm-up still pending"
        time.sleep(0.05)


def test_warm_up_loads_l2_into_l1_as_ordinary_objects(server_factory, tmp_path: Path) -> None:
    # Default --l2-prefetch-policy: a lookup's L2 loads are temporary; a warm-up's must stay.
    s = server_factory(*fs_flags(tmp_path / "l2"))
    with httpx.Client(base_url=s.http, timeout=30) as api, s.client() as c:
        w = Worker(c)
        t = tokens(3 * C + 10, seed=7)
        assert w.store(t, blocks(1, 3))
        wait_written(api, 3)
        r = api.post("/cache/clear", json={"tier": "l1"})
        assert r.json()["cleared"]["objects"] == 3
        assert l1(api)["total_object_count"] == 0

        job = warm(api, token_ids=t)
        rid = job.pop("request_id")
        assert job == {
            "status": "completed",
            "chunks": 3,
            "found_keys": 3,
            "total_keys": 3,
            "found_chunks": 3,
            "l1_chunks": 0,
            "submitted_chunks": 3,
        }
        st = l1(api)
        assert (st["total_object_count"], st["temporary_count"], st["read_locked_count"]) == (3, 0, 0)

        # The lookup hits all of it in L1 (no L2 load), and the retrieve is byte-exact.
        assert lookup(c, t, "r") == 3
        assert metric(api, "lmcache_mp_lookup_hit_l2_tokens_total") == 0
        assert w.retrieve(t, blocks(100, 3), "r", end=3 * C)
        for a, b in zip(w.kv.blocks_view(blocks(1, 3)), w.kv.blocks_view(blocks(100, 3)), strict=True):
            assert torch.equal(a, b)
        c.end_session("r")
        assert l1(api)["total_object_count"] == 3  # ordinary objects: still there after the read

        # Again: everything is in L1 already. The first job is still on record.
        again = warm(api, token_ids=t)
        assert (again["found_keys"], again["l1_chunks"]) == (3, 3)
        assert api.get(f"/cache/prefetches/{rid}").json()["status"] == "completed"

        # Another salt's keys are other objects: nothing found, nothing loaded.
        other = warm(api, token_ids=t, cache_salt="tenant-b")
        assert (other["found_keys"], other["total_keys"]) == (0, 3)
        w.close()


def test_warm_up_every_rank(server_factory, tmp_path: Path) -> None:
    s = server_factory(*fs_flags(tmp_path / "l2"))
    with httpx.Client(base_url=s.http, timeout=30) as api, s.client() as c:
        ws = [Worker(c, world_size=2, worker_id=r, seed=r) for r in range(2)]
        t = tokens(2 * C, seed=8)
        for w in ws:
            assert w.store(t, blocks(1, 2))
        wait_written(api, 4)
        api.post("/cache/clear", json={"tier": "l1"})
        # Rank 1's second chunk is gone from L2 too: the prefix every rank has is 1 chunk.
        hashes = [
            ch["chunk_hash"]
            for ch in api.post(
                "/cache/explain", json={"model_name": MODEL, "world_size": 2, "token_ids": t}
            ).json()["chunks"]
        ]
        key = {"chunk_hash_hex": hashes[1], "model_name": MODEL, "kv_rank": 0x02010201}
        assert api.request("DELETE", "/cache/objects", json={"keys": [key]}).json()["deleted"] == 1

        job = warm(api, token_ids=t, world_size=2)
        assert (job["status"], job["found_chunks"], job["found_keys"], job["total_keys"]) == (
            "completed",
            1,
            2,
            4,
        )
        assert lookup(c, t, "r2", world_size=2) == 1
        c.end_session("r2")
        for w in ws:
            w.close()


def test_prefetch_refusals(server_factory, tmp_path: Path) -> None:
    s = server_factory(*fs_flags(tmp_path / "l2"))
    with httpx.Client(base_url=s.http, timeout=60) as api, s.client() as c:
        w = Worker(c)

        def post(**body: Any) -> httpx.Response:
            return api.post("/cache/prefetches", json={"model_name": MODEL, "world_size": 1, **body})

        r = post(token_ids=list(range(C - 1)))  # no complete chunk
        assert (r.status_code, r.json()) == (202, {"status": "noop", "chunks": 0})
        r = post(token_ids=[0] * 1_000_001)
        assert r.status_code == 400, r.text
        assert post(token_ids=[1] * C, source_tier="l1").status_code == 400
        assert post(token_ids=[1] * C, cache_salt="a@b").status_code == 400
        r = api.post("/cache/prefetches", json={"model_name": "other", "world_size": 1, "token_ids": [1] * C})
        assert r.status_code == 503
        assert "no layout registered" in r.json()["error"]
        r = post(token_ids=[1] * C, world_size=2)  # registered for world 1 only
        assert r.status_code == 503
        r = api.get("/cache/prefetches/0123456789abcdef")
        assert r.status_code == 404
        assert "unknown" in r.json()["error"]

        hw = HybridWorker(c, [[0], [1]], [-1, 2 * C])
        r = api.post(
            "/cache/prefetches", json={"model_name": hw.model, "world_size": 1, "token_ids": [1] * C}
        )
        assert r.status_code == 422, r.text
        assert "hybrid" in r.json()["error"]
        hw.close()
        w.close()


def test_prefetch_without_l2(server) -> None:
    with httpx.Client(base_url=server.http, timeout=30) as api, server.client() as c:
        w = Worker(c)
        r = api.post("/cache/prefetches", json={"model_name": MODEL, "world_size": 1, "token_ids": [1] * C})
        assert r.status_code == 400
        assert "no L2 adapters configured" in r.json()["error"]
        w.close()
