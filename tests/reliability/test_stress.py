"""8 worker processes store and retrieve overlapping prefixes under constant eviction, with
--verify-checksums: every retrieved chunk is byte-exact or reported as a miss, never wrong.
Half the workers are lmcache-driven (the server copies from their shm KV), half engine-driven
(they copy into and out of L1 slots themselves): both kinds share every chunk.

The KV of a chunk is a pure function of its chunk hash (so of its whole token prefix), so any
worker can tell what a retrieved chunk must contain (kvstress.py). LMCACHE_RS_STRESS_SECONDS sets
the duration (default 20 s; run minutes with it)."""

from __future__ import annotations

import httpx
from kvstress import run_workers, seconds_from_env

from lmcache_rs.client import MPClient

SECONDS = seconds_from_env(20)


def test_concurrent_workers_never_get_wrong_kv(server_factory) -> None:
    # 16 MiB of L1 holds 128 chunks of 128 KiB: 8 workers writing up to 6 chunks each, half of
    # them private, keep it evicting.
    s = server_factory("--l1-size-gb", str(16 / 1024), "--verify-checksums")
    total, codes = run_workers(s.url, SECONDS)
    print(dict(total))
    assert codes == [0] * 8, (codes, total)
    assert not [k for k in total if k.startswith("CRASHED")], total
    assert total["MISSING_WORKER_REPORTS"] == 0, total
    assert total["WRONG_chunks"] == 0, total
    assert total["UNANSWERED"] == 0, total
    assert total["exact_chunks"] > 100, total
    assert total["engine_driven_requests"] > 0, total
    assert total["lmcache_driven_requests"] > 0, total
    with MPClient(s.url) as c:
        assert c.noop() == "OK"
    text = httpx.get(s.http + "/metrics").text
    evicted = [line for line in text.splitlines() if line.startswith("lmcache_mp_l1_evicted_chunks_total")]
    assert evicted
    assert float(evicted[0].split()[-1]) > 0, "the run must have evicted"
    assert "lmcache_rs_l1_checksum_mismatch_chunks_total" not in text or all(
        float(line.split()[-1]) == 0
        for line in text.splitlines()
        if line.startswith("lmcache_rs_l1_checksum_mismatch_chunks_total")
    )
