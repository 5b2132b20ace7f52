"""examples/hf_prefix_reuse.py against a real server: a transformer continues from KV that went
through store -> L1 -> retrieve in other processes, and gets exactly the logits of a full
recomputation; another cache_salt gets nothing."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import pytest

from lmcache_rs.client import MPClient

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import hf_prefix_reuse


@pytest.mark.parametrize("transfer", ["lmcache_driven", "engine_driven"])
def test_retrieved_prefix_gives_the_logits_of_a_full_recomputation(server, transfer: str) -> None:
    r = hf_prefix_reuse.run(server.url, transfer=transfer)
    assert r["stored"] is True
    assert r["hit_tokens"] == 512
    assert r["exact"], f"max |diff| {r['max_abs_diff']}"
    assert r["prefix_matters"], "the suffix alone must give other logits, or the check proves nothing"
    assert r["other_salt_hit_tokens"] == 0


def test_the_prefix_also_comes_back_from_l2(server_factory, tmp_path: Path) -> None:
    """Same, with the server's L1 cleared between the engines: the prefix comes from disk."""
    s = server_factory("--l2-adapter", json.dumps({"type": "fs", "base_path": str(tmp_path / "l2")}))

    def written_then_cleared() -> None:
        deadline = time.monotonic() + 30
        while httpx.get(s.http + "/status").json()["storage_manager"]["l2_adapters"][0]["total_objects"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with MPClient(s.url) as c:
            c.clear(True)

    r = hf_prefix_reuse.run(s.url, between=written_then_cleared)
    assert r["hit_tokens"] == 512
    assert r["exact"]
    assert r["other_salt_hit_tokens"] == 0
