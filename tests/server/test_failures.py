"""Every failure reads as a failure to LMCache's client (spec J.7, issue 19).

A real server, and workers in their own processes (tests/j7worker.py) that read every reply as
LMCache 0.5.6 does (tests/j7.py): each test asserts what such a client concludes, in both
transfer modes, and that it concluded it without waiting out a timeout.
"""

from __future__ import annotations

import itertools
import time

import pytest
from j7 import C, Conclusion, J7Scheduler, Outcome, WorkerProcess, tokens

from lmcache_rs.client.client import make_key
from lmcache_rs.protocol.messages import EngineDrivenRegistration

MODES = ["lmcache_driven", "engine_driven"]
REGISTERED = {"lmcache_driven": Conclusion.REGISTERED, "engine_driven": Conclusion.REGISTERED_SHM}
_ids = itertools.count(1)


def fresh(o: Outcome, conclusion: Conclusion) -> None:
    """`o` is `conclusion`, reached from a reply (no timeout waited out)."""
    assert o.conclusion is conclusion, o
    assert not o.waited, o


@pytest.fixture
def workers():
    started: list[WorkerProcess] = []

    def make(server, mode: str, seed: int = 0, register: bool = True, **reg) -> WorkerProcess:
        w = WorkerProcess(server.url, mode, 5_000_000 + next(_ids), seed=seed)
        started.append(w)
        if register:
            fresh(w.register(**reg), REGISTERED[mode])
        return w

    yield make
    for w in started:
        w.close()


def wait_for(cond, what: str, timeout: float = 60.0) -> None:
    """Polls `cond` (a bound on a test that would otherwise hang, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def roundtrip(w: WorkerProcess, sched: J7Scheduler, seed: int, rid: str) -> None:
    """Store two chunks, look them up, retrieve them elsewhere: byte-exact."""
    t = tokens(2 * C, seed=seed)
    fresh(w.store(t, 1, f"{rid}-s"), Conclusion.STORED)
    hit = sched.lookup(t, rid)
    assert (hit.conclusion, hit.value) == (Conclusion.HIT, 2), hit
    got = w.retrieve(t, 100, rid, src=1)
    fresh(got, Conclusion.RETRIEVED)
    assert got.value is True, "retrieved bytes differ from the stored ones"
    sched.end_session(rid)


@pytest.mark.parametrize("mode", MODES)
def test_unknown_instance_reads_as_failure_then_heartbeats_register_it(server_factory, workers, mode) -> None:
    """The server restarted and forgot the worker (no heartbeat ran in between): its stores and
    retrieves read as failures (an engine-driven store used to read as stored: `slots: []`),
    and two heartbeats later it has registered again by itself."""
    first = server_factory()
    port = int(first.url.rsplit(":", 1)[1])
    w = workers(first, mode, seed=1)
    fresh(w.beat(), Conclusion.HEALTHY)
    first.kill()
    second = server_factory(port=port)
    sched = J7Scheduler(second.url)
    t = tokens(2 * C, seed=2)
    fresh(w.store(t, 1, "s"), Conclusion.NOT_STORED)
    assert sched.lookup(t, "r").value == 0
    fresh(w.retrieve(t, 100, "r"), Conclusion.NOT_RETRIEVED)
    fresh(w.beat(), Conclusion.UNHEALTHY)  # told: "I do not know you"
    fresh(w.beat(), Conclusion.HEALTHY)  # and the edge re-registers it
    log = w.status()["beat_log"]
    assert [b["ping"] for b in log[-2:]] == [False, True]
    assert log[-1]["rereg"] == REGISTERED[mode].value
    roundtrip(w, sched, seed=3, rid="after")
    assert w.status()["registrations"] == 2
    fresh(w.beat(), Conclusion.HEALTHY)  # known now: true from here on
    fresh(sched.ping(), Conclusion.HEALTHY)  # the scheduler's ping (nil) was never refused
    sched.close()


@pytest.mark.parametrize("mode", MODES)
def test_a_reaped_worker_registers_again(server_factory, workers, mode) -> None:
    """A worker silent past the reap timeout (a stall, a partition) is dropped; it is told so by
    its next ping and is serving again after the one after."""
    s = server_factory("--worker-reap-timeout-seconds", "1", "--worker-registration-grace-seconds", "30")
    w = workers(s, mode, seed=4)
    sched = J7Scheduler(s.url)
    fresh(w.beat(), Conclusion.HEALTHY)  # pinged: the 1 s reap timeout applies
    wait_for(lambda: "reaped after silence" in s.log(), "the silent worker was not reaped")
    t = tokens(2 * C, seed=5)
    fresh(w.store(t, 1, "s"), Conclusion.NOT_STORED)
    fresh(w.retrieve(t, 100, "s"), Conclusion.NOT_RETRIEVED)
    fresh(w.beat(), Conclusion.UNHEALTHY)
    fresh(w.beat(), Conclusion.HEALTHY)
    assert w.status()["registrations"] == 2
    roundtrip(w, sched, seed=6, rid="back")  # within the 30 s grace of a fresh registration
    sched.close()


def fill_l1(c, iid: int, chunks: int) -> int:
    """Stages `chunks` chunks (and fewer when L1 fills) of an engine-driven instance of the
    test model's geometry without committing them: L1 full of write-locked objects. Returns
    how many were staged."""
    reg = EngineDrivenRegistration(
        instance_id=iid,
        model_name="test-model",
        world_size=1,
        block_size=16,
        num_layers=2,
        hidden_dim_size=64,
        dtype_str="float16",
        use_mla=False,
    )
    c.register_engine_driven(reg)
    t = tokens(chunks * C, seed=iid)
    return len(c.prepare_store(make_key(t, f"fill-{iid}", model_name="test-model", worker_id=0), iid).slots)


@pytest.mark.parametrize("mode", MODES)
def test_l1_full_of_locked_objects_reads_as_not_stored(server, workers, mode) -> None:
    w = workers(server, mode, seed=7)
    sched = J7Scheduler(server.url)
    with server.client() as c:
        capacity = fill_l1(c, 91, 1000)  # 64 MiB of 128 KiB chunks: 512
        assert 0 < capacity < 1000
        t = tokens(2 * C, seed=8)
        fresh(w.store(t, 1, "full"), Conclusion.NOT_STORED)  # engine-driven: no slots -> commit false
        assert sched.lookup(t, "r0").value == 0
        # Room for one chunk of two: the store reads as failed, the chunk that fit is served.
        c.unregister_engine_driven(91)
        assert fill_l1(c, 92, capacity - 1) == capacity - 1
        fresh(w.store(t, 1, "half"), Conclusion.NOT_STORED)
        assert sched.lookup(t, "r1").value == 1
        sched.end_session("r1")
        c.unregister_engine_driven(92)
    roundtrip(w, sched, seed=9, rid="room")
    sched.close()


@pytest.mark.parametrize("restart", ["between_beats", "after_timeouts"])
@pytest.mark.parametrize("mode", MODES)
def test_restart_under_a_running_worker_recovers_within_two_heartbeats(
    server_factory, workers, mode, restart
) -> None:
    """The server is killed and restarted on its port while a worker runs its heartbeat thread
    (it never re-registers by hand): counted in heartbeats from the moment the new server
    answers, it stores and retrieves byte-exact again within two.

    `between_beats`: the new server is up before the next beat, as with vLLM's 10 s default
    interval and a quick restart (the heartbeat is paused across the restart to make it so
    here): no ping ever fails by itself, so the server must tell the worker. `after_timeouts`:
    pings time out while no server runs, and the worker is unhealthy when the new one starts."""
    first = server_factory()
    port = int(first.url.rsplit(":", 1)[1])
    w = workers(first, mode, seed=10)
    sched = J7Scheduler(first.url)
    roundtrip(w, sched, seed=11, rid="before")
    sched.close()

    def beats() -> int:
        return w.status()["beats"]

    w.call("start_heartbeat", interval=1.0)
    wait_for(lambda: beats() >= 1, "the heartbeat does not run")
    t = tokens(C, seed=12)
    if restart == "between_beats":
        w.call("stop_heartbeat")
        first.kill()
        second = server_factory(port=port)  # answers from here on
        up = beats()
        assert w.status()["healthy"]
        fresh(w.store(t, 1, "forgotten"), Conclusion.NOT_STORED)  # engine-driven: used to read stored
        w.call("start_heartbeat", interval=1.0)
    else:
        first.kill()
        down = beats()
        # Every ping in flight at the kill has timed out, and one more beat ran against no server.
        wait_for(lambda: beats() >= down + 2, "the heartbeat stopped")
        assert not w.status()["healthy"]
        fresh(w.store(t, 1, "down"), Conclusion.NOT_STORED)  # skipped while unhealthy
        second = server_factory(port=port)
        up = beats()
    wait_for(lambda: beats() >= up + 3, "the heartbeat stopped")
    st = w.status()
    rereg = [b["beat"] for b in st["beat_log"] if b["rereg"]]
    assert rereg, st["beat_log"]
    assert rereg[0] - up <= 2, (up, st["beat_log"])
    assert st["registrations"] == 2
    assert st["healthy"]
    sched2 = J7Scheduler(second.url)
    roundtrip(w, sched2, seed=13, rid="after")
    w.call("stop_heartbeat")
    sched2.close()


@pytest.mark.parametrize("mode", MODES)
def test_malformed_requests_read_as_failures(server, workers, mode) -> None:
    w = workers(server, mode, seed=14)
    sched = J7Scheduler(server.url)
    t = tokens(3 * C, seed=15)
    # A range that does not start on a chunk, and a key frame that does not decode.
    fresh(w.store(t, 1, "bad", start=3, end=2 * C + 3), Conclusion.NOT_STORED)
    fresh(w.store(t, 1, "garbled", end=2 * C, garbled=True), Conclusion.NOT_STORED)
    assert sched.lookup(t, "r0").value == 0
    fresh(w.store(t, 1, "good", end=2 * C), Conclusion.STORED)
    # A retrieve range beyond the request's tokens: never "retrieved" with chunks missing.
    fresh(w.retrieve(t[: 2 * C + 10], 100, "short", end=3 * C), Conclusion.NOT_RETRIEVED)
    fresh(w.retrieve(t, 100, "r1", end=2 * C, src=1), Conclusion.RETRIEVED)
    # A ping the server cannot read reads as unhealthy; the next one heals (same registration).
    fresh(w.beat(garbled=True), Conclusion.UNHEALTHY)
    fresh(w.beat(), Conclusion.HEALTHY)
    # Scheduler: a lookup or query it cannot read is acked and reads as 0 hit chunks.
    r = sched.conn.raw("lookup", [b"\xc1", b"\x01"])
    assert r.resolved
    assert r.value is None
    r = sched.conn.raw("query_prefetch_status", [b"\x07"])
    assert (r.resolved, r.value) == (True, 0)
    fresh(sched.clear(), Conclusion.CLEARED)  # nil: LMCache decodes nothing else for clear
    sched.close()


@pytest.mark.parametrize("mode", MODES)
def test_an_oversized_request_is_dropped_and_the_worker_goes_on(server_factory, workers, mode) -> None:
    """libzmq drops a message over --max-message-bytes with the connection, before the server
    sees it: the one case with no in-band answer (J.7's no-reply column). The worker's
    connection comes back and everything after is answered."""
    s = server_factory("--max-message-bytes", str(1 << 20))
    w = workers(s, mode, seed=16)
    sched = J7Scheduler(s.url)
    o = w.oversized(tokens(C, seed=17), "big", 2 << 20, timeout=2.0)
    assert o.waited, o
    assert o.conclusion is (Conclusion.PENDING if mode == "lmcache_driven" else Conclusion.NOT_STORED), o
    fresh(w.beat(), Conclusion.HEALTHY)
    roundtrip(w, sched, seed=18, rid="after")
    assert s.proc.poll() is None
    sched.close()


def test_no_pool_engine_driven_worker_never_reads_success(server_factory, workers) -> None:
    """Without a shared-memory pool the registration answers ("", 0): LMCache's client turns
    pickle, whose commits are refused: every store reads as not stored, every retrieve as
    failed, and its pings keep asking it to register again."""
    s = server_factory("--shm-name", "")
    w = workers(s, "engine_driven", seed=19, register=False)
    fresh(w.register(), Conclusion.REGISTERED_PICKLE)
    sched = J7Scheduler(s.url)
    t = tokens(2 * C, seed=20)
    fresh(w.store(t, 1, "s"), Conclusion.NOT_STORED)
    assert sched.lookup(t, "r").value == 0
    fresh(w.retrieve(t, 100, "r"), Conclusion.NOT_RETRIEVED)
    fresh(w.beat(), Conclusion.UNHEALTHY)
    fresh(w.beat(), Conclusion.HEALTHY)  # registers again: still no pool, still pickle
    fresh(w.store(t, 1, "s2"), Conclusion.NOT_STORED)
    sched.close()


def test_refused_lmcache_driven_registration_never_reads_success(server, workers) -> None:
    """LMCache reads any nil reply to register_kv_cache as success (a non-nil one would make it
    wait mq_timeout), so a refused registration reads as registered; what follows reads as
    failures, and the heartbeat keeps retrying the registration."""
    w = workers(server, "lmcache_driven", seed=21, register=False)
    fresh(w.register(layout_hints={}), Conclusion.REGISTERED)  # refused: no kv_layout
    sched = J7Scheduler(server.url)
    t = tokens(2 * C, seed=22)
    fresh(w.store(t, 1, "s"), Conclusion.NOT_STORED)
    assert sched.lookup(t, "r").value == 0
    fresh(w.retrieve(t, 100, "r"), Conclusion.NOT_RETRIEVED)
    fresh(w.beat(), Conclusion.UNHEALTHY)
    fresh(w.beat(), Conclusion.HEALTHY)  # registers again (refused again: read as success)
    assert w.status()["registrations"] == 2
    fresh(w.store(t, 1, "s2"), Conclusion.NOT_STORED)
    sched.close()


def test_ping_tells_an_unknown_instance_once_then_lets_it_recover() -> None:
    """The ping rule on its own clock: False, then True (at least once, and for RETELL_SECONDS,
    so pings queued while the server was down cannot eat the edge), then False again while
    the instance is still unknown; a registration ends it."""
    from lmcache_rs import PING_RETELL_SECONDS, ChainMemo, ControlPlane, L1Index, ManualClock  # noqa: PLC0415
    from lmcache_rs.engine.contexts import ContextRegistry, build_engine_driven  # noqa: PLC0415

    clock = ManualClock()
    control = ControlPlane(L1Index(1 << 20), ChainMemo(16), 256, clock=clock)
    reg = ContextRegistry(control)

    def pings(instance: int, steps: list[float]) -> list[bool]:
        out = []
        for dt in steps:
            clock.advance(dt)
            out.append(control.ping(instance))
        return out

    assert pings(7, [0.0, 0.1, 0.1, 0.1]) == [False, True, True, True]
    # Past the window: told again; the next ping is True however late it comes.
    assert pings(7, [PING_RETELL_SECONDS + 1, 1000.0, 1.0]) == [False, True, False]
    assert pings(8, [0.0]) == [False]  # per instance
    ctx = build_engine_driven(
        EngineDrivenRegistration(
            instance_id=8,
            model_name="m",
            world_size=1,
            block_size=16,
            num_layers=1,
            hidden_dim_size=8,
            dtype_str="float16",
            use_mla=False,
        ),
        256,
    )
    reg.add(ctx)
    assert pings(8, [1.0, 1.0]) == [True, True]
    reg.remove(8)  # unregistered or reaped: told again
    assert pings(8, [1.0, 1.0]) == [False, True]


def test_a_failing_l2_prefetch_never_leaves_the_lookup_pending(
    runtime_factory, tmp_path, monkeypatch
) -> None:
    """query_prefetch_status answers nil while an L2 prefetch runs, and LMCache's scheduler asks
    again forever: whatever fails in the prefetch, the lookup gets a hit (what L1 held), and a
    hit never exceeds the lookup's range."""
    from kvsim import Worker  # noqa: PLC0415

    from lmcache_rs.client import MPClient  # noqa: PLC0415
    from lmcache_rs.config import FsL2Config, StorageConfig  # noqa: PLC0415

    l2_dir = tmp_path / "l2"
    rt = runtime_factory(StorageConfig(l1_size_gb=0.01, l2_adapters=[FsL2Config(base_path=str(l2_dir))]))
    sched = J7Scheduler(rt.server.url)
    with MPClient(rt.server.url, timeout=10) as c:
        w = Worker(c)
        t = tokens(3 * C, seed=30)
        assert w.store(t, list(range(1, 1 + 3 * 16)))
        wait_for(
            lambda: l2_dir.exists() and sum(1 for p in l2_dir.rglob("*") if p.is_file()) >= 3, "L2 write"
        )
        tier = rt.engine.l2
        assert tier is not None
        real_load = tier.load

        def from_l2(rid: str) -> Outcome:
            c.clear(True)  # L1 misses: the lookup prefetches from L2
            return sched.lookup(t, rid)

        o = from_l2("ok")
        assert (o.conclusion, o.value) == (Conclusion.HIT, 3), o
        sched.end_session("ok")

        def broken_load(*a, **kw):
            raise RuntimeError("adapter bug")

        monkeypatch.setattr(tier, "load", broken_load)
        o = from_l2("load-fails")
        assert (o.conclusion, o.value) == (Conclusion.HIT, 0), o
        sched.end_session("load-fails")
        monkeypatch.setattr(tier, "load", real_load)

        monkeypatch.setattr(tier, "submit", lambda job: False)  # the L2 tier's pool is busy
        o = from_l2("busy")  # the job is dropped: the lookup answers its L1 hit
        assert (o.conclusion, o.value) == (Conclusion.HIT, 0), o
        sched.end_session("busy")
        monkeypatch.undo()

        def overcounting_load(*a, **kw):
            n, leases = real_load(*a, **kw)
            return n + 5, leases

        monkeypatch.setattr(tier, "load", overcounting_load)
        o = from_l2("over")
        assert (o.conclusion, o.value) == (Conclusion.HIT, 3), o
        sched.end_session("over")

        # A second lookup of the request fails while the first one's prefetch still loads: the
        # prefetch no longer installs (superseded), and the failed lookup answers 0, not nil.
        def slow_load(*a, **kw):
            time.sleep(0.5)
            return real_load(*a, **kw)

        monkeypatch.setattr(tier, "load", slow_load)
        c.clear(True)
        end = 3 * C
        assert sched.conn.request(
            "lookup", make_key(t, "again", model_name="test-model", end=end), 1
        ).resolved
        bad = make_key(t, "again", model_name="test-model", end=end, cache_salt="a/b")  # invalid salt
        assert sched.conn.request("lookup", bad, 1).resolved  # acked (nil + our error frame)
        for _ in range(2000):
            q = sched.conn.request("query_prefetch_status", "again")
            if q.value is not None:
                break
            time.sleep(0.01)
        assert q.value == 0
        sched.end_session("again")
        w.close()
    sched.close()
