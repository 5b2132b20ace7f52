"""The rest of LMCache 0.5.6's operator surface through a real server (issue 16):
/run_script (never runs code), /config/adapters, /cache/clear of L2."""

from __future__ import annotations

import json

import httpx


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
