"""The rest of LMCache 0.5.6's operator surface through a real server (issue 16):
/run_script (never runs code), /config/adapters, /cache/clear of L2."""

from __future__ import annotations

import json
import time

import httpx
from kvsim import MODEL, Worker, lookup, tokens

C = 256
CHUNK_BYTES = 2 * 2 * C * 2 * 32 * 2


def list_pages(api, adapter: str, **params: object) -> tuple[list[dict], int]:
    """Every entry of `GET /cache/objects` page by page (each page from `adapter`), and how
    many pages it took; the last page has no token."""
    keys: list[dict] = []
    token, pages = None, 0
    while True:
        r = api.get("/cache/objects", params={**params, **({"page_token": token} if token else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        assert (page["adapter"], page["shared"]) == (adapter, False)
        keys += page["entries"]
        pages += 1
        token = page["next_page_token"]
        if token is None:
            return keys, pages


def test_run_script_never_runs_code(server, tmp_path) -> None:
    marker = tmp_path / "ran"
    script = f"open({str(marker)!r}, 'w').write('x')\n"
    with httpx.Client(base_url=server.http, timeout=30) as api:
        r = api.post("/run_script", files={"script": ("s.py", script.encode())})
        assert r.status_code == 404
        assert r.headers["content-type"].startswith("text/plain")
        assert "never runs code" in r.text
        assert api.post("/run_script").status_code == 404
    assert not marker.exists()
    assert server.proc.poll() is None


def test_config_adapters(server_factory, tmp_path) -> None:
    fs = json.dumps({"type": "fs", "base_path": str(tmp_path / "a")})
    disk = json.dumps({"type": "fs", "base_path": str(tmp_path / "b"), "name": "disk"})
    server = server_factory("--l2-adapter", fs, "--l2-adapter", disk)
    with httpx.Client(base_url=server.http, timeout=30) as api:
        r = api.get("/config/adapters")
        assert r.status_code == 200
        common = {"type": "fs", "type_name": "fs", "tier": "l2", "reconfigurable": False}
        assert r.json() == {
            "adapters": [
                {"index": 0, "name": "fs-0", "primary": True, **common},
                {"index": 1, "name": "disk", "primary": False, **common},
            ]
        }


def test_config_adapters_without_l2(server) -> None:
    with httpx.Client(base_url=server.http, timeout=30) as api:
        assert api.get("/config/adapters").json() == {"adapters": []}


def l2_objects(api: httpx.Client) -> dict[str, int]:
    return {
        a["name"]: a["total_objects"] for a in api.get("/status").json()["storage_manager"]["l2_adapters"]
    }


def test_cache_clear_l2_per_adapter(server_factory, tmp_path) -> None:
    fs = json.dumps({"type": "fs", "base_path": str(tmp_path / "a")})
    disk = json.dumps({"type": "fs", "base_path": str(tmp_path / "b"), "name": "disk"})
    server = server_factory("--l2-adapter", fs, "--l2-adapter", disk)
    with httpx.Client(base_url=server.http, timeout=30) as api, server.client() as c:
        w = Worker(c)
        t = tokens(2 * C, seed=21)
        assert w.store(t, list(range(1, 33)))
        deadline = time.monotonic() + 30
        while l2_objects(api) != {"fs-0": 2, "disk": 2}:
            assert time.monotonic() < deadline, l2_objects(api)
            time.sleep(0.1)

        r = api.post("/cache/clear", json={"tier": "l2", "adapter": "disk"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "ok"
        assert [(x["adapter"], x["objects"], x["ok"]) for x in body["l2"]] == [("disk", 2, True)]
        assert body["l2"][0]["bytes"] > 2 * CHUNK_BYTES  # headers included
        assert body["cleared"]["tier"] == "l2"
        assert (body["cleared"]["objects"], body["cleared"]["bytes"]) == (2, body["l2"][0]["bytes"])
        assert "l1" not in body
        assert l2_objects(api) == {"fs-0": 2, "disk": 0}
        assert [f for f in (tmp_path / "b").rglob("*") if f.is_file()] == []  # the files went too
        assert lookup(c, t, "still-in-l1") == 2  # L1 untouched
        c.end_session("still-in-l1")

        r = api.post("/cache/clear", json={"tier": "all"})
        body = r.json()
        assert (r.status_code, body["status"]) == (200, "ok")
        assert body["l1"]["objects"] == 2
        assert [(x["adapter"], x["objects"]) for x in body["l2"]] == [("fs-0", 2), ("disk", 0)]
        assert body["cleared"]["objects"] == 4
        assert l2_objects(api) == {"fs-0": 0, "disk": 0}
        assert lookup(c, t, "gone") == 0  # neither L1 nor L2 has it
        c.end_session("gone")

        r = api.post("/cache/clear", json={"tier": "l2", "adapter": "nope"})
        assert r.status_code == 404
        assert api.post("/cache/clear", json={"tier": "l1", "adapter": "disk"}).status_code == 400
        metrics = api.get("/metrics").text
        assert 'lmcache_rs_l2_clears_total{l2_name="disk"} 2.0' in metrics
        w.close()


def test_list_and_delete_objects(server_factory, tmp_path) -> None:
    fs = json.dumps({"type": "fs", "base_path": str(tmp_path / "a")})
    server = server_factory("--l2-adapter", fs)
    with httpx.Client(base_url=server.http, timeout=30) as api, server.client() as c:
        w = Worker(c)
        t = tokens(5 * C, seed=31)
        assert w.store(t, list(range(1, 81)))
        deadline = time.monotonic() + 30
        while l2_objects(api) != {"fs-0": 5}:
            assert time.monotonic() < deadline, l2_objects(api)
            time.sleep(0.1)
        hashes = [
            ch["chunk_hash"]
            for ch in api.post("/cache/explain", json={"model_name": MODEL, "token_ids": t}).json()["chunks"]
        ]

        # Pages of 2: 2 + 2 + 1, each key once, in id order; the last page has no token.
        keys, pages = list_pages(api, "fs-0", page_size=2)
        assert pages == 3
        assert sorted(e["key"]["chunk_hash_hex"] for e in keys) == sorted(hashes)
        assert {e["size_bytes"] for e in keys} == {CHUNK_BYTES}
        assert all(e["key"]["model_name"] == MODEL and e["key"]["cache_salt"] == "" for e in keys)
        alias = api.get("/l2/keys", params={"page_size": 5000}).json()
        assert sorted(e["key"]["chunk_hash_hex"] for e in alias["entries"]) == sorted(hashes)
        assert alias["next_page_token"] is None
        assert api.get("/cache/objects", params={"model_name": "other"}).json()["entries"] == []
        assert api.get("/cache/objects", params={"page_size": 0}).status_code == 400
        assert api.get("/cache/objects", params={"page_token": "zz"}).status_code == 400
        assert api.get("/cache/objects", params={"adapter": "nope"}).status_code == 404

        # Deleting keys as listed removes exactly those objects (the encoding round-trips).
        first = [e["key"] for e in keys if e["key"]["chunk_hash_hex"] == hashes[4]]
        r = api.request("DELETE", "/cache/objects", json={"keys": first})
        assert r.json() == {"deleted": 1, "skipped": 0, "ok": True, "by_tier": {"fs-0": 1}}
        assert l2_objects(api) == {"fs-0": 4}
        r = api.request("DELETE", "/cache/objects", json={"keys": first})
        assert r.json() == {"deleted": 0, "skipped": 1, "ok": True, "by_tier": {"fs-0": 0}}
        # tier all: L1 and L2 at once.
        second = [e["key"] for e in keys if e["key"]["chunk_hash_hex"] == hashes[3]]
        r = api.request("DELETE", "/cache/objects", json={"keys": second, "tier": "all"})
        assert r.json() == {"deleted": 1, "skipped": 0, "ok": True, "by_tier": {"l1": 1, "fs-0": 1}}
        ans = api.post("/cache/explain", json={"model_name": MODEL, "token_ids": t}).json()
        assert ans["chunks"][3]["where"][0] == {
            "l1": "dropped",
            "reason": "deleted",
            "ago_seconds": ans["chunks"][3]["where"][0]["ago_seconds"],
            "l2": [],
        }
        # tier l1, read-locked: only with force.
        third = [e["key"] for e in keys if e["key"]["chunk_hash_hex"] == hashes[0]]
        assert lookup(c, t, "held") == 3
        body = {"keys": third, "tier": "l1"}
        assert api.request("DELETE", "/cache/objects", json=body).json()["skipped"] == 1
        assert api.request("DELETE", "/cache/objects", json={**body, "force": True}).json()["deleted"] == 1
        c.end_session("held")
        # The alias.
        r = api.request("DELETE", "/l2", json={"keys": third})
        assert r.json() == {"requested": 1, "adapter": None, "ok": True, "deleted": 1}
        assert l2_objects(api) == {"fs-0": 2}
        # Limits and bad keys.
        too_many = {"keys": [third[0]] * 10_001}
        r = api.request("DELETE", "/cache/objects", json=too_many)
        assert r.status_code == 400
        assert "10000" in r.text
        as_many = {"keys": [third[0]] * 10_000}
        assert api.request("DELETE", "/cache/objects", json=as_many).json()["skipped"] == 10_000
        bad = {**third[0], "chunk_hash_hex": "xyz"}
        assert api.request("DELETE", "/cache/objects", json={"keys": [bad]}).status_code == 400
        bad = {**third[0], "cache_salt": "a@b"}
        assert api.request("DELETE", "/cache/objects", json={"keys": [bad]}).status_code == 400
        w.close()


def test_list_l1_objects_and_delete_them_as_listed(server) -> None:
    with httpx.Client(base_url=server.http, timeout=30) as api, server.client() as c:
        w = Worker(c)
        t = tokens(5 * C, seed=41)
        assert w.store(t, list(range(1, 81)))
        ans = api.post("/cache/explain", json={"model_name": MODEL, "token_ids": t}).json()
        hashes = [ch["chunk_hash"] for ch in ans["chunks"]]
        keys, pages = list_pages(api, "l1", tier="l1", page_size=2)
        assert pages == 3
        listed = [e["key"]["chunk_hash_hex"] for e in keys]
        assert listed == sorted(hashes)  # key order
        assert {e["size_bytes"] for e in keys} == {CHUNK_BYTES}
        only = api.get("/cache/objects", params={"tier": "l1", "model_name": "other"}).json()
        assert only == {"adapter": "l1", "shared": False, "entries": [], "next_page_token": None}
        assert api.get("/cache/objects", params={"tier": "l1", "page_token": "00"}).status_code == 400
        assert api.get("/cache/objects", params={"tier": "l1", "adapter": "x"}).status_code == 400
        # Delete two as listed: L1 forgets exactly those (explain says why).
        r = api.request("DELETE", "/cache/objects", json={"keys": [e["key"] for e in keys[:2]], "tier": "l1"})
        assert r.json() == {"deleted": 2, "skipped": 0, "ok": True, "by_tier": {"l1": 2}}
        ans = api.post("/cache/explain", json={"model_name": MODEL, "token_ids": t}).json()
        gone = {ch["chunk_hash"] for ch in ans["chunks"] if ch["where"][0]["reason"] == "deleted"}
        assert gone == set(listed[:2])
        assert len(api.get("/cache/objects", params={"tier": "l1"}).json()["entries"]) == 3
        w.close()
