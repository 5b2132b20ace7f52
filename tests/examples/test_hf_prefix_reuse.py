"""examples/hf_prefix_reuse.py against a real server: a transformer continues from KV that went
through store -> L1 -> retrieve in other processes, and gets exactly the logits of a full
recomputation; another cache_salt gets nothing. A sliding-window model (Gemma-3: five
sliding-window layers to one full-attention layer, sharing one KV tensor) gets the logits of its
own prefix cache bit for bit, and a prefix whose window was never stored is not served."""

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
    assert r["equal_to_full"], f"max |diff| {r['max_abs_diff']}"
    assert r["prefix_matters"], "the suffix alone must give other logits, or the check proves nothing"
    assert r["other_salt_hit_tokens"] == 0


def test_sliding_window_model_reuses_only_stored_windows(server) -> None:
    """A stores a 1024-token prefix after vLLM-style freeing of its sliding-window blocks out of
    the 384-token window: B's retrieve brings back the full-attention KV and the last window,
    and B continues with the logits of the model's own prefix cache (Hugging Face's cached
    continuation differs from its own full pass by ~1e-6 with sliding windows, so that is the
    bit-exact reference; the full pass must agree to float rounding)."""
    r = hf_prefix_reuse.run(server.url, prompt_tokens=1100, prefix_tokens=1024, arch="gemma3")
    assert r["stored"] is True
    assert r["hit_tokens"] == 1024
    assert r["exact"], f"max |diff| vs a full recomputation {r['max_abs_diff']}"
    assert r["max_abs_diff"] < 1e-4
    assert r["prefix_matters"]
    assert r["half_prefix_hit_tokens"] == 0, "the first half's window was never stored"
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
