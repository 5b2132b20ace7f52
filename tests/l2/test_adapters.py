"""L2 adapters in-process: object format, integrity, recovery, accounting and eviction, against
a real directory and a real redis-server."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import redis as redis_py

from lmcache_rs.config import L2Eviction
from lmcache_rs.storage.l2.base import IntegrityError, L2Adapter, L2Key, L2Unavailable
from lmcache_rs.storage.l2.fs import FsAdapter
from lmcache_rs.storage.l2.redis import RedisAdapter

SIZE = 4096


def key(i: int, salt: str = "", model: str = "org/model-7b") -> L2Key:
    return L2Key(model, 1 << 24, 0, salt, i.to_bytes(4, "little") * 8)


def payload(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, SIZE, dtype=np.uint8)


def read(a: L2Adapter, k: L2Key, size: int = SIZE) -> np.ndarray | None:
    out = np.zeros(size, dtype=np.uint8)
    return out if a.get_into(k, memoryview(out)) else None


def make_fs(tmp_path: Path, policy: str = "LRU", capacity: int = 0, **ev: float) -> FsAdapter:
    return FsAdapter("fs", str(tmp_path / "l2"), capacity, L2Eviction(eviction_policy=policy, **ev), "LRU")


def make_redis(
    url: str, policy: str = "LRU", capacity: int = 0, ttl: float = 0.0, prefix: str = "t:"
) -> RedisAdapter:
    return RedisAdapter("redis", url, prefix, ttl, capacity, L2Eviction(eviction_policy=policy), "LRU")


@pytest.fixture(params=["fs", "redis"])
def adapter(request, tmp_path):
    if request.param == "fs":
        a = make_fs(tmp_path)
    else:
        a = make_redis(request.getfixturevalue("redis_server").url)
    yield a
    a.close()


def test_roundtrip_lengths_and_delete(adapter: L2Adapter) -> None:
    data = payload(1)
    assert adapter.put(key(1), memoryview(data))
    assert not adapter.put(key(1), memoryview(data)), "a second put of the same key stores nothing"
    assert adapter.lengths([key(1), key(2)]) == [SIZE, None]
    got = read(adapter, key(1))
    assert got is not None
    assert np.array_equal(got, data)
    assert read(adapter, key(2)) is None
    # Same hash, other salt / model / rank: other objects.
    assert adapter.lengths([key(1, salt="b"), key(1, model="other")]) == [None, None]
    usage = adapter.usage()
    assert usage[""].objects == 1
    assert usage[""].bytes > SIZE
    assert adapter.delete([key(1)]) == 1
    assert adapter.lengths([key(1)]) == [None]
    assert adapter.usage() == {}


def test_clear_deletes_every_object_of_every_salt(adapter: L2Adapter) -> None:
    n = 1500  # more than one batch of the clear
    for i in range(n):
        assert adapter.put(key(i, salt=("a", "b", "")[i % 3]), memoryview(payload(i % 7)))
    used = sum(u.bytes for u in adapter.usage().values())
    assert adapter.clear() == (n, used)
    assert adapter.usage() == {}
    assert adapter.lengths([key(0, salt="a"), key(1, salt="b"), key(2)]) == [None, None, None]
    assert adapter.clear() == (0, 0)


def test_object_ids_page_in_id_order_and_read_keys_round_trip(adapter: L2Adapter) -> None:
    stored = {key(i, salt=("a", "")[i % 2]) for i in range(7)}
    for k in stored:
        assert adapter.put(k, memoryview(payload(1)))
    seen, after = [], ""
    while page := adapter.object_ids(after, 3):
        assert len(page) <= 3
        seen += page
        after = page[-1][1]
    ids = [oid for _, oid, _ in seen]
    assert ids == sorted(ids)
    assert len(ids) == 7
    assert {size for _, _, size in seen} == {SIZE}
    got = adapter.read_keys([*ids, "0" * 64])
    assert got[-1] is None  # gone: no key
    assert set(got[:-1]) == stored
    assert all(k is not None and k.object_id == oid for k, oid in zip(got, ids, strict=False))


def test_wrong_size_request_is_an_integrity_error(adapter: L2Adapter) -> None:
    adapter.put(key(3), memoryview(payload(3)))
    with pytest.raises(IntegrityError):
        read(adapter, key(3), SIZE - 1)
    assert adapter.lengths([key(3)]) == [None], "a bad object is deleted"
    assert adapter.corrupt == 1


def _corrupt_fs(a: FsAdapter, k: L2Key, how: str) -> None:
    path = a._path(k.object_id)
    blob = bytearray(path.read_bytes())
    if how == "flip":
        blob[-100] ^= 0xFF
    elif how == "truncate":
        blob = blob[:-1]
    elif how == "key":
        other = a._path(key(99).object_id)
        blob = bytearray(other.read_bytes())
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("how", ["flip", "truncate", "key"])
def test_fs_corrupt_object_is_never_served(tmp_path: Path, how: str) -> None:
    a = make_fs(tmp_path)
    a.put(key(1), memoryview(payload(1)))
    a.put(key(99), memoryview(payload(99)))
    _corrupt_fs(a, key(1), how)
    with pytest.raises(IntegrityError):
        read(a, key(1))
    assert not a._path(key(1).object_id).exists()
    assert a.lengths([key(1)]) == [None]
    got = read(a, key(99))
    assert got is not None
    assert np.array_equal(got, payload(99))


def test_redis_corrupt_object_is_never_served(redis_server) -> None:
    a = make_redis(redis_server.url)
    a.put(key(1), memoryview(payload(1)))
    raw = redis_py.Redis.from_url(redis_server.url)
    okey = a._okey(key(1).object_id)
    blob = bytearray(raw.get(okey))
    blob[-1] ^= 0x01
    raw.set(okey, bytes(blob))
    with pytest.raises(IntegrityError):
        read(a, key(1))
    assert raw.get(okey) is None
    assert a.usage() == {}, "the deleted object's bytes leave the accounting"
    raw.close()


def test_fs_restart_recovers_objects_and_drops_debris(tmp_path: Path) -> None:
    a = make_fs(tmp_path)
    for i in range(5):
        a.put(key(i, salt="s1" if i % 2 else ""), memoryview(payload(i)))
    usage = a.usage()
    # Debris: an interrupted write, a truncated object, a foreign file.
    (a.tmp / "half-written").write_bytes(b"x" * 10)
    trunc = a._path(key(4).object_id)
    trunc.write_bytes(trunc.read_bytes()[:-10])
    (a.base / "ab").mkdir(exist_ok=True)
    (a.base / "ab" / "junk.kv").write_bytes(b"not an object")
    b = make_fs(tmp_path)
    assert b.recovered_objects == 4
    assert b.dropped_files == 3
    assert not list(b.tmp.iterdir())
    for i in range(4):
        got = read(b, key(i, salt="s1" if i % 2 else ""))
        assert got is not None
        assert np.array_equal(got, payload(i))
    assert read(b, key(4)) is None
    assert b.usage()["s1"] == usage["s1"]


def test_isolated_lru_trims_each_salt_to_its_quota(adapter: L2Adapter) -> None:
    adapter.policy = "IsolatedLRU"
    for i in range(6):
        adapter.put(key(i, salt="alice"), memoryview(payload(i)))
        adapter.put(key(100 + i, salt="bob"), memoryview(payload(i)))
    per_object = adapter.usage()["alice"].bytes // 6
    quotas = {"alice": 4 * per_object, "bob": None}  # bob has no quota: allowlist, limit 0
    # Reading object 0 makes it the most recently used: objects 1 and 2 go first.
    assert read(adapter, key(0, salt="alice")) is not None
    r = adapter.evict_cycle(quotas.get)
    assert r.quota_objects == 2 + 6
    usage = adapter.usage()
    assert usage["alice"].objects == 4
    assert "bob" not in usage
    present = [n is not None for n in adapter.lengths([key(i, salt="alice") for i in range(6)])]
    assert present == [True, False, False, True, True, True]


def test_capacity_watermark_evicts_least_recently_used(adapter: L2Adapter) -> None:
    for i in range(10):
        adapter.put(key(i), memoryview(payload(i)))
    used = adapter.usage()[""].bytes
    adapter.capacity_bytes = used  # 100 % full: above the 0.8 watermark
    assert read(adapter, key(0)) is not None
    r = adapter.evict_cycle(lambda s: None)
    assert r.watermark_objects == 2  # 20 % of the bytes, oldest first
    present = [n is not None for n in adapter.lengths([key(i) for i in range(10)])]
    assert present == [True, False, False, *([True] * 7)]
    # make_room: the next put fits without exceeding the capacity.
    adapter.capacity_bytes = adapter.usage()[""].bytes
    adapter.make_room(used // 10)
    assert adapter.usage()[""].bytes + used // 10 <= adapter.capacity_bytes


def test_two_redis_servers_share_one_pool_and_count_once(redis_server) -> None:
    a = make_redis(redis_server.url)
    b = make_redis(redis_server.url)
    assert a.put(key(1), memoryview(payload(1)))
    assert not b.put(key(1), memoryview(payload(1))), "B sees A's object"
    got = read(b, key(1))
    assert got is not None
    assert np.array_equal(got, payload(1))
    assert a.usage() == b.usage()
    assert a.usage()[""].objects == 1
    b.delete([key(1)])
    assert a.lengths([key(1)]) == [None]
    assert a.usage() == {}
    # Other prefixes are other pools.
    c = make_redis(redis_server.url, prefix="other:")
    assert c.lengths([key(1)]) == [None]


def test_redis_ttl_expiry_leaves_the_accounting(redis_server) -> None:
    a = make_redis(redis_server.url, ttl=1.0)
    a.put(key(1), memoryview(payload(1)))
    raw = redis_py.Redis.from_url(redis_server.url)
    assert 0 < raw.pttl(a._okey(key(1).object_id)) <= 1000
    raw.delete(a._okey(key(1).object_id))  # what the TTL does, without waiting for it
    a.ttl_ms = 1  # every ledger entry is now older than the TTL
    assert a.expire_stale() == 1
    assert a.usage() == {}
    raw.close()


def test_redis_down_raises_unavailable(redis_server) -> None:
    a = make_redis(redis_server.url)
    a.put(key(1), memoryview(payload(1)))
    redis_server.kill()
    for call in (lambda: a.put(key(2), memoryview(payload(2))), lambda: a.lengths([key(1)]), a.usage):
        with pytest.raises(L2Unavailable):
            call()
    assert os.path.isdir(redis_server.workdir)


def test_redis_cluster_pool(redis_cluster: str) -> None:
    """`cluster: true`: objects spread over the nodes, the accounting scripts run in one slot."""
    a = RedisAdapter(
        "c", redis_cluster, "lmrs:", 0, 0, L2Eviction(eviction_policy="IsolatedLRU"), "LRU", cluster=True
    )
    b = RedisAdapter(
        "c2", redis_cluster, "lmrs:", 0, 0, L2Eviction(eviction_policy="IsolatedLRU"), "LRU", cluster=True
    )
    for i in range(12):
        assert a.put(key(i, salt="alice"), memoryview(payload(i)))
    assert not b.put(key(0, salt="alice"), memoryview(payload(0)))
    got = read(b, key(3, salt="alice"))
    assert got is not None
    assert np.array_equal(got, payload(3))
    per_object = a.usage()["alice"].bytes // 12
    assert a.usage()["alice"].objects == 12
    nodes = a.r.get_nodes()
    assert sum(redis_py.Redis(host=n.host, port=n.port).dbsize() > 0 for n in nodes) >= 2
    r = a.evict_cycle({"alice": 4 * per_object}.get)
    assert r.quota_objects == 8
    assert b.usage()["alice"].objects == 4
    assert read(a, key(3, salt="alice")) is not None, "read just now: kept"
    a.close()
    b.close()
