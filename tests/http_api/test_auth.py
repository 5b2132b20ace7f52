"""Bearer-token protection of mutating and sensitive endpoints, and secrets kept out of /config."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from litestar.testing import TestClient

from lmcache_rs.cli import _parser, build_config
from lmcache_rs.config import ConfigError, HttpConfig, ServerConfig, StorageConfig, parse_l2_adapter
from lmcache_rs.http.app import create_app
from lmcache_rs.http.state import HttpState

TOKEN = "s3cret-token-0123456789"
PROTECTED = [
    ("POST", "/clear-cache"),
    ("POST", "/cache/clear"),
    ("POST", "/cache/explain"),
    ("POST", "/run_script"),
    ("GET", "/cache/objects"),
    ("GET", "/l2/keys"),
    ("DELETE", "/cache/objects"),
    ("DELETE", "/l2"),
    ("POST", "/cache/prefetches"),
    ("GET", "/cache/prefetches/0123abcd"),
    ("POST", "/cache/checksums"),
    ("GET", "/kvcache/check?block_ids=0&chunk_size=1"),
    ("PUT", "/quota/alice"),
    ("DELETE", "/quota/alice"),
    ("GET", "/loglevel?logger_name=lmcache_rs&level=DEBUG"),
    ("GET", "/env"),
    ("GET", "/threads"),
    ("POST", "/metrics/reset"),
    ("GET", "/stats/history"),
]
OPEN = [
    "/",
    "/healthcheck",
    "/status",
    "/quota",
    "/quota/alice",
    "/metrics",
    "/loglevel",
    "/version",
    "/conf",
    "/dashboard",
]


def app(token: str | None) -> TestClient:
    cfg = ServerConfig(
        http=HttpConfig(auth_token=token),
        storage_manager=StorageConfig(
            l1_size_gb=0.01,
            l2_adapters=[
                parse_l2_adapter('{"type": "redis", "url": "redis://admin:hunter2@10.0.0.9:6379/0"}')
            ],
        ),
    )
    return TestClient(create_app(HttpState(config=cfg)))


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_protected_endpoints_need_the_token(method: str, path: str) -> None:
    with app(TOKEN) as api:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = api.request(method, path, json={"limit_gb": 1}, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert "bearer token" in r.json()["error"]
        r = api.request(method, path, json={"limit_gb": 1}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code != 401
        ok = (404,) if path == "/run_script" else (200, 503)  # 503: no engine in this process
        assert r.status_code in ok, r.text


def test_open_endpoints_and_no_token_mode() -> None:
    with app(TOKEN) as api:
        for path in OPEN:
            assert api.get(path).status_code in (200, 503), path
    with app(None) as api:
        for method, path in PROTECTED:
            assert api.request(method, path, json={"limit_gb": 1}).status_code != 401, path


def test_config_hides_secrets() -> None:
    with app(TOKEN) as api:
        text = api.get("/config").text
    assert TOKEN not in text
    assert "hunter2" not in text
    cfg = json.loads(text)
    assert cfg["http"]["auth_token"] == "***"
    assert cfg["storage_manager"]["l2_adapters"][0]["url"] == "redis://admin:***@10.0.0.9:6379/0"


def test_token_from_file_or_environment(tmp_path, monkeypatch) -> None:
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    cfg = build_config(_parser().parse_args(["server", "--http-auth-token-file", str(f)]))
    assert cfg.http.auth_token == TOKEN
    monkeypatch.setenv("LMCACHE_RS_HTTP_TOKEN", TOKEN[::-1])
    assert build_config(_parser().parse_args(["server"])).http.auth_token == TOKEN[::-1]
    with pytest.raises(ConfigError, match="16 printable"):
        HttpConfig(auth_token="short")
    r = subprocess.run(
        [sys.executable, "-m", "lmcache_rs", "server", "--http-auth-token-file", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2
    assert "--http-auth-token-file" in r.stderr
