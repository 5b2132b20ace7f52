"""KV block checksums through a real server (issue 16): `POST /cache/checksums` and `GET
/kvcache/check` hash a registered worker's blocks as the test hashes the same bytes."""

from __future__ import annotations

import hashlib

import httpx
import pytest
import torch
from kvsim import Worker

from lmcache_rs.client.engine_driven import EngineDrivenWorker
from lmcache_rs.client.shm_kv import paged_shape

IDS = [0, 2, 3, 4, 5, 8]  # "0,[2,5],8"


def digests(w: Worker, ids: list[int], chunk: int) -> tuple[list[str], dict[str, list[str]]]:
    """What the server should answer: per group of `chunk` blocks, the MD5 over every layer of
    the group's blocks (dense, gathered on the block axis), and per layer."""
    axis = 0 if w.kv.layout == "MLA" else 1
    whole: list[str] = []
    layers: dict[str, list[str]] = {f"layer_{i}": [] for i in range(len(w.kv.layers))}
    for s in range(0, len(ids), chunk):
        md5 = hashlib.md5()
        for i, t in enumerate(w.kv.layers):
            x = t.index_select(axis, torch.tensor(ids[s : s + chunk])).contiguous()
            if x.dtype == torch.bfloat16:  # LMCache hashes bfloat16 as float32 values
                x = x.to(torch.float32)
            data = x.numpy().tobytes()
            md5.update(data)
            layers[f"layer_{i}"].append(hashlib.md5(data).hexdigest())
        whole.append(md5.hexdigest())
    return whole, layers


@pytest.mark.parametrize(
    ("layout", "dtype"),
    [("NHD", torch.float16), ("HND", torch.float16), ("MLA", torch.float16), ("NHD", torch.bfloat16)],
)
def test_checksums_match_the_blocks(server, layout: str, dtype: torch.dtype) -> None:
    with httpx.Client(base_url=server.http, timeout=30) as api, server.client() as c:
        w = Worker(c, layout=layout, dtype=dtype, seed=3, num_blocks=64)
        whole, layers = digests(w, IDS, 4)
        body = {"block_ids": [0, [2, 5], 8], "chunk_size": 4, "instance_id": w.instance_id}
        r = api.post("/cache/checksums", json=body)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "status": "success",
            "chunk_size": 4,
            "num_chunks": 2,
            "chunk_checksums": whole,
            "layerwise": False,
            "block_id_ranges": [0, [2, 5], 8],
        }
        r = api.post("/cache/checksums", json={**body, "layerwise": True})
        assert (r.json()["chunk_checksums"], r.json()["layerwise"]) == (layers, True)

        # The query form, LMCache's string form of block_ids.
        q = {"block_ids": "0,[2,5],8", "chunk_size": 4, "instance_id": w.instance_id}
        assert api.get("/kvcache/check", params=q).json() == api.post("/cache/checksums", json=body).json()
        r = api.get("/kvcache/check", params={**q, "layerwise": "true"})
        assert r.json()["chunk_checksums"] == layers
        w.close()


def test_checksums_read_live_memory_and_refuse_bad_input(server) -> None:
    with httpx.Client(base_url=server.http, timeout=30) as api, server.client() as c:
        w = Worker(c, num_blocks=64)
        body = {"block_ids": [[10, 13]], "chunk_size": 2, "instance_id": w.instance_id}
        before = api.post("/cache/checksums", json=body).json()["chunk_checksums"]
        w.kv.layers[1][1, 12].add_(1)  # corrupt block 12's V in layer 1: only the second group changes
        after = api.post("/cache/checksums", json=body).json()["chunk_checksums"]
        assert before[0] == after[0]
        assert before[1] != after[1]
        assert after == digests(w, [10, 11, 12, 13], 2)[0]

        def post(**kw: object) -> httpx.Response:
            return api.post("/cache/checksums", json={**body, **kw})

        assert post(instance_id=w.instance_id + 1).status_code == 404
        for bad in ([64], [[60, 64]], [[5, 2]], "1,,2", "[1,2", "x", "", [], [[1, 2, 3]], [-1]):
            r = post(block_ids=bad)
            assert r.status_code == 400, (bad, r.text)
        assert post(chunk_size=0).status_code == 400
        assert "out of range" in post(block_ids=[64]).json()["error"]
        r = api.get(
            "/kvcache/check", params={"block_ids": "1,[2", "chunk_size": 1, "instance_id": w.instance_id}
        )
        assert r.status_code == 400
        assert api.get("/kvcache/check", params={"block_ids": "1", "chunk_size": 1}).status_code == 404
        w.close()


def test_checksums_of_an_engine_driven_worker(server) -> None:
    with httpx.Client(base_url=server.http, timeout=30) as api, server.client() as c:
        shape = paged_shape("NHD", 16, 16, 2, 32)
        ed = EngineDrivenWorker(
            c, [torch.zeros(shape, dtype=torch.float16)] * 2, instance_id=4242, model_name="ed", layout="NHD"
        )
        ed.register()
        r = api.post("/cache/checksums", json={"block_ids": [0], "chunk_size": 1, "instance_id": 4242})
        assert r.status_code == 501
        assert "engine-driven" in r.json()["error"]
        ed.unregister()
