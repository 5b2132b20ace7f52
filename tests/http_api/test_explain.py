"""POST /cache/explain through a real server: where each chunk is, why absent ones are absent,
within the caller's salt only."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from kvsim import MODEL, HybridWorker, Worker, lookup, tokens

C = 256


@pytest.fixture
def api(server):
    with httpx.Client(base_url=server.http, timeout=30) as client:
        yield client


def explain(api: httpx.Client, **body: object) -> dict:
    r = api.post("/cache/explain", json={"model_name": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def states(ans: dict) -> list[tuple[str, str | None]]:
    return [(c["where"][0]["l1"], c["where"][0]["reason"]) for c in ans["chunks"]]


def test_explain_resident_locked_cleared_unknown(api, server) -> None:
    with server.client() as c:
        w = Worker(c)
        t = tokens(3 * C + 10, seed=11)
        assert w.store(t[: 2 * C], list(range(1, 33)))
        ans = explain(api, token_ids=t)
        assert ans["total_chunks"] == 3  # the partial last chunk is never stored
        assert ans["layout_registered"] is True
        assert [{**s, "kv_rank": 0} for s in ans["scopes"]] == [
            {"rank": 0, "kv_rank": 0, "object_group": 0, "window": None, "tail": False}
        ]
        assert states(ans) == [("resident", None), ("resident", None), ("unknown", None)]
        assert ans["summary"]["l1_prefix_chunks"] == 2
        assert ans["summary"]["l1"] == {"resident": 2, "locked": 0, "dropped": 0, "unknown": 1}
        assert all(len(ch["chunk_hash"]) == 64 for ch in ans["chunks"])

        assert lookup(c, t, "req-1") == 2  # its read locks show as `locked`
        by_id = explain(api, request_id="req-1")
        assert states(by_id)[:2] == [("locked", None), ("locked", None)]
        assert [ch["chunk_hash"] for ch in by_id["chunks"]] == [ch["chunk_hash"] for ch in ans["chunks"]]

        assert api.post("/clear-cache").status_code == 200
        after = explain(api, token_ids=t)
        assert states(after) == [("dropped", "cleared"), ("dropped", "cleared"), ("unknown", None)]
        assert all(x["where"][0]["ago_seconds"] >= 0 for x in after["chunks"][:2])
        assert after["summary"]["reasons"] == {"cleared": 2}
        c.end_session("req-1")
        w.close()


def test_explain_stays_within_the_callers_salt(api, server) -> None:
    with server.client() as c:
        w = Worker(c)
        t = tokens(2 * C, seed=12)
        assert w.store(t, list(range(1, 33)), salt="alice")
        assert states(explain(api, token_ids=t, cache_salt="alice")) == [("resident", None)] * 2
        # Another salt sees nothing of alice's chunks ...
        assert states(explain(api, token_ids=t, cache_salt="bob")) == [("unknown", None)] * 2
        assert states(explain(api, token_ids=t)) == [("unknown", None)] * 2
        # ... nor of her requests: her request id answers exactly as one that never existed.
        assert lookup(c, t, "alice-req", salt="alice") == 2
        assert explain(api, request_id="alice-req", cache_salt="alice")["total_chunks"] == 2
        theirs = api.post(
            "/cache/explain", json={"model_name": MODEL, "cache_salt": "bob", "request_id": "alice-req"}
        )
        none = api.post(
            "/cache/explain", json={"model_name": MODEL, "cache_salt": "bob", "request_id": "nope"}
        )
        assert theirs.status_code == none.status_code == 404
        assert theirs.json()["error"].replace("alice-req", "X") == none.json()["error"].replace("nope", "X")
        other_model = api.post(
            "/cache/explain", json={"model_name": "other", "cache_salt": "alice", "request_id": "alice-req"}
        )
        assert other_model.status_code == 404
        c.end_session("alice-req")
        w.close()


def test_explain_bad_bodies_and_no_layout(api) -> None:
    def post(body: dict) -> httpx.Response:
        return api.post("/cache/explain", json=body)

    assert post({"model_name": MODEL}).status_code == 400  # neither token_ids nor request_id
    assert post({"model_name": MODEL, "token_ids": [1], "request_id": "r"}).status_code == 400
    assert post({"model_name": MODEL, "token_ids": [1], "cache_salt": "a@b"}).status_code == 400
    assert post({"model_name": MODEL, "token_ids": [1], "world_size": 0}).status_code == 400
    assert post({"model_name": MODEL, "token_ids": [1], "world_size": 256}).status_code == 400
    assert post({"model_name": MODEL, "token_ids": [1], "world_size": 255}).status_code == 200
    assert post({"model_name": MODEL, "token_ids": "x"}).status_code == 400
    assert post({"model_name": MODEL, "token_ids": [-1]}).status_code == 400
    assert post({"model_name": MODEL, "token_ids": [1 << 32]}).status_code == 400
    assert post({"model_name": MODEL, "token_ids": [1], "extra": 1}).status_code == 400
    ans = explain(api, token_ids=tokens(C, seed=1), world_size=2)
    assert ans["layout_registered"] is False
    assert [(s["rank"], s["object_group"]) for s in ans["scopes"]] == [(0, 0), (1, 0)]
    assert ans["chunks"][0]["where"] == [{"l1": "unknown", "reason": None, "ago_seconds": None, "l2": []}] * 2


def test_explain_names_the_l2_adapter(server_factory, tmp_path) -> None:
    fs = json.dumps({"type": "fs", "base_path": str(tmp_path / "l2"), "name": "disk"})
    server = server_factory("--l2-adapter", fs)
    with httpx.Client(base_url=server.http, timeout=30) as api, server.client() as c:
        w = Worker(c)
        t = tokens(2 * C, seed=13)
        assert w.store(t, list(range(1, 33)))
        deadline = time.monotonic() + 30
        while (ans := explain(api, token_ids=t))["summary"]["l2_prefix_chunks"].get("disk") != 2:
            assert time.monotonic() < deadline, ans
            time.sleep(0.1)
        assert [ch["where"][0]["l2"] for ch in ans["chunks"]] == [["disk"], ["disk"]]
        assert api.post("/cache/clear", json={"tier": "l1"}).status_code == 200
        ans = explain(api, token_ids=t)
        assert states(ans) == [("dropped", "cleared")] * 2
        assert ans["summary"]["l2_prefix_chunks"] == {"disk": 2}
        assert ans["summary"]["l1_prefix_chunks"] == 0
        w.close()


def test_drop_log_entries_flag(server_factory) -> None:
    server = server_factory("--drop-log-entries", "0")
    with httpx.Client(base_url=server.http, timeout=30) as api, server.client() as c:
        assert api.get("/conf").json()["storage_manager"]["drop_log_entries"] == 0
        w = Worker(c)
        t = tokens(C, seed=14)
        assert w.store(t, list(range(1, 17)))
        assert api.post("/clear-cache").status_code == 200
        assert states(explain(api, token_ids=t)) == [("unknown", None)]  # nothing remembered
        w.close()


def test_explain_hybrid_layout_has_a_row_per_object_group(api, server) -> None:
    with server.client() as c:
        w = HybridWorker(c, [[0], [1]], [-1, 512], model="hy-explain")
        t = tokens(4 * C, seed=15)
        n = 4 * C // 16
        assert w.store(t, [list(range(1, 1 + n)), list(range(1 + n, 1 + 2 * n))])
        ans = api.post("/cache/explain", json={"model_name": "hy-explain", "token_ids": t}).json()
        assert ans["layout_registered"] is True
        rows = [(s["object_group"], s["window"], s["tail"]) for s in ans["scopes"]]
        assert rows[0] == (0, None, False)
        assert (1, 512, False) in rows
        assert all(s["window"] == 512 for s in ans["scopes"][1:])
        full = [ch["where"][0]["l1"] for ch in ans["chunks"]]
        assert full == ["resident"] * 4
        window = rows.index((1, 512, False))
        assert ans["chunks"][-1]["where"][window]["l1"] == "resident"  # the last window's chunk
        w.close()
