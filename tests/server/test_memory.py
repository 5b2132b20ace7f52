"""L1 full: demand eviction, locked objects, quotas, lock release paths."""

from __future__ import annotations

import time

import pytest
from kvsim import MODEL, Worker, lookup, tokens

from lmcache_rs.client import ServerError
from lmcache_rs.client.client import make_key

C = 256
BPC = 16
CHUNK_BYTES = 2 * 2 * C * 2 * 32 * 2  # kv, layers, tokens, heads*dim, fp16 = 128 KiB
SMALL_L1 = str(8 * CHUNK_BYTES / (1 << 30))  # exactly 8 chunks


def blocks(first: int, chunks: int) -> list[int]:
    return list(range(first, first + chunks * BPC))


def wait_for(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_full_l1_evicts_on_demand_and_stores_succeed(server_factory) -> None:
    server = server_factory("--l1-size-gb", SMALL_L1)
    with server.client() as c:
        w = Worker(c)
        prompts = [tokens(4 * C, seed=s) for s in range(3)]
        for p in prompts:
            assert w.store(p, blocks(1, 4))
        # The oldest prompt lost its last chunks first; the newest two are whole.
        assert lookup(c, prompts[2], "a") == 4
        assert lookup(c, prompts[1], "b") == 4
        assert lookup(c, prompts[0], "c") == 0
        for r in "abc":
            c.end_session(r)
        w.close()


def test_locked_objects_are_never_evicted_and_locks_release(server_factory) -> None:
    server = server_factory("--l1-size-gb", SMALL_L1)
    with server.client() as c:
        w = Worker(c)
        full = tokens(8 * C, seed=20)
        assert w.store(full, blocks(1, 8))
        key = make_key(full, "locker", model_name=MODEL, num_kv_readers=2)
        assert c.lookup(key) == 8
        other = tokens(C, seed=21)
        with pytest.raises(ServerError) as e:
            w.store(other, blocks(200, 1))
        assert e.value.code == "not_stored"
        assert e.value.fallback == [b"stub_ipc_handle", False]
        # Two readers: one retrieve releases one share, the locks hold.
        assert w.retrieve(full, blocks(100, 1), "locker", end=C)
        with pytest.raises(ServerError):
            w.store(other, blocks(200, 1))
        # The second reader's retrieve of chunk 0 unlocks it; a store can now evict it.
        assert w.retrieve(full, blocks(100, 1), "locker", end=C)
        assert w.store(other, blocks(200, 1))
        # free_lookup_locks releases the rest of the prefix.
        c.free_lookup_locks(make_key(full, "locker", model_name=MODEL, start=C))
        assert w.store(tokens(7 * C, seed=22), blocks(1, 7))
        c.end_session("locker")
        w.close()


def test_end_session_releases_lookup_locks(server_factory) -> None:
    server = server_factory("--l1-size-gb", SMALL_L1)
    with server.client() as c:
        w = Worker(c)
        full = tokens(8 * C, seed=30)
        assert w.store(full, blocks(1, 8))
        assert lookup(c, full, "s") == 8
        with pytest.raises(ServerError):
            w.store(tokens(C, seed=31), blocks(200, 1))
        c.end_session("s")
        assert w.store(tokens(C, seed=31), blocks(200, 1))
        w.close()


def test_isolated_lru_quota_evicts_the_right_salt(server_factory) -> None:
    quota = 2 * CHUNK_BYTES / (1 << 30)
    server = server_factory(
        "--eviction-policy", "IsolatedLRU", "--quota", f"alice={quota}", "--quota", f"bob={4 * quota}"
    )
    with server.client() as c:
        w = Worker(c)
        t = tokens(4 * C, seed=40)
        assert w.store(t, blocks(1, 4), salt="alice")
        assert w.store(t, blocks(1, 4), salt="bob")
        assert w.store(t, blocks(1, 4), salt="mallory")  # no quota: allowlist says limit 0

        def hit(salt: str) -> int:
            # A lookup read-locks what it finds; end the session so the cycle may evict it.
            n = lookup(c, t, "probe", salt=salt)
            c.end_session("probe")
            return n

        def trimmed() -> bool:
            return hit("mallory") == 0 and hit("alice") == 2

        wait_for(trimmed, "the eviction cycle to apply quotas")
        assert hit("bob") == 4
        w.close()
