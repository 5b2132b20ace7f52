"""The L1 index through Python: states, TTLs, eviction policies, quotas, stats, threads."""

from __future__ import annotations

import threading

import pytest

import lmcache_rs as lm

OBJ = 4096


def scope(salt: str = "") -> lm.KeyScope:
    return lm.KeyScope("model", lm.mp_kv_rank(1, 0), 0, salt)


def hashes(n: int, base: int = 0) -> list[bytes]:
    return [(base + i).to_bytes(4, "big") + bytes(28) for i in range(n)]


def store(idx: lm.L1Index, s: lm.KeyScope, hs: list[bytes], writer: int = 1) -> list[str]:
    res = idx.reserve_write(s, hs, OBJ, writer)
    staged = [h for h, r in zip(hs, res, strict=True) if r.status == "reserved"]
    idx.finish_write(s, staged, writer)
    idx.check_invariants()
    return [r.status for r in res]


def test_write_read_lifecycle() -> None:
    clock = lm.ManualClock()
    idx = lm.L1Index(8 * OBJ, clock=clock)
    s, hs = scope(), hashes(3)
    res = idx.reserve_write(s, hs, 1000, writer=7)
    assert [r.status for r in res] == ["reserved"] * 3
    assert [r.size for r in res] == [OBJ] * 3
    assert len({r.offset for r in res}) == 3
    assert 'Reservation(status="reserved"' in repr(res[0])
    assert idx.peek(s, hs) == 0, "staging objects are invisible"
    assert idx.reserve_write(s, hs[:1], 1000, writer=7)[0].status == "in_flight"
    assert idx.finish_write(s, hs, writer=7).statuses == ["admitted"] * 3
    assert idx.finish_write(s, hs, writer=7).statuses == ["not_staged"] * 3
    grant = idx.lease_read(s, hs + hashes(1, 99), shares=2)
    assert (grant.hit, grant.offsets, grant.sizes) == (3, [r.offset for r in res], [OBJ] * 3)
    slot = idx.resolve(s, hs[:1])[0]
    assert slot is not None
    assert (slot.offset, slot.size, slot.read_locks, slot.temporary) == (res[0].offset, OBJ, 2, False)
    assert idx.resolve(s, hashes(1, 99)) == [None]
    assert idx.release(grant.lease, n=1) == 3
    assert idx.stats()["read_locked_objects"] == 3
    assert idx.release(grant.lease, 0, 3, 1) == 3
    assert idx.stats()["read_locked_objects"] == 0
    assert idx.release(grant.lease) == 0, "an ended lease gives back nothing"
    with pytest.raises(lm.LmcacheCoreError, match="num_kv_readers"):
        idx.lease_read(s, hs, shares=0)
    idx.check_invariants()


def test_ttls_use_the_injected_clock() -> None:
    clock = lm.ManualClock()
    idx = lm.L1Index(8 * OBJ, clock=clock, write_ttl_secs=10, read_ttl_secs=5)
    s = scope()
    idx.reserve_write(s, hashes(1), OBJ, writer=1)
    store(idx, s, hashes(1, 50))
    idx.lease_read(s, hashes(1, 50))
    clock.advance(11)
    report = idx.evict_cycle()
    assert report["expired_staging"] == 1
    assert report["expired_read_locks"] == 1
    assert idx.finish_write(s, hashes(1), writer=1).statuses == ["not_staged"]
    assert idx.delete(s, hashes(1, 50)) == 1
    assert idx.stats()["used_bytes"] == 0


def test_lru_demand_eviction_keeps_prefixes() -> None:
    idx = lm.L1Index(5 * OBJ)
    s = scope()
    store(idx, s, hashes(3, 0))  # request A
    store(idx, s, hashes(2, 10))  # request B
    for i in range(3):
        assert store(idx, s, hashes(1, 100 + i)) == ["reserved"]
    # A's chunks went last-first; its first chunk was the last to go, B is intact.
    assert idx.peek(s, hashes(3, 0)) == 0
    assert idx.peek(s, hashes(2, 10)) == 2
    assert idx.stats()["counters"]["evicted_demand_objects"] == 3


def test_full_of_locked_objects_fails_fast() -> None:
    idx = lm.L1Index(2 * OBJ)
    s = scope()
    store(idx, s, hashes(2))
    idx.lease_read(s, hashes(2))
    assert store(idx, s, hashes(1, 9)) == ["oom"]
    assert idx.stats()["counters"]["allocation_failures"] == 1
    res = idx.reserve_write(s, hashes(3, 20), OBJ, 1, all_or_nothing=True)
    assert [(r.status, r.offset, r.size) for r in res] == [("oom", 0, 0)] * 3


def test_isolated_lru_quotas() -> None:
    idx = lm.L1Index(100 * OBJ, policy="IsolatedLRU")
    assert idx.policy == "IsolatedLRU"
    idx.set_quota("alice", 2 * OBJ)
    idx.set_quota("", 50 * OBJ)
    store(idx, scope("alice"), hashes(5))
    store(idx, scope("mallory"), hashes(3))
    store(idx, scope(""), hashes(3))
    assert idx.salt_usage("alice") == 5 * OBJ
    report = idx.evict_cycle()
    assert report["quota_evicted_objects"] == 3 + 3
    assert idx.salt_usage("alice") == 2 * OBJ
    assert idx.peek(scope("alice"), hashes(5)) == 2
    assert idx.salt_usage("mallory") == 0
    assert idx.salt_usage("") == 3 * OBJ
    quotas = idx.list_quotas()
    assert [(q.cache_salt, q.limit_bytes, q.usage_bytes) for q in quotas] == [
        ("", 50 * OBJ, 3 * OBJ),
        ("alice", 2 * OBJ, 2 * OBJ),
    ]
    assert repr(quotas[1]) == f'Quota(cache_salt="alice", limit_bytes={2 * OBJ}, usage_bytes={2 * OBJ})'
    assert idx.get_quota("alice") == 2 * OBJ
    assert idx.remove_quota("alice") is True
    assert idx.remove_quota("alice") is False
    assert idx.get_quota("alice") is None
    idx.evict_cycle()
    assert idx.salt_usage("alice") == 0
    with pytest.raises(lm.InvalidKeyError):
        idx.set_quota("a/b", 1)
    idx.check_invariants()


def test_isolated_lru_writes_do_not_evict_other_tenants() -> None:
    idx = lm.L1Index(6 * OBJ, policy="IsolatedLRU")
    idx.set_quota("a", 3 * OBJ)
    idx.set_quota("b", 3 * OBJ)
    store(idx, scope("b"), hashes(3))
    store(idx, scope("a"), hashes(3, 10))
    for i in range(6):
        assert store(idx, scope("a"), hashes(1, 100 + i)) == ["reserved"]
        assert idx.peek(scope("b"), hashes(3)) == 3


def test_clear_and_stats() -> None:
    idx = lm.L1Index(16 * OBJ)
    s = scope("t")
    store(idx, s, hashes(4))
    grant = idx.lease_read(s, hashes(1))
    assert idx.clear() == {"objects": 3, "bytes": 3 * OBJ, "pending_objects": 0, "pending_bytes": 0}
    stats = idx.stats()
    assert stats["resident_objects"] == 1
    assert stats["salts"][0]["cache_salt"] == "t"
    assert stats["salts"][0]["bytes"] == OBJ
    # Forced: the leased object leaves the index, its bytes wait for the lease to end.
    assert idx.clear(force=True) == {"objects": 1, "bytes": OBJ, "pending_objects": 1, "pending_bytes": OBJ}
    stats = idx.stats()
    assert (stats["used_bytes"], stats["total_objects"]) == (OBJ, 0)
    assert (stats["pending_release_objects"], stats["pending_release_bytes"]) == (1, OBJ)
    assert idx.peek(s, hashes(1)) == 0
    assert idx.release(grant.lease) == 1
    stats = idx.stats()
    assert (stats["used_bytes"], stats["pending_release_objects"], stats["salts"]) == (0, 0, [])
    assert stats["counters"]["cleared_objects"] == 4


def test_bad_arguments() -> None:
    with pytest.raises(lm.LmcacheCoreError, match="power of two"):
        lm.L1Index(1 << 20, align_bytes=1000)
    with pytest.raises(lm.LmcacheCoreError, match="eviction policy"):
        lm.L1Index(1 << 20, policy="ARC")
    with pytest.raises(lm.LmcacheCoreError, match="trigger_watermark"):
        lm.L1Index(1 << 20, trigger_watermark=1.5)
    idx = lm.L1Index(1 << 20)
    with pytest.raises(lm.InvalidKeyError, match="chunk_hash"):
        idx.lease_read(scope(), [b""])
    with pytest.raises(lm.LmcacheCoreError, match="size must be > 0"):
        idx.reserve_write(scope(), hashes(1), 0, 1)
    assert idx.object_footprint(1) == 4096


def test_threads_hammering_while_one_evicts() -> None:
    idx = lm.L1Index(64 * OBJ, policy="IsolatedLRU")
    for t in range(3):
        idx.set_quota(f"t{t}", 20 * OBJ)
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker(t: int) -> None:
        try:
            s = scope(f"t{t % 4}")
            for r in range(600):
                base = (r * 7 + t) % 40
                hs = hashes(4, base)
                res = idx.reserve_write(s, hs, OBJ, t)
                staged = [h for h, x in zip(hs, res, strict=True) if x.status == "reserved"]
                if r % 5 == 0:
                    idx.abort_write(s, staged, t)
                else:
                    idx.finish_write(s, staged, t)
                grant = idx.lease_read(s, hs, 2)
                idx.release(grant.lease, 0, grant.hit, 1)
                idx.release(grant.lease)
        except BaseException as e:
            errors.append(e)

    def evictor() -> None:
        while not stop.is_set():
            idx.evict_cycle()
            idx.check_invariants()

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    ev = threading.Thread(target=evictor)
    ev.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert not w.is_alive(), "worker deadlocked"
    stop.set()
    ev.join(timeout=30)
    assert not ev.is_alive(), "evictor deadlocked"
    assert errors == []
    idx.check_invariants()
    stats = idx.stats()
    assert stats["read_locked_objects"] == 0
    assert stats["staging_objects"] == 0
    assert sum(s["bytes"] for s in stats["salts"]) == stats["used_bytes"]
    idx.evict_cycle()
    assert idx.salt_usage("t3") == 0  # no quota: wiped


def test_list_objects_pages_in_key_order() -> None:
    idx = lm.L1Index(8 * OBJ)
    s, hs = scope("tenant"), hashes(3)
    store(idx, s, hs)
    idx.lease_read(s, hs[:1])
    page = idx.list_objects(limit=2)
    assert [(o.chunk_hash, o.model_name, o.kv_rank, o.object_group, o.cache_salt) for o in page] == [
        (h, "model", s.kv_rank, 0, "tenant") for h in hs[:2]
    ]
    assert [(o.size, o.locked) for o in page] == [(OBJ, True), (OBJ, False)]
    last = page[-1]
    after = (last.chunk_hash, last.model_name, last.kv_rank, last.object_group, last.cache_salt)
    assert [o.chunk_hash for o in idx.list_objects(after, limit=2)] == hs[2:]
    assert idx.list_objects(model_name="other") == []
