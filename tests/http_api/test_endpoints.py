"""Every HTTP endpoint through a real server process and an HTTP client."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time

import httpx
import pytest
from kvsim import Worker, lookup, tokens
from prometheus_client.parser import text_string_to_metric_families

GiB = 1 << 30
C = 256
CHUNK_BYTES = 2 * 2 * C * 2 * 32 * 2  # kvsim default worker: 128 KiB per chunk


@pytest.fixture
def api(server):
    with httpx.Client(base_url=server.http, timeout=30) as client:
        yield client


def test_root_health_status(api, server) -> None:
    assert api.get("/").json() == {"status": "ok", "service": "LMCache HTTP API"}
    r = api.get("/healthcheck")
    assert (r.status_code, r.json()) == (200, {"status": "healthy"})
    with server.client() as c:
        w = Worker(c)
        st = api.get("/status").json()
        assert st["is_healthy"] is True
        assert st["engine_type"] == "MPCacheEngine"
        assert st["chunk_size"] == 256
        assert st["hash_algorithm"] == "blake3"
        assert st["registered_gpu_ids"] == [w.instance_id]
        layout = st["gpu_context_meta"][str(w.instance_id)]["kv_cache_layout"]
        assert layout["num_layers"] == 2
        assert layout["block_size"] == 16
        assert layout["num_blocks"] == 256
        assert layout["is_mla"] is False
        assert layout["dtype"] == "torch.float16"
        assert layout["cache_size_per_token"] == CHUNK_BYTES // C
        for field in (
            "gpu_kv_format",
            "gpu_kv_shape",
            "gpu_kv_concrete_shape",
            "attention_backend",
            "hidden_dim_sizes",
        ):
            assert field in layout
        assert st["active_sessions"] == 0
        assert st["active_prefetch_jobs"] == 0
        assert st["storage_manager"]["is_healthy"] is True
        assert (
            st["storage_manager"]["l1_usage"][1] == st["storage_manager"]["l1_manager"]["memory_total_bytes"]
        )
        w.close()


def test_quota_crud_and_default_mapping(api) -> None:
    r = api.put("/quota/alice", json={"limit_gb": 10.0})
    assert (r.status_code, r.json()) == (200, {"cache_salt": "alice", "limit_gb": 10.0, "status": "ok"})
    assert api.put("/quota/_default", json={"limit_gb": 2}).json()["status"] == "ok"
    assert api.get("/quota").json() == {
        "users": {
            "_default": {"limit_gb": 2.0, "current_usage_gb": 0.0, "l1_usage_gb": 0.0, "l2_usage_gb": 0.0},
            "alice": {"limit_gb": 10.0, "current_usage_gb": 0.0, "l1_usage_gb": 0.0, "l2_usage_gb": 0.0},
        }
    }
    assert api.get("/quota/alice").json() == {
        "cache_salt": "alice",
        "limit_gb": 10.0,
        "current_usage_gb": 0.0,
        "exists": True,
        "l1_usage_gb": 0.0,
        "l2_usage_gb": 0.0,
    }
    assert api.get("/quota/nobody").json() == {
        "cache_salt": "nobody",
        "limit_gb": 0.0,
        "current_usage_gb": 0.0,
        "exists": False,
        "l1_usage_gb": 0.0,
        "l2_usage_gb": 0.0,
    }
    r = api.delete("/quota/alice")
    assert (r.status_code, r.json()) == (200, {"cache_salt": "alice", "status": "removed"})
    r = api.delete("/quota/alice")
    assert (r.status_code, r.json()) == (200, {"cache_salt": "alice", "status": "not_found"})
    # The quirk of the seed API: true is a number.
    assert api.put("/quota/bob", json={"limit_gb": True}).json()["limit_gb"] is True
    assert api.get("/quota/bob").json()["limit_gb"] == 1.0
    assert api.put("/quota/carol", json={"limit_gb": "0.5"}).status_code == 200
    assert api.get("/quota/carol").json()["limit_gb"] == 0.5


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "invalid JSON body"),
        (b"[1, 2]", "body must be {'limit_gb': <float>}"),
        (b'{"limit": 1}', "body must be {'limit_gb': <float>}"),
        (b'{"limit_gb": "ten"}', "limit_gb must be numeric"),
        (b'{"limit_gb": null}', "limit_gb must be numeric"),
        (b'{"limit_gb": "nan"}', "limit_gb must be finite"),
        (b'{"limit_gb": "inf"}', "limit_gb must be finite"),
        (b'{"limit_gb": 1e999}', "limit_gb must be finite"),
        (b'{"limit_gb": -1}', "limit_gb must be non-negative"),
    ],
)
def test_quota_put_errors(api, body: bytes, message: str) -> None:
    r = api.put("/quota/alice", content=body, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()) == (400, {"error": message})
    assert api.get("/quota/alice").json()["exists"] is False


def test_quota_bad_salt(api) -> None:
    r = api.put("/quota/a@b", json={"limit_gb": 1})
    assert r.status_code == 400
    assert "cache_salt" in r.json()["error"]
    assert api.get("/quota/" + "x" * 129).status_code == 400


def test_quota_governs_l1_under_isolated_lru(server_factory) -> None:
    server = server_factory("--eviction-policy", "IsolatedLRU")
    with httpx.Client(base_url=server.http, timeout=30) as api, server.client() as c:
        assert api.put("/quota/alice", json={"limit_gb": 2 * CHUNK_BYTES / GiB}).status_code == 200
        w = Worker(c)
        t = tokens(4 * C, seed=1)
        assert w.store(t, list(range(1, 65)), salt="alice")
        assert w.store(t, list(range(1, 65)), salt="eve")  # no quota: wiped next cycle

        def usage(salt: str) -> float:
            return api.get(f"/quota/{salt}").json()["current_usage_gb"] * GiB

        deadline = time.monotonic() + 20
        while usage("alice") > 2 * CHUNK_BYTES or usage("eve") > 0:
            assert time.monotonic() < deadline, "quota not applied by the eviction cycle"
            time.sleep(0.1)
        assert math.isclose(usage("alice"), 2 * CHUNK_BYTES)
        assert lookup(c, t, "a", salt="alice") == 2
        c.end_session("a")
        users = api.get("/quota").json()["users"]
        assert math.isclose(users["alice"]["current_usage_gb"] * GiB, 2 * CHUNK_BYTES)
        # Removing the quota makes alice's bytes go on the next cycle.
        api.delete("/quota/alice")
        deadline = time.monotonic() + 20
        while usage("alice") > 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        w.close()


def test_clear_endpoints(api, server) -> None:
    with server.client() as c:
        w = Worker(c)
        t = tokens(2 * C, seed=2)
        assert w.store(t, list(range(1, 33)))
        r = api.post("/cache/clear", json={"tier": "l1", "force": False})
        assert r.status_code == 200
        cleared = {
            "tier": "l1",
            "objects": 2,
            "bytes": 2 * CHUNK_BYTES,
            "pending_objects": 0,
            "pending_bytes": 0,
        }
        assert r.json() == {"status": "ok", "cleared": cleared}
        r = api.post("/cache/clear", json={"tier": "l2"})
        assert (r.status_code, r.json()) == (400, {"detail": "tier 'l2': no L2 adapters configured"})
        r = api.post("/cache/clear", json={"tier": "l3"})
        assert (r.status_code, r.json()) == (400, {"detail": "tier 'l3' not supported; l1, l2 or all"})
        assert api.post("/cache/clear").json()["cleared"]["objects"] == 0
        assert w.store(t, list(range(1, 33)))
        assert lookup(c, t, "locked") == 2  # read-locked: only a force clear removes it
        assert api.post("/cache/clear", json={}).json()["cleared"]["objects"] == 0
        # Forced: the locked objects leave the index now; their bytes wait for the lookup's
        # leases, which end_session gives back.
        r = api.post("/clear-cache")
        cleared = {"tier": "l1", "objects": 2, "bytes": 2 * CHUNK_BYTES, "pending_objects": 2}
        assert (r.status_code, r.json()) == (
            200,
            {"status": "ok", "cleared": {**cleared, "pending_bytes": 2 * CHUNK_BYTES}},
        )
        assert lookup(c, t, "after") == 0
        misses = [
            m for m in api.get("/metrics").text.splitlines() if m.startswith("lmcache_rs_lookup_misses_total")
        ]
        assert [m.split("reason=")[1] for m in misses] == ['"cleared"} 1.0'], misses
        l1 = api.get("/status").json()["storage_manager"]["l1_manager"]
        assert (l1["pending_release_object_count"], l1["pending_release_bytes"]) == (2, 2 * CHUNK_BYTES)
        assert l1["memory_used_bytes"] == 2 * CHUNK_BYTES
        c.end_session("locked")
        c.end_session("after")
        # The ZMQ clear answers with no payload: LMCache's client reads only that as success.
        assert len(c.recv_frames(c.send("clear", True))) == 2
        l1 = api.get("/status").json()["storage_manager"]["l1_manager"]
        assert (l1["pending_release_object_count"], l1["memory_used_bytes"], l1["read_lease_count"]) == (
            0,
            0,
            0,
        )
        w.close()


def test_config_version_env_loglevel(api, server) -> None:
    conf = api.get("/conf")
    assert conf.status_code == 200
    assert set(conf.json()) == {"mp", "storage_manager", "observability", "http"}
    assert conf.json()["mp"]["port"] == int(server.url.rsplit(":", 1)[1])
    # The seed's shape: the HTTP listener inside `mp`, an `observability` section.
    assert conf.json()["mp"]["http_host"] == "127.0.0.1"
    assert conf.json()["mp"]["http_port"] == int(server.http.rsplit(":", 1)[1])
    assert conf.json()["observability"]["log_level"] == "INFO"
    assert conf.json()["observability"]["metrics_path"] == "/metrics"
    assert "\n  " in conf.text  # indented
    assert api.get("/config").json() == conf.json()
    version = api.get("/version")
    assert version.headers["content-type"].startswith("application/json")
    lmc, commit = api.get("/lmc_version").json(), api.get("/commit_id").json()
    assert version.json() == f"{lmc}-{commit}"
    env = api.get("/env")
    assert env.headers["content-type"].startswith("text/plain")
    parsed = json.loads(env.text)
    assert list(parsed) == sorted(parsed)
    assert "PATH" in parsed
    assert api.get("/loglevel").text.startswith("root: ")
    assert api.get("/loglevel", params={"logger_name": "lmcache_rs"}).text.strip() == "lmcache_rs: INFO"
    r = api.get("/loglevel", params={"logger_name": "lmcache_rs", "level": "debug"})
    assert r.text.strip() == "lmcache_rs: DEBUG"
    assert api.get("/loglevel", params={"logger_name": "lmcache_rs"}).text.strip() == "lmcache_rs: DEBUG"
    r = api.get("/loglevel", params={"logger_name": "lmcache_rs", "level": "LOUD"})
    assert (r.status_code, r.text) == (400, "Invalid log level: LOUD")


def test_env_masks_secrets(server_factory, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_supersecret")
    monkeypatch.setenv("MY_PASSWORD", "hunter2")
    server = server_factory()
    env = httpx.get(server.http + "/env").json()
    assert env["HF_TOKEN"] == "***"
    assert env["MY_PASSWORD"] == "***"


def test_threads_and_periodic_threads(api) -> None:
    dump = api.get("/threads").text
    # Python threads (the request I/O thread is native: it has no Python stack).
    assert "data-worker-0" in dump
    assert dump.rstrip().splitlines()[-1].startswith("Total threads: ")
    only = api.get("/threads", params={"name": "IO-LOG-PUMP"}).text
    assert only.rstrip().endswith("Total threads: 1")
    ident = only.split("ident=", 1)[1].split(",", 1)[0]
    by_id = api.get("/threads", params={"thread_id": ident}).text
    assert "io-log-pump" in by_id
    assert by_id.rstrip().endswith("Total threads: 1")
    assert api.get("/threads", params={"thread_id": "1"}).text.rstrip().endswith("Total threads: 0")
    assert api.get("/threads", params={"thread_id": "x"}).status_code == 400
    pt = api.get("/periodic-threads").json()
    names = {t["name"] for t in pt["threads"]}
    assert {"l1-eviction-cycle", "session-cleanup", "worker-reaper"} <= names
    assert pt["summary"]["by_level"]["critical"] == {"total": 1, "running": 1, "active": 1}
    assert pt["summary"]["total_count"] == len(pt["threads"])
    crit = api.get("/periodic-threads", params={"level": "critical"}).json()["threads"]
    assert [t["name"] for t in crit] == ["l1-eviction-cycle"]
    assert (
        api.get("/periodic-threads", params={"running_only": "true", "active_only": "true"}).status_code
        == 200
    )
    r = api.get("/periodic-threads", params={"level": "urgent"})
    assert (r.status_code, r.json()) == (
        400,
        {"error": "Invalid level: urgent. Valid values: critical, high, medium, low"},
    )
    one = api.get("/periodic-threads/l1-eviction-cycle").json()
    for field in (
        "name",
        "level",
        "interval",
        "init_wait",
        "is_running",
        "is_active",
        "last_run_time",
        "last_run_ago",
        "total_runs",
        "failed_runs",
        "success_rate",
        "last_summary",
    ):
        assert field in one
    r = api.get("/periodic-threads/nope")
    assert (r.status_code, r.json()) == (404, {"error": "Thread not found: nope"})
    assert api.get("/periodic-threads-health").json() == {
        "healthy": True,
        "unhealthy_count": 0,
        "unhealthy_threads": [],
    }


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"{name}{labels} not in /metrics")


def test_metrics_move_with_traffic_and_reset(api, server) -> None:
    with server.client() as c:
        w = Worker(c)
        t = tokens(3 * C, seed=3)
        assert w.store(t, list(range(1, 49)), salt="s1")
        assert lookup(c, t, "m", salt="s1", model=w.model) == 3
        assert w.retrieve(t, list(range(100, 148)), "m", salt="s1")
        c.end_session("m")
        text = api.get("/metrics").text
        assert metric(text, "lmcache_mp_l1_write_chunks_total", cache_salt="s1") == 3
        assert metric(text, "lmcache_mp_l1_read_chunks_total", cache_salt="s1") == 3
        assert (
            metric(text, "lmcache_mp_lookup_hit_tokens_total", model_name=w.model, cache_salt="s1") == 3 * C
        )
        assert (
            metric(text, "lmcache_mp_lookup_requested_tokens_total", model_name=w.model, cache_salt="s1")
            == 3 * C
        )
        assert metric(text, "lmcache_mp_num_submitted_stores_total", device="cpu") == 1
        assert metric(text, "lmcache_mp_num_finished_retrieves_total", device="cpu") == 1
        assert (
            metric(text, "lmcache_mp_l1_memory_usage_bytes", backend="dram", l1_tag="_default")
            == 3 * CHUNK_BYTES
        )
        assert metric(text, "lmcache_rs_quota_usage_bytes", cache_salt="s1") == 3 * CHUNK_BYTES
        assert metric(text, "lmcache_mp_l1_eviction_loop_ticks_total") >= 1
        with pytest.raises(Exception):  # noqa: B017, PT011 - any error reply counts
            c.call("store", w.key(t, "x"), 1, [[1]], b"")
        text = api.get("/metrics").text
        assert metric(text, "lmcache_rs_request_errors_total", code="unknown_instance") == 1
        r = api.post("/metrics/reset")
        assert (r.status_code, r.text) == (200, "ok")
        text = api.get("/metrics").text
        assert "lmcache_mp_l1_write_chunks_total{" not in text
        assert metric(text, "lmcache_rs_request_errors_total", code="unknown_instance") == 0
        assert metric(text, "lmcache_mp_l1_eviction_loop_ticks_total") <= 2
        # Gauges describe state, not history: they survive the reset.
        assert (
            metric(text, "lmcache_mp_l1_memory_usage_bytes", backend="dram", l1_tag="_default")
            == 3 * CHUNK_BYTES
        )
        w.close()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (.ci/run installs it)")
def test_metrics_pass_promtool(api, server) -> None:
    with server.client() as c:
        w = Worker(c)
        t = tokens(C, seed=4)
        assert w.store(t, list(range(1, 17)), salt="tenant")
        lookup(c, t, "p", salt="tenant", model=w.model)
        c.end_session("p")
        text = api.get("/metrics").text
        w.close()
    out = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_openapi_schema_is_served(api) -> None:
    schema = api.get("/schema/openapi.json").json()
    assert "/quota/{cache_salt}" in schema["paths"]
    assert "/healthcheck" in schema["paths"]
