"""--verify-checksums in a server in this process: L1 bytes changed behind the index's back are
detected on retrieve and never copied to the engine."""

from __future__ import annotations

import pytest
import torch
from kvsim import Worker, lookup, tokens

from lmcache_rs.client import MPClient, ServerError
from lmcache_rs.config import StorageConfig
from lmcache_rs.runtime import Runtime

C = 256


@pytest.fixture
def runtime(runtime_factory) -> Runtime:
    return runtime_factory(StorageConfig(l1_size_gb=0.01, verify_checksums=True))


def test_corrupted_l1_bytes_are_never_served(runtime: Runtime) -> None:
    with MPClient(runtime.server.url, timeout=10) as c:
        w = Worker(c)
        t = tokens(2 * C, seed=5)
        assert w.store(t, list(range(1, 33)))
        assert lookup(c, t, "ok") == 2
        assert w.retrieve(t, list(range(40, 72)), "ok")
        c.end_session("ok")
        before = w.kv.blocks_view(list(range(80, 112)))
        # Flip one byte of the second chunk inside the server's L1 buffer.
        slots = sorted(runtime.l1.digests)
        assert len(slots) == 2
        runtime.l1.buffer[slots[1] + 1000] ^= 0xFF
        assert lookup(c, t, "bad") == 2
        with pytest.raises(ServerError) as e:
            c.call("retrieve", w.key(t, "bad"), w.instance_id, [list(range(80, 112))], b"", 0)
        assert e.value.code == "corrupt"
        after = w.kv.blocks_view(list(range(80, 112)))
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "nothing was copied"
        c.end_session("bad")
        w.close()
    counters = runtime.engine.stats.snapshot()
    assert counters[("l1_checksum_mismatch_chunks", "test-model")] == 1
