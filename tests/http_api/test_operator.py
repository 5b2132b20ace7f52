"""The rest of LMCache 0.5.6's operator surface through a real server (issue 16):
/run_script (never runs code), /config/adapters, /cache/clear of L2."""

from __future__ import annotations

import json
import time

import httpx
from kvsim import Worker, lookup, tokens

C = 256
CHUNK_BYTES = 2 * 2 * C * 2 * 32 * 2


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
