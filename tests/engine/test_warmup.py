"""Warm-up jobs in a runtime in this process: a job that raises is recorded as failed (and holds
nothing), and the record of jobs is bounded."""

from __future__ import annotations

import time
from pathlib import Path

from kvsim import MODEL, Worker, tokens

from lmcache_rs.client import MPClient
from lmcache_rs.config import StorageConfig, parse_l2_adapter
from lmcache_rs.engine.warmup import WarmupJob, Warmups

C = 256


def wait_done(warmups: Warmups, job: WarmupJob) -> WarmupJob:
    deadline = time.monotonic() + 30
    while (got := warmups.get(job.request_id)) is not None and got.status == "pending":
        assert time.monotonic() < deadline, "warm-up still pending"
        time.sleep(0.02)
    assert got is not None
    return got


def test_failed_job_is_recorded_and_the_record_is_bounded(
    runtime_factory, tmp_path: Path, monkeypatch
) -> None:
    fs = parse_l2_adapter(f'{{"type": "fs", "base_path": "{tmp_path / "l2"}"}}')
    rt = runtime_factory(StorageConfig(l1_size_gb=0.05, l2_adapters=[fs]))
    assert rt.l2 is not None
    with MPClient(rt.server.url, timeout=20) as c:
        w = Worker(c)
        t = tokens(2 * C, seed=3)

        def boom(*args: object, **kw: object) -> tuple[int, list[int]]:
            raise OSError("disk on fire")

        monkeypatch.setattr(rt.l2, "load", boom)
        job = rt.warmups.submit(MODEL, 1, t, "")
        assert job is not None
        got = wait_done(rt.warmups, job)
        assert (got.status, got.error, got.found_keys, got.total_keys) == (
            "failed",
            "OSError: disk on fire",
            0,
            2,
        )
        assert rt.l1.index.stats()["read_leases"] == 0
        monkeypatch.undo()

        small = Warmups(rt.engine, rt.l2, max_jobs=3)
        jobs = []
        for i in range(5):
            j = small.submit(MODEL, 1, t, f"salt-{i}")
            assert j is not None
            jobs.append(wait_done(small, j))
        assert [small.get(j.request_id) is not None for j in jobs] == [False, False, True, True, True]
        assert all(j.status == "completed" and j.found_keys == 0 for j in jobs)
        w.close()
