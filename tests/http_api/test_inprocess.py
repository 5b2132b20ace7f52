"""Cases that need the app in this process: before the engine is ready, and a critical
periodic thread that stops ticking."""

from __future__ import annotations

import time

import pytest
from litestar.testing import TestClient

from lmcache_rs.config import StorageConfig
from lmcache_rs.http.app import create_app
from lmcache_rs.http.state import HttpState
from lmcache_rs.observability.periodic import Level, PeriodicThread
from lmcache_rs.runtime import Runtime


def test_engine_routes_answer_503_before_the_engine_is_ready() -> None:
    with TestClient(create_app(HttpState())) as api:
        assert api.get("/").status_code == 200
        r = api.get("/healthcheck")
        assert (r.status_code, r.json()) == (503, {"status": "unhealthy", "reason": "engine not initialized"})
        r = api.get("/status")
        assert (r.status_code, r.json()) == (503, {"error": "engine not initialized"})
        r = api.post("/clear-cache")
        assert (r.status_code, r.json()) == (503, {"status": "error", "reason": "engine not initialized"})
        for method, path in (
            ("GET", "/quota"),
            ("PUT", "/quota/a"),
            ("GET", "/quota/a"),
            ("DELETE", "/quota/a"),
        ):
            r = api.request(method, path, json={"limit_gb": 1})
            assert (r.status_code, r.json()) == (503, {"error": "engine not initialized"}), path
        r = api.get("/conf")
        assert (r.status_code, r.json()) == (503, {"error": "configs not initialized"})
        assert api.get("/version").status_code == 200


@pytest.fixture
def runtime(runtime_factory) -> Runtime:
    return runtime_factory(StorageConfig(l1_size_gb=0.01))


def start_flaky(runtime: Runtime, name: str, job, runs: int = 4) -> PeriodicThread:
    """Registers and starts a fast HIGH thread, and waits until it has run `runs` times."""
    t = runtime.periodic.register(PeriodicThread(name, 0.05, Level.HIGH, job))
    t.start()
    deadline = time.monotonic() + 20
    while t.total_runs < runs:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return t


def test_health_turns_503_when_a_critical_thread_stops_ticking(runtime: Runtime) -> None:
    with TestClient(create_app(runtime.http_state)) as api:
        assert api.get("/healthcheck").status_code == 200
        runtime.periodic.get("l1-eviction-cycle").stop()
        r = api.get("/healthcheck")
        assert r.status_code == 503
        assert "l1-eviction-cycle" in r.json()["reason"]
        health = api.get("/periodic-threads-health").json()
        assert health["healthy"] is False
        assert [t["name"] for t in health["unhealthy_threads"]] == ["l1-eviction-cycle"]
        assert api.get("/status").json()["is_healthy"] is False


def test_a_thread_that_raises_is_counted_and_keeps_running(runtime: Runtime) -> None:
    calls = []

    def job() -> str:
        calls.append(1)
        if len(calls) % 2:
            raise RuntimeError("boom")
        return "fine"

    t = start_flaky(runtime, "flaky", job)
    st = t.status()
    assert st.failed_runs >= 2
    assert st.is_running
    assert 0 < st.success_rate < 100
    with TestClient(create_app(runtime.http_state)) as api:
        got = api.get("/periodic-threads/flaky").json()
        assert got["failed_runs"] >= 2
        assert got["last_summary"]["message"] in ("fine", "RuntimeError: boom")


def test_a_thread_whose_every_run_raises_makes_the_server_unhealthy(runtime: Runtime) -> None:
    def job() -> str:
        raise OSError("disk gone")

    t = start_flaky(runtime, "broken", job)
    with TestClient(create_app(runtime.http_state)) as api:
        r = api.get("/healthcheck")
        assert r.status_code == 503
        assert "broken" in r.json()["reason"]
        assert "disk gone" in r.json()["reason"]
        runs = t.total_runs
        time.sleep(0.3)
        assert t.total_runs > runs, "the loop keeps running"
        assert t.is_running
