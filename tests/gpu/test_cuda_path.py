"""The CUDA path (spec D.1, D.2, B.4 events): a server process and a GPU worker in this process,
on one GPU. KV handles are torch shared-storage `cuda` handles, events are real interprocess
CUDA events. Skipped where torch sees no CUDA device."""

from __future__ import annotations

import pytest
import torch
from kvsim import lookup, tokens

from lmcache_rs.client.client import make_key

pytestmark = pytest.mark.gpu

C = 256
BS = 16
BPC = C // BS


def blocks(first: int, chunks: int) -> list[int]:
    return list(range(first, first + chunks * BPC))


def worker_cache(layout: str, dtype: torch.dtype, seed: int):
    from lmcache_rs.client.cuda_kv import CudaKVCache  # noqa: PLC0415

    kv = CudaKVCache(4, 256, BS, 8 if layout != "MLA" else 1, 128 if layout != "MLA" else 576, dtype, layout)
    kv.fill_random(seed)
    return kv


@pytest.mark.parametrize(
    ("layout", "dtype"), [("NHD", torch.bfloat16), ("HND", torch.float16), ("MLA", torch.bfloat16)]
)
def test_cuda_store_lookup_retrieve_is_byte_exact(server_factory, layout: str, dtype: torch.dtype) -> None:
    s = server_factory("--l1-size-gb", "1")
    model = f"gpu-{layout}"
    kv = worker_cache(layout, dtype, seed=1)
    hints = {"kv_layout": layout} if layout != "MLA" else {}
    with s.client(timeout=120) as c:
        c.register_kv_cache(1, kv.handles(), model, 1, hints)
        t = tokens(3 * C + 17, seed=5)
        key = make_key(t, "s", model_name=model, worker_id=0)
        event, ok = c.store(key, 1, [blocks(1, 3)], kv.event())
        assert ok
        assert event != b"stub_ipc_handle"
        kv.wait(event)
        assert lookup(c, t, "r", model=model) == 3
        # Retrieve into other blocks, skipping the first 40 tokens (APC-shared in vLLM).
        before = kv.blocks_view(blocks(100, 3))
        key = make_key(t, "r", model_name=model, worker_id=0, end=3 * C)
        event, ok = c.retrieve(key, 1, [blocks(100, 3)], 40, kv.event())
        assert ok
        kv.wait(event)
        torch.cuda.synchronize()
        dim = 0 if layout == "MLA" else 1
        views = zip(kv.blocks_view(blocks(1, 3)), kv.blocks_view(blocks(100, 3)), before, strict=True)
        for layer in views:
            # Token-major views: [.., blocks * BS, ..] for NHD/MLA; HND keeps heads before tokens.
            xs = [x.transpose(2, 3) for x in layer] if layout == "HND" else list(layer)
            flat = [x.flatten(dim, dim + 1) for x in xs]
            assert torch.equal(flat[1].narrow(dim, 40, 3 * C - 40), flat[0].narrow(dim, 40, 3 * C - 40))
            assert torch.equal(flat[1].narrow(dim, 0, 40), flat[2].narrow(dim, 0, 40))
        c.end_session("r")
        c.unregister_kv_cache(1)


def test_second_gpu_worker_gets_the_first_ones_kv(server_factory) -> None:
    """Worker A stores, worker B (another registration, other tensors) retrieves: same bytes."""
    s = server_factory("--l1-size-gb", "1")
    a, b = worker_cache("NHD", torch.bfloat16, 2), worker_cache("NHD", torch.bfloat16, 3)
    with s.client(timeout=120) as c:
        c.register_kv_cache(10, a.handles(), "gpu-ab", 1, {"kv_layout": "NHD"})
        c.register_kv_cache(11, b.handles(), "gpu-ab", 1, {"kv_layout": "NHD"})
        t = tokens(2 * C, seed=6)
        event, ok = c.store(make_key(t, "s", model_name="gpu-ab", worker_id=0), 10, [blocks(1, 2)], a.event())
        assert ok
        a.wait(event)
        assert lookup(c, t, "r", model="gpu-ab") == 2
        event, ok = c.retrieve(
            make_key(t, "r", model_name="gpu-ab", worker_id=0), 11, [blocks(50, 2)], 0, b.event()
        )
        assert ok
        b.wait(event)
        for x, y in zip(a.blocks_view(blocks(1, 2)), b.blocks_view(blocks(50, 2)), strict=True):
            assert torch.equal(x, y)
