"""Engine-driven transfer (spec D.3): a real server process and workers in this process that copy
KV into and out of the server's shared-memory L1 pool themselves."""

from __future__ import annotations

import fcntl
import os
import pickle
import stat

import pytest
import torch
from conftest import free_port, start_server
from kvsim import Worker, lookup, tokens

from lmcache_rs.client import ServerError
from lmcache_rs.client.client import make_key
from lmcache_rs.client.engine_driven import EngineDrivenWorker
from lmcache_rs.client.shm_kv import paged_shape, select_blocks
from lmcache_rs.protocol.messages import EngineDrivenRegistration
from lmcache_rs.storage.shm_pool import POOL_PREFIX, SHM_DIR, auto_name

C = 256
BS = 16
BPC = C // BS
MODEL = "test-model"  # kvsim.Worker's model: same geometry below, so both kinds share objects


def blocks(first: int, chunks: int) -> list[int]:
    return list(range(first, first + chunks * BPC))


def kv_layers(
    layout: str = "NHD", dtype: torch.dtype = torch.float16, seed: int = 0, num_blocks: int = 256
) -> list[torch.Tensor]:
    """A worker's paged KV cache (kvsim.Worker's default geometry: 2 layers, 2 heads x 32)."""
    g = torch.Generator().manual_seed(seed)
    shape = paged_shape(layout, num_blocks, BS, 2, 32) if layout != "MLA" else (num_blocks, BS, 64)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(2)]


def ed_worker(
    c, seed: int = 0, layout: str = "NHD", dtype: torch.dtype = torch.float16, **kw
) -> EngineDrivenWorker:
    w = EngineDrivenWorker(
        c, kv_layers(layout, dtype, seed), instance_id=10_000 + seed, model_name=MODEL, layout=layout, **kw
    )
    w.register()
    return w


def key(t: list[int], rid: str, start: int = 0, end: int | None = None, worker_id: int | None = 0):
    return make_key(t, rid, model_name=MODEL, worker_id=worker_id, start=start, end=end)


def pool_path(port: int, name: str | None = None) -> str:
    """The L1 pool of the server on `port` (`name`: its --shm-name, default auto)."""
    return os.path.join(SHM_DIR, POOL_PREFIX + (name or auto_name(port)))


@pytest.mark.parametrize(
    ("layout", "dtype"), [("NHD", torch.float16), ("HND", torch.bfloat16), ("MLA", torch.float32)]
)
def test_engine_driven_roundtrip_is_byte_exact(server, layout: str, dtype: torch.dtype) -> None:
    with server.client() as c, server.client() as c2:
        a = ed_worker(c, seed=1, layout=layout, dtype=dtype)
        b = ed_worker(c2, seed=2, layout=layout, dtype=dtype)  # another worker process's cache
        t = tokens(3 * C + 40, seed=11)
        assert a.store(key(t, "s"), blocks(1, 3))
        assert lookup(c, t, "r") == 3
        assert b.retrieve(key(t, "r", end=3 * C), blocks(100, 3))
        for x, y in zip(
            select_blocks(a.layers, layout, blocks(1, 3)),
            select_blocks(b.layers, layout, blocks(100, 3)),
            strict=True,
        ):
            assert torch.equal(x, y)
        # The locks of lookup and prepare_retrieve are all gone after the commit.
        st = server_status(server)
        assert st["read_locked_objects"] == 0
        assert st["staging_objects"] == 0


def server_status(server) -> dict:
    import httpx  # noqa: PLC0415

    l1 = httpx.get(f"{server.http}/status", timeout=10).json()["storage_manager"]["l1_manager"]
    return {"read_locked_objects": l1["read_locked_count"], "staging_objects": l1["staging_object_count"]}


def test_registration_reply_names_a_private_committed_pool(server_factory) -> None:
    port = free_port()
    s = server_factory(port=port)
    with s.client() as c:
        w = EngineDrivenWorker(c, kv_layers(), instance_id=7, model_name=MODEL)
        name = w.register()
        assert name == POOL_PREFIX + auto_name(port)
        st = os.stat(pool_path(port))
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size == w.pool.mm.size() == int(0.0625 * (1 << 30))
        assert st.st_blocks * 512 >= st.st_size  # every page committed (posix_fallocate)
        # Re-registering (a heartbeat recovery) answers the same pool.
        assert w.register() == name
    assert s.stop() == 0
    assert not os.path.exists(pool_path(port))  # unlinked on exit


def test_partial_prepare_and_skip(server) -> None:
    with server.client() as c:
        w = ed_worker(c, seed=3)
        t = tokens(4 * C, seed=12)
        assert w.store(key(t, "a", end=2 * C), blocks(1, 2))
        # Storing [0, 4C) now asks only for chunks 2 and 3.
        ctx = c.prepare_store(key(t, "b"), w.instance_id)
        assert ctx.chunk_indices == [2, 3]
        assert len(ctx.slots) == 2
        assert ctx.slots[0].shape == [2, 2, C, 64]
        assert ctx.slots[0].dtype == "float16"
        assert ctx.slots[0].length == 2 * 2 * C * 64 * 2
        assert c.commit_store(key(t, "b"), w.instance_id)  # nothing written: the slots hold zeros or junk
        # Everything cached: no slots, and the worker skips its commit.
        assert c.prepare_store(key(t, "c"), w.instance_id).slots == []
        assert lookup(c, t, "r") == 4
        # skip_first_n_tokens: the first positions of the destination stay as they were.
        dst = blocks(100, 2)
        for layer in w.layers:
            layer[:, dst] = 7.0
        skip = 2 * BS + 5
        assert w.retrieve(key(t, "r", end=2 * C), dst, skip_first_n_tokens=skip)
        for src_l, dst_l in zip(
            select_blocks(w.layers, "NHD", blocks(1, 2)), select_blocks(w.layers, "NHD", dst), strict=True
        ):
            flat_src = src_l.reshape(2, -1, *src_l.shape[3:])
            flat_dst = dst_l.reshape(2, -1, *dst_l.shape[3:])
            assert torch.all(flat_dst[:, :skip] == 7.0)
            assert torch.equal(flat_dst[:, skip:], flat_src[:, skip:])


def test_an_abandoned_prepare_is_never_admitted_by_a_later_commit(server) -> None:
    """A prepare_store whose worker never wrote or committed it (it failed between the two) is
    dropped by the next prepare of the same range: the commit that follows admits what the
    worker wrote for that next prepare, never the abandoned slots."""
    with server.client() as c:
        w = ed_worker(c, seed=5)
        t = tokens(2 * C, seed=21)
        first = c.prepare_store(key(t, "a"), w.instance_id)
        assert len(first.slots) == 2  # abandoned: nothing written, no commit
        second = c.prepare_store(key(t, "a"), w.instance_id)
        assert second.chunk_indices == [0, 1], "the range is written afresh, not 'in flight'"
        w.write_slots(second.slots, second.chunk_indices, blocks(1, 2))
        assert c.commit_store(key(t, "a"), w.instance_id)
        with pytest.raises(ServerError, match="not_prepared"):
            c.commit_store(key(t, "a"), w.instance_id)
        dst = blocks(200, 2)
        assert w.retrieve(key(t, "r"), dst)
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                select_blocks(w.layers, "NHD", blocks(1, 2)), select_blocks(w.layers, "NHD", dst), strict=True
            )
        )


def test_both_transfer_modes_share_objects(server) -> None:
    """An engine-driven worker's chunks serve an lmcache-driven worker and back: same bytes."""
    with server.client() as c:
        ed = ed_worker(c, seed=4)
        lm = Worker(c, seed=5)
        t1, t2 = tokens(2 * C, seed=13), tokens(2 * C, seed=14)
        assert ed.store(key(t1, "s1"), blocks(1, 2))
        assert lookup(c, t1, "r1") == 2
        assert lm.retrieve(t1, blocks(100, 2), "r1")
        for x, y in zip(
            select_blocks(ed.layers, "NHD", blocks(1, 2)), lm.kv.blocks_view(blocks(100, 2)), strict=True
        ):
            assert torch.equal(x, y)
        assert lm.store(t2, blocks(1, 2), "s2")
        assert lookup(c, t2, "r2") == 2
        assert ed.retrieve(key(t2, "r2"), blocks(100, 2))
        for x, y in zip(
            lm.kv.blocks_view(blocks(1, 2)), select_blocks(ed.layers, "NHD", blocks(100, 2)), strict=True
        ):
            assert torch.equal(x, y)
        lm.close()


class _Canary:
    """Unpickling this runs code: it would create `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_kv_is_refused_and_never_unpickled(server, tmp_path) -> None:
    canary = str(tmp_path / "unpickled")
    with server.client() as c:
        w = ed_worker(c, seed=6)
        t = tokens(2 * C, seed=15)
        k = key(t, "p")
        assert len(c.prepare_store(k, w.instance_id).slots) == 2
        with pytest.raises(ServerError) as e:
            c.commit_store(k, w.instance_id, pickle.dumps([_Canary(canary)]))
        assert e.value.code == "pickle_refused"
        assert e.value.fallback is False
        assert "never unpickles" in e.value.message
        assert not os.path.exists(canary)
        import httpx  # noqa: PLC0415

        metrics = httpx.get(f"{server.http}/metrics", timeout=10).text
        assert 'lmcache_rs_pickle_refused_requests_total{op="commit_store"} 1.0' in metrics
        # The refused store left nothing behind: no staging, no hit, and the range can be stored.
        assert server_status(server)["staging_objects"] == 0
        assert lookup(c, t, "r") == 0
        assert w.store(key(t, "p2"), blocks(1, 2))
        assert lookup(c, t, "r2") == 2


def test_bad_engine_driven_requests_get_clear_errors(server) -> None:
    with server.client() as c:
        t = tokens(C, seed=16)
        with pytest.raises(ServerError) as e:
            c.prepare_store(key(t, "x"), 424242)
        assert e.value.code == "unknown_instance"
        # No slots list: LMCache's client gathers privately and commits, answered false (J.7).
        assert e.value.fallback == {"context": {}}
        w = ed_worker(c, seed=7)
        with pytest.raises(ServerError) as e:
            c.commit_store(key(t, "x"), w.instance_id)
        assert e.value.code == "not_prepared"
        assert c.commit_retrieve(key(t, "x"), w.instance_id) is False  # nothing to release
        with pytest.raises(ServerError) as e:
            c.prepare_retrieve(key(t, "x"), w.instance_id)
        assert e.value.code == "not_found"
        assert e.value.fallback["success"] is False
        # An lmcache-driven worker cannot prepare, an engine-driven one cannot store directly.
        lm = Worker(c, seed=8)
        with pytest.raises(ServerError) as e:
            c.prepare_store(key(t, "y"), lm.instance_id)
        assert e.value.code == "wrong_transfer_mode"
        with pytest.raises(ServerError) as e:
            c.store(key(t, "y"), w.instance_id, [blocks(1, 1)])
        assert e.value.code == "wrong_transfer_mode"
        lm.close()
        bad = EngineDrivenRegistration(
            instance_id=99,
            model_name=MODEL,
            world_size=1,
            block_size=48,
            num_layers=2,
            hidden_dim_size=64,
            dtype_str="float16",
            use_mla=False,
        )
        with pytest.raises(ServerError) as e:
            c.register_engine_driven(bad)
        assert e.value.code == "bad_registration"
        assert "multiple of the block size" in e.value.message
        with pytest.raises(ServerError) as e:
            c.register_engine_driven(
                EngineDrivenRegistration(**{**msgspec_fields(bad), "block_size": 16, "num_layers": 3})
            )
        assert e.value.code == "bad_registration"
        assert "bytes per chunk" in e.value.message
        for change, why in [
            ({"hidden_dim_size": 1 << 40}, "L1 holds"),
            ({"dtype_str": "complex128"}, "unsupported dtype"),
            ({"world_size": 300}, "world_size"),
            ({"num_layers": 0}, "num_layers"),
            ({"num_physical_slots": -1}, "num_physical_slots"),
            ({"model_name": "a@b"}, "@"),
        ]:
            with pytest.raises(ServerError) as e:
                c.register_engine_driven(
                    EngineDrivenRegistration(**{**msgspec_fields(bad), "block_size": 16, **change})
                )
            assert e.value.code in ("bad_registration", "invalid_key"), change
            assert why in e.value.message, (change, e.value.message)
        assert c.noop() == "OK"


def msgspec_fields(s) -> dict:
    return {f: getattr(s, f) for f in s.__struct_fields__}


def test_unregister_releases_prepared_operations(server) -> None:
    with server.client() as c:
        w = ed_worker(c, seed=9)
        t = tokens(3 * C, seed=17)
        assert w.store(key(t, "s", end=2 * C), blocks(1, 2))
        assert lookup(c, t, "r") == 2
        assert c.prepare_retrieve(key(t, "r", end=2 * C), w.instance_id).success
        assert len(c.prepare_store(key(t, "s2"), w.instance_id).slots) == 1
        st = server_status(server)
        assert st["read_locked_objects"] == 2
        assert st["staging_objects"] == 1
        w.unregister()
        st = server_status(server)
        assert st["read_locked_objects"] == 0
        assert st["staging_objects"] == 0


def test_transfer_mode_flag(server_factory) -> None:
    lm_only = server_factory("--supported-transfer-mode", "lmcache_driven")
    with lm_only.client() as c:
        with pytest.raises(ServerError) as e:
            EngineDrivenWorker(c, kv_layers(), instance_id=1, model_name=MODEL).register()
        assert e.value.code == "unsupported_op"
        assert "lmcache_driven" in e.value.message
    ed_only = server_factory("--supported-transfer-mode", "engine_driven")
    with ed_only.client() as c:
        with pytest.raises(ServerError) as e:
            Worker(c)
        assert e.value.code == "unsupported_op"
        w = ed_worker(c)
        t = tokens(C, seed=18)
        assert w.store(key(t, "s"), blocks(1, 1))
        assert lookup(c, t, "r") == 1


def test_no_pool_refuses_engine_driven_workers(server_factory) -> None:
    s = server_factory("--shm-name", "")
    with s.client() as c:
        with pytest.raises(ServerError) as e:
            EngineDrivenWorker(c, kv_layers(), instance_id=1, model_name=MODEL).register()
        assert e.value.code == "no_shm_pool"
        assert "pickled KV is refused" in e.value.message
        assert e.value.fallback == {"shm_name": "", "pool_size": 0}
        lm = Worker(c)  # lmcache-driven workers are served as ever
        t = tokens(C, seed=19)
        assert lm.store(t, blocks(1, 1))
        assert lookup(c, t, "r") == 1
        lm.close()


def test_stale_pools_are_removed_and_live_ones_kept(tmp_path, server_factory) -> None:
    stale_port, live_port = free_port(), free_port()
    stale, live = pool_path(stale_port), pool_path(live_port)
    for p in (stale, live):
        with open(p, "wb") as f:
            f.write(b"\0" * 4096)
    holder = os.open(live, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a running server holds its pool
    try:
        s = server_factory()
        with s.client() as c:
            assert c.noop() == "OK"
        assert not os.path.exists(stale)
        assert os.path.exists(live)
        # A server told to use a pool a live server holds refuses to start, saying why.
        name = os.path.basename(live).removeprefix(POOL_PREFIX)
        with pytest.raises(RuntimeError, match="in use by another running server"):
            start_server(tmp_path, "--shm-name", name)
    finally:
        os.close(holder)
        os.unlink(live)


def test_pool_of_a_killed_server_is_reclaimed_on_restart(server_factory) -> None:
    # Named, not auto-named: a server another test starts meanwhile would reclaim an unheld
    # auto-named pool itself (test_stale_pools_... covers that), before the check below.
    port = free_port()
    name = f"killed{port}"
    path = pool_path(port, name)
    s = server_factory("--shm-name", name, port=port)
    with s.client() as c:
        ed_worker(c)
    s.kill()
    assert os.path.exists(path)  # SIGKILL: no chance to unlink
    s2 = server_factory("--shm-name", name, port=port)
    with s2.client() as c:
        w = ed_worker(c, seed=1)
        t = tokens(C, seed=20)
        assert w.store(key(t, "s"), blocks(1, 1))
        assert lookup(c, t, "r") == 1
    assert s2.stop() == 0
    assert not os.path.exists(path)


def test_small_dev_shm_keeps_l1_private(monkeypatch, tmp_path) -> None:
    """A /dev/shm too small for L1 (Docker's 64 MiB): no SIGBUS later, a clear answer now."""
    from lmcache_rs.config import StorageConfig  # noqa: PLC0415
    from lmcache_rs.storage import shm_pool  # noqa: PLC0415
    from lmcache_rs.storage.l1 import L1Store  # noqa: PLC0415

    monkeypatch.setattr(shm_pool, "shm_free_bytes", lambda _dir=SHM_DIR: 64 << 20)
    cfg = StorageConfig(l1_size_gb=0.125, l1_prefault=False)
    l1 = L1Store(cfg, "lmcache_rs_test_small", shm_dir=str(tmp_path))
    assert l1.pool is None
    assert l1.shm_name == ""
    assert "0.06 GiB free" in (l1.pool_error or "")
    assert "--shm-size" in (l1.pool_error or "")
    assert os.listdir(tmp_path) == []
    with pytest.raises(shm_pool.ShmPoolError):
        L1Store(cfg, "lmcache_rs_test_small", shm_required=True, shm_dir=str(tmp_path))


def test_a_worker_gone_mid_transfer_is_reaped_with_its_slots(server_factory) -> None:
    """A worker that prepared a store and a retrieve, then fell silent (crashed): the reaper
    drops it and everything it held in L1; other workers are served throughout."""
    import time  # noqa: PLC0415

    # The live worker pings every ~0.1 s against a 3 s reap timeout: it stays registered on a
    # loaded machine (a 1 s timeout reaped it once at load average 10).
    s = server_factory("--worker-reap-timeout-seconds", "3", "--worker-registration-grace-seconds", "3")
    with s.client() as c, s.client() as c2:
        w = ed_worker(c, seed=21)
        t = tokens(2 * C, seed=22)
        assert w.store(key(t, "s", end=C), blocks(1, 1))
        assert lookup(c, t, "r") == 1
        assert c.prepare_retrieve(key(t, "r", end=C), w.instance_id).success
        assert len(c.prepare_store(key(t, "s2"), w.instance_id).slots) == 1
        st = server_status(s)
        assert st["read_locked_objects"] == 1
        assert st["staging_objects"] == 1
        other = ed_worker(c2, seed=23)
        deadline = time.monotonic() + 30
        while True:
            other.client.ping(other.instance_id)  # the live worker keeps pinging
            st = server_status(s)
            if not st["staging_objects"] and not st["read_locked_objects"]:
                break
            assert time.monotonic() < deadline, "the silent worker was not reaped"
            time.sleep(0.1)
        with pytest.raises(ServerError) as e:
            c.commit_store(key(t, "s2"), w.instance_id)
        assert e.value.code == "unknown_instance"
        t2 = tokens(C, seed=24)
        assert other.store(key(t2, "o"), blocks(1, 1))
        assert lookup(c2, t2, "o2") == 1
