"""The dashboard's data: request timings and their quantiles, the bounded stats history and
`GET /stats/history`, and the page's document (the browser test drives the page itself)."""

from __future__ import annotations

import base64
import hashlib
import re
import time

import httpx
import msgspec
import pytest
from kvsim import Worker, lookup, tokens
from prometheus_client.parser import text_string_to_metric_families

from lmcache_rs.client import MPClient
from lmcache_rs.config import ConfigError, HttpConfig, StorageConfig
from lmcache_rs.observability import timing
from lmcache_rs.observability.history import History, StatsHistory
from lmcache_rs.observability.timing import BUCKETS, OpTiming, RequestTimings

C = 256
CHUNK_BYTES = 2 * 2 * C * 2 * 32 * 2  # kvsim default worker: 128 KiB per chunk


# ---- timings ----------------------------------------------------------------------------------------


def test_quantiles_interpolate_inside_buckets_like_histogram_quantile() -> None:
    t = RequestTimings()
    for _ in range(50):
        t.record("lookup", 30e-6)  # (25 us, 50 us]
    for _ in range(49):
        t.record("lookup", 0.7e-3, 0.1e-3)  # 0.8 ms: (500 us, 1 ms]
    t.record("lookup", 20.0)  # beyond the last bound
    snap = t.snapshot()["lookup"]
    assert snap.count == 100
    assert snap.handler_seconds == pytest.approx(50 * 30e-6 + 49 * 0.7e-3 + 20.0)
    assert snap.queue_seconds == pytest.approx(49 * 0.1e-3)
    assert sum(snap.buckets) == 100
    assert snap.buckets[BUCKETS.index(50e-6)] == 50
    assert snap.buckets[BUCKETS.index(1e-3)] == 49
    assert snap.buckets[-1] == 1
    # rank 50 of 100 ends the (25, 50] us bucket; rank 99 is the 49th of 49 in (0.5, 1] ms.
    assert timing.quantile(0.5, snap.buckets) == pytest.approx(50e-6)
    assert timing.quantile(0.99, snap.buckets) == pytest.approx(1e-3)
    assert timing.quantile(0.25, snap.buckets) == pytest.approx(37.5e-6)
    assert timing.quantile(1.0, snap.buckets) == BUCKETS[-1]
    assert timing.quantile(0.5, [0] * (len(BUCKETS) + 1)) is None


def test_timing_differences_survive_a_reset() -> None:
    empty = [0] * (len(BUCKETS) + 1)
    before = {"store": OpTiming(10, 1.0, 0.5, [10, *empty[1:]])}
    now = {"store": OpTiming(15, 1.5, 0.75, [12, 3, *empty[2:]]), "lookup": OpTiming(2, 0.1, 0.0, empty)}
    d = timing.diff(now, before)
    assert d["store"].count == 5
    assert d["store"].buckets[:2] == [2, 3]
    assert d["lookup"].count == 2  # new op: from zero
    restarted = {"store": OpTiming(3, 0.3, 0.0, [3, *empty[1:]])}
    assert timing.diff(restarted, before)["store"].count == 3  # went down: counted from zero


# ---- the history ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "flag"),
    [
        ({"stats_history_interval_seconds": 0.0}, "--stats-history-interval-seconds"),
        ({"stats_history_seconds": 1.0}, "--stats-history-seconds"),  # shorter than the interval
        ({"stats_history_seconds": 1e9}, "--stats-history-seconds"),  # too many samples
    ],
)
def test_history_configuration_is_checked(kw: dict[str, float], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        HttpConfig(**kw)


def test_history_is_bounded_and_filters_by_time(runtime_factory) -> None:
    rt = runtime_factory(StorageConfig(l1_size_gb=0.01))
    h = StatsHistory(rt, 0.5, 2.0)  # 4 samples at most
    assert h.sample().startswith("first sample")
    assert h.samples() == []
    for _ in range(10):
        h.sample()
    got = h.samples()
    assert len(got) == 4
    assert [s.t for s in got] == sorted(s.t for s in got)
    assert h.samples(since=got[1].t) == got[2:]
    assert h.samples(since=got[-1].t) == []


def test_history_rates_come_from_the_same_counters_as_metrics(runtime_factory) -> None:
    rt = runtime_factory(StorageConfig(l1_size_gb=0.05))
    h = StatsHistory(rt, 1.0, 60.0)
    with MPClient(rt.server.url, timeout=20) as c:
        w = Worker(c, model="hist-model")
        h.sample()
        t = tokens(3 * C, seed=5)
        assert w.store(t, list(range(1, 49)), salt="alice")
        assert lookup(c, t, "a", salt="alice", model=w.model) == 3
        assert w.retrieve(t, list(range(100, 148)), "a", salt="alice")
        c.end_session("a")
        assert lookup(c, tokens(2 * C, seed=6), "b", salt="alice", model=w.model) == 0
        c.end_session("b")
        with pytest.raises(Exception):  # noqa: B017, PT011 - any error reply counts
            c.call("store", w.key(t, "x"), 1, [[1]], b"")
        h.sample()
        (s,) = h.samples()
        assert s.store_bytes_per_s * s.interval == pytest.approx(3 * CHUNK_BYTES)
        assert s.retrieve_bytes_per_s * s.interval == pytest.approx(3 * CHUNK_BYTES)
        assert s.lookups_per_s * s.interval == pytest.approx(2)
        assert s.lookup_hit_ratio == pytest.approx(3 / 5)  # 3 of 3 chunks, then 0 of 2
        assert s.errors == {"unknown_instance": 1}
        assert s.requests_per_s["lookup"] * s.interval == pytest.approx(2)
        assert 0 < s.latency["store"].p50 <= s.latency["store"].p99
        assert s.latency["store"].requests == 2  # the good store and the refused one
        (l1,) = s.tiers
        assert (l1.name, l1.used_bytes, l1.objects) == ("L1", 3 * CHUNK_BYTES, 3)
        now = h.current()
        (tenant,) = [x for x in now.tenants if x.cache_salt == "alice"]
        assert (tenant.l1_bytes, tenant.objects, tenant.lookups) == (3 * CHUNK_BYTES, 3, 2)
        assert tenant.hit_ratio == pytest.approx(3 / 5)
        (worker,) = now.workers
        assert (worker.instance_id, worker.model_name, worker.world_size) == (w.instance_id, w.model, 1)
        assert (worker.transfer_mode, worker.device) == ("lmcache_driven", "cpu")
        assert now.health.is_healthy
        assert now.errors == {"unknown_instance": 1}
        w.close()


def test_history_names_what_is_unhealthy(runtime_factory) -> None:
    rt = runtime_factory(StorageConfig(l1_size_gb=0.01))
    h = StatsHistory(rt, 1.0, 60.0)
    rt.periodic.get("l1-eviction-cycle").stop()
    now = h.current()
    assert not now.health.is_healthy
    assert now.health.reason == rt.health_problem()
    assert "periodic thread l1-eviction-cycle (critical, every 1 s) not running" in now.health.reason
    (row,) = [t for t in now.health.threads if t.name == "l1-eviction-cycle"]
    assert (row.is_healthy, row.is_running) == (False, False)
    assert row.reason is not None
    assert "not running" in row.reason
    assert now.health.threads[0] is row  # unhealthy threads first
    assert now.health.io_thread.is_healthy
    (l1,) = now.tiers
    assert not l1.is_healthy
    assert "l1-eviction-cycle" in l1.problems[0]


# ---- over HTTP --------------------------------------------------------------------------------------


@pytest.fixture
def fast_server(server_factory):
    return server_factory("--stats-history-interval-seconds", "0.2", "--stats-history-seconds", "1")


def test_stats_history_endpoint(fast_server) -> None:
    with fast_server.client() as c, httpx.Client(base_url=fast_server.http, timeout=30) as api:
        w = Worker(c)
        t = tokens(2 * C, seed=9)
        assert w.store(t, list(range(1, 33)))
        # Samples arrive every 0.2 s; the window holds 5.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            h = msgspec.json.decode(api.get("/stats/history").content, type=History)
            if len(h.samples) == 5 and sum(s.lookups_per_s for s in h.samples) > 0:
                break
            lookup(c, t, "x")
            c.end_session("x")
            time.sleep(0.05)
        assert len(h.samples) == 5
        assert (h.interval_seconds, h.window_seconds) == (0.2, 1.0)
        assert [x.instance_id for x in h.workers] == [w.instance_id]
        st = api.get("/status").json()
        assert h.tiers[0].capacity_bytes == st["storage_manager"]["l1_manager"]["memory_total_bytes"]
        names = {x.name for x in h.health.threads}
        assert {"l1-eviction-cycle", "stats-history"} <= names
        last = h.samples[-1].t
        newer = api.get("/stats/history", params={"since": last}).json()
        assert all(s["t"] > last for s in newer["samples"])
        assert len(newer["samples"]) < 5
        assert api.get("/stats/history", params={"since": "soon"}).status_code == 400
        w.close()


def test_request_duration_histogram_in_metrics(server) -> None:
    with server.client() as c, httpx.Client(base_url=server.http, timeout=30) as api:
        for i in range(5):
            lookup(c, tokens(C, seed=i), f"l{i}")
            c.end_session(f"l{i}")

        def lookups() -> dict[str, float]:
            out = {}
            for fam in text_string_to_metric_families(api.get("/metrics").text):
                if fam.name == "lmcache_rs_request_duration_seconds":
                    for sm in fam.samples:
                        if sm.labels.get("op") == "lookup":
                            out[sm.name.rsplit("_", 1)[-1] + sm.labels.get("le", "")] = sm.value
            return out

        got = lookups()
        assert got["count"] == 5
        assert got["bucket+Inf"] == 5
        les = sorted((float(k[6:]), v) for k, v in got.items() if k.startswith("bucket"))
        assert [v for _, v in les] == sorted(v for _, v in les)  # cumulative
        assert len(les) == len(BUCKETS) + 1
        assert api.post("/metrics/reset").status_code == 200
        assert lookups()["count"] == 0


# ---- the page ---------------------------------------------------------------------------------------


def _sha(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_dashboard_page_is_one_offline_document_pinned_by_its_csp(server) -> None:
    r = httpx.get(server.http + "/dashboard", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    html = r.text
    csp = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.S)
    (style,) = re.findall(r"<style>(.*?)</style>", html, re.S)
    assert csp["script-src"] == _sha(script)
    assert csp["style-src"] == _sha(style)
    assert csp["default-src"] == "'none'"
    assert csp["connect-src"] == "'self'"
    # Nothing loaded from elsewhere: no src/href to another origin, no protocol-relative URL.
    assert not re.search(r"""(src|href)=["'](https?:)?//""", html)
    assert "stats/history" in script
    assert "innerHTML" not in script  # every value goes in as text
