"""Health of the data path (observability.health): the request I/O loop's heartbeat in
/healthcheck and /status, and L1's derived `is_healthy`.

Nothing here races a deadline: a stall is made by blocking the loop in a handler and moving a
manual heartbeat clock, L1's failure window by running the eviction cycle by hand, and waits
are for conditions that will come true (their timeouts only catch a broken build).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from kvsim import MODEL, Worker, tokens
from litestar.testing import TestClient

from lmcache_rs import ManualClock
from lmcache_rs.client import MPClient, ServerError
from lmcache_rs.client.client import make_key
from lmcache_rs.config import StorageConfig
from lmcache_rs.http.app import create_app
from lmcache_rs.observability.periodic import Level, PeriodicThread
from lmcache_rs.runtime import Runtime

C = 256
BPC = 16
CHUNK_BYTES = 2 * 2 * C * 2 * 32 * 2  # kvsim default worker: 128 KiB per chunk
SMALL_L1 = 8 * CHUNK_BYTES / (1 << 30)  # exactly 8 chunks


def blocks(first: int, chunks: int) -> list[int]:
    return list(range(first, first + chunks * BPC))


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---- a real server process -------------------------------------------------------------------


def test_a_serving_server_is_healthy_and_shows_its_io_loop(server_factory) -> None:
    server = server_factory("--io-stall-timeout-seconds", "30")
    with server.client() as c, httpx.Client(base_url=server.http, timeout=30) as api:
        assert c.ping()
        r = api.get("/healthcheck")
        assert (r.status_code, r.json()) == (200, {"status": "healthy"})
        st = api.get("/status").json()
        io = st["io_thread"]
        assert io["is_healthy"] is True
        assert io["reason"] is None
        assert io["alive"] is True
        assert io["error"] is None
        assert io["stall_timeout_seconds"] == 30.0
        assert 0 <= io["last_tick_ago"] < 30
        assert io["requests_received"] >= 2  # wait_for_server's ping and ours
        assert io["replies_sent"] >= 2
        assert (st["is_healthy"], st["reason"]) == (True, None)
        l1 = st["storage_manager"]["l1_manager"]
        assert (l1["is_healthy"], l1["problems"], l1["recent_allocation_failures"]) == (True, [], 0)
        assert st["storage_manager"]["is_healthy"] is True


# ---- in-process runtimes (real ZMQ socket, the HTTP app in a test client) --------------------


@pytest.fixture
def clock() -> ManualClock:
    """The I/O loop's heartbeat clock, moved only by the test."""
    return ManualClock()


@pytest.fixture
def runtime(runtime_factory, clock: ManualClock) -> Runtime:
    return runtime_factory(StorageConfig(l1_size_gb=0.01), clock=clock)


@pytest.fixture
def api(runtime: Runtime) -> Iterator[TestClient[Any]]:
    with TestClient(create_app(runtime.http_state)) as client:
        yield client


def test_a_blocked_io_loop_turns_healthcheck_503_until_it_ticks_again(
    runtime: Runtime, api: TestClient[Any], clock: ManualClock
) -> None:
    native = runtime.server.native
    assert api.get("/healthcheck").status_code == 200
    with MPClient(runtime.server.url, timeout=60) as c:
        assert c.call("noop") == "OK"
        native.inject_fault("stall")  # the Rust I/O loop blocks at its next iteration
        wait_for(lambda: native.stalled, "the loop to stall")
        uid = c.send("end_session", "r")  # cannot be answered while it is blocked
        clock.advance(9.0)
        assert api.get("/healthcheck").status_code == 200, "within --io-stall-timeout-seconds (10)"
        clock.advance(2.0)
        r = api.get("/healthcheck")
        assert r.status_code == 503
        reason = r.json()["reason"]
        assert "request I/O thread stalled" in reason
        assert "11.0 s ago" in reason
        assert "limit 10 s" in reason
        st = api.get("/status").json()
        assert st["is_healthy"] is False
        assert st["reason"] == reason
        assert st["io_thread"]["is_healthy"] is False
        assert st["io_thread"]["alive"] is True
        assert st["io_thread"]["last_tick_ago"] == pytest.approx(11.0)
        native.release_fault()
        assert c.recv(uid) is None
    wait_for(lambda: api.get("/healthcheck").status_code == 200, "the loop to tick again")
    assert api.get("/status").json()["io_thread"]["last_tick_ago"] == 0.0


def test_a_dead_io_loop_turns_healthcheck_503(runtime: Runtime, api: TestClient[Any]) -> None:
    runtime.server.native.inject_fault("panic", "escaped the loop")
    wait_for(lambda: not runtime.io_status().alive, "the I/O thread to end")
    r = api.get("/healthcheck")
    assert r.status_code == 503
    assert r.json()["reason"] == "request I/O thread died: panic: escaped the loop"
    io = api.get("/status").json()["io_thread"]
    assert (io["alive"], io["is_healthy"], io["error"]) == (False, False, "panic: escaped the loop")


def test_l1_is_unhealthy_while_full_and_refusing_stores(runtime_factory) -> None:
    rt = runtime_factory(StorageConfig(l1_size_gb=SMALL_L1))
    # The eviction cycle, paced by hand: after one run, its next is an hour away.
    cycle = rt.periodic.register(
        PeriodicThread("l1-eviction-cycle", 3600.0, Level.CRITICAL, rt.l1_eviction_cycle)
    )
    cycle.start()
    wait_for(lambda: cycle.total_runs >= 1, "the first eviction cycle")

    def l1() -> dict[str, Any]:
        return api.get("/status").json()["storage_manager"]["l1_manager"]

    with TestClient(create_app(rt.http_state)) as api, MPClient(rt.server.url) as c:
        w = Worker(c)
        full = tokens(8 * C, seed=1)
        assert w.store(full, blocks(1, 8))
        assert c.lookup(make_key(full, "locker", model_name=MODEL)) == 8  # read-locks all 8
        got = l1()
        assert got["memory_usage_ratio"] == 1.0
        assert (got["is_healthy"], got["problems"]) == (True, []), "full, but no store refused"

        with pytest.raises(ServerError) as e:
            w.store(tokens(C, seed=2), blocks(200, 1))
        assert e.value.code == "not_stored"
        got = l1()
        assert got["is_healthy"] is False
        assert got["recent_allocation_failures"] == 1
        [problem] = got["problems"]
        assert problem.startswith("L1 is full (100% used, trigger watermark 80%) and refused 1 chunk")
        assert "8 objects read-locked" in problem
        st = api.get("/status").json()
        assert st["storage_manager"]["is_healthy"] is False
        assert st["is_healthy"] is True, "a full L1 alone does not fail /healthcheck"
        assert api.get("/healthcheck").status_code == 200

        cycle.run_once()  # the refusal happened during the cycle that just ended: still shown
        assert l1()["is_healthy"] is False
        cycle.run_once()  # a whole cycle without refusals: healthy, though still full
        got = l1()
        assert (got["is_healthy"], got["problems"], got["memory_usage_ratio"]) == (True, [], 1.0)

        c.end_session("locker")
        cycle.stop()
        got = l1()
        assert got["is_healthy"] is False
        assert "periodic thread l1-eviction-cycle" in got["problems"][0]
        assert "not running" in got["problems"][0]
        w.close()
