"""Hybrid models (full-attention and sliding-window layers, spec C.6) through a real server:
simulated vLLM workers whose sliding-window blocks out of the window are the null block.

Every layout must give the measured hits of spec C.6 (chunks of 256; prompt A = 2048 tokens
stored once computed, so its early sliding blocks were null; B = 1024 tokens fully stored):
A -> 8, A + one new chunk -> 8, A's first half -> 0, B's first 3 chunks -> 3, other salt -> 0,
and retrieve writes byte-exact KV into exactly the blocks the windows cover, nothing else."""

from __future__ import annotations

import httpx
import pytest
import torch
from kvsim import HybridWorker, lookup, tokens, vllm_blocks

from lmcache_rs.client import ServerError
from lmcache_rs.protocol.messages import EngineDrivenRegistration, EngineGroupInfo

C = 256
B = 16
SENTINEL = 7.0


def shared_5_to_1() -> tuple[list[list[int]], list[int], list[int]]:
    """Gemma-3 style, 12 layers 5:1 sliding:full: vLLM makes KV groups of 2 layers (one full,
    five sliding) and the i-th layer of every group views the same tensor."""
    groups = [[5, 11], [0, 1], [2, 3], [4, 6], [7, 8], [9, 10]]
    storage_of = [0] * 12
    for g in groups:
        for pos, layer in enumerate(g):
            storage_of[layer] = pos
    return groups, [-1] + [384] * 5, storage_of


LAYOUTS = {
    "interleaved_w512": ([[0, 2], [1, 3]], [-1, 512], None),
    "5to1_w384_shared_storage": shared_5_to_1(),
    "w128_shorter_than_a_chunk": ([[0], [1]], [-1, 128], None),
}


class Blocks:
    """Hands out block ids no group or request has used (one pool, as vLLM's)."""

    def __init__(self) -> None:
        self.next = 1

    def table(self, n_tokens: int, window: int = -1) -> list[int]:
        first = self.next
        self.next += n_tokens // B
        return vllm_blocks(first, n_tokens, window, B)


def written_from(window: int, end: int) -> int:
    """First token position a retrieve of a prefix of `end` tokens writes for a group."""
    return 0 if window <= 0 else max(0, end - -(-window // B) * B)


def expected_after(
    w: HybridWorker,
    before: list[torch.Tensor],
    src: list[list[int]],
    dst: list[list[int]],
    end: int,
    skip: int = 0,
) -> list[torch.Tensor]:
    """The shm segments as they must be after retrieving `end` tokens from `src` into `dst`."""
    exp = [t.clone() for t in before]
    for g, layers in enumerate(w.groups):
        first = max(written_from(w.windows[g], end), skip)
        for layer in layers:
            seg = exp[w.kv.storage_of[layer]]
            cur = w.kv.layers[layer]
            for bi in range(end // B):
                lo = max(bi * B, first) - bi * B
                if lo < B and dst[g][bi] != 0:
                    seg[:, dst[g][bi], lo:] = cur[:, src[g][bi], lo:]
    return exp


def retrieve_and_check(
    w: HybridWorker,
    t: list[int],
    src: list[list[int]],
    dst: list[list[int]],
    rid: str,
    skip: int = 0,
) -> None:
    for g, layers in enumerate(w.groups):
        live = [b for b in dst[g] if b]
        for layer in layers:
            w.kv.layers[layer][:, live] = SENTINEL
    before = w.snapshot()
    assert w.retrieve(t, dst, rid, skip=skip)
    for want, got in zip(expected_after(w, before, src, dst, len(t), skip), w.snapshot(), strict=True):
        assert torch.equal(want, got)


@pytest.mark.parametrize("name", LAYOUTS)
def test_hybrid_hits_and_retrieves_only_what_the_windows_stored(server, name: str) -> None:
    groups, windows, storage_of = LAYOUTS[name]
    pool = Blocks()
    with server.client() as c:
        w = HybridWorker(
            c, groups, windows, storage_of=storage_of, num_blocks=1 + 6 * 800, model=f"hy-{name}"
        )
        a = tokens(8 * C, seed=21)
        src_a = [pool.table(8 * C, win) for win in windows]
        assert w.store(a, src_a)
        assert lookup(c, a, "a", model=w.model) == 8
        assert lookup(c, a + tokens(C, seed=22), "a+1", model=w.model) == 8
        assert lookup(c, a[: 4 * C], "a/2", model=w.model) == 0, "its window was never stored"
        assert lookup(c, a, "salt", model=w.model, salt="other") == 0
        bt = tokens(4 * C, seed=23)
        src_b = [pool.table(4 * C) for _ in windows]  # computed chunk by chunk: all live
        assert w.store(bt, src_b)
        assert lookup(c, bt[: 3 * C], "b3", model=w.model) == 3
        assert lookup(c, bt, "b", model=w.model) == 4

        # Byte-exact into fresh blocks; every other byte (block 0 included) untouched.
        retrieve_and_check(w, a, src_a, [pool.table(8 * C) for _ in windows], "a")
        retrieve_and_check(w, bt[: 3 * C], src_b, [pool.table(3 * C) for _ in windows], "b3")
        # vLLM's own table for the new request: null out of the window (never written).
        lookup(c, a, "a2", model=w.model)
        retrieve_and_check(w, a, src_a, [pool.table(8 * C, win) for win in windows], "a2")
        # vLLM already holds the first tokens (prefix cache): they are left alone.
        assert lookup(c, a, "a3", model=w.model) == 8
        skip = 6 * C + 9 * B + 5  # inside every window's first chunk
        retrieve_and_check(w, a, src_a, [pool.table(8 * C) for _ in windows], "a3", skip=skip)

        # Salt isolation: nothing served across salts, each salt gets its own objects.
        with pytest.raises(ServerError) as e:
            w.retrieve(a, [pool.table(8 * C) for _ in windows], "salt", salt="other")
        assert e.value.code == "not_found"
        assert w.store(a, src_a, salt="alice")
        assert lookup(c, a, "alice", model=w.model, salt="alice") == 8
        assert lookup(c, a[: 4 * C], "alice/2", model=w.model, salt="alice") == 0

        status = httpx.get(server.http + "/status").json()
        layout = status["gpu_context_meta"][str(w.instance_id)]["kv_cache_layout"]
        got = [(g["object_group_idx"], g["sliding_window_tokens"]) for g in layout["object_groups"]]
        assert got == [(0, -1), (1, windows[1])]
        assert layout["object_groups"][1]["engine_group_ids"] == list(range(1, len(windows)))
        for r in ("a", "a+1", "a/2", "salt", "b3", "b", "a2", "a3", "alice", "alice/2"):
            c.end_session(r)
        w.close()


def test_every_rank_must_hold_every_window(server) -> None:
    groups, windows, _ = LAYOUTS["interleaved_w512"]
    pool = Blocks()
    with server.client() as c:
        w0 = HybridWorker(c, groups, windows, world_size=2, worker_id=0, model="hy-tp2", seed=1)
        w1 = HybridWorker(c, groups, windows, world_size=2, worker_id=1, model="hy-tp2", seed=2)
        a = tokens(8 * C, seed=31)
        assert w0.store(a, [pool.table(8 * C, win) for win in windows])
        # Rank 1 stored only after its window had moved on: no sliding chunk at all.
        assert w1.store(a, [pool.table(8 * C), [0] * (8 * C // B)])
        assert lookup(c, a, "r", world_size=2, model="hy-tp2") == 0
        assert w1.store(a, [pool.table(8 * C, win) for win in windows])
        assert lookup(c, a, "r", world_size=2, model="hy-tp2") == 8
        c.end_session("r")
        w0.close()
        w1.close()


def test_hybrid_registration_errors(server) -> None:
    from lmcache_rs.client import ShmKVCache  # noqa: PLC0415

    with server.client() as c:
        w = HybridWorker(c, [[0], [1]], [-1, 512], model="hy-reg")
        kv = ShmKVCache(2, 64, B, 2, 32)
        infos = [
            EngineGroupInfo(engine_group_id=0, layer_indices=[0]),
            EngineGroupInfo(engine_group_id=1, layer_indices=[1], sw_size_tokens=1024),
        ]
        with pytest.raises(ServerError) as e:  # same model, another window: other objects
            c.register_kv_cache(501, kv.handles(), "hy-reg", 1, engine_group_infos=infos)
        assert e.value.code == "bad_registration"
        assert "window 512" in e.value.message
        infos[1] = EngineGroupInfo(engine_group_id=1, layer_indices=[1], recurrent_state=True)
        with pytest.raises(ServerError) as e:
            c.register_kv_cache(502, kv.handles(), "hy-mamba", 1, engine_group_infos=infos)
        assert e.value.code == "bad_registration"
        assert "recurrent state" in e.value.message
        # Engine-driven workers copy one KV group: a hybrid model is refused, with the reason.
        reg = EngineDrivenRegistration(
            instance_id=503,
            model_name="hy-ed",
            world_size=1,
            block_size=B,
            num_layers=2,
            hidden_dim_size=64,
            dtype_str="float16",
            use_mla=False,
            engine_group_infos=[
                infos[0],
                EngineGroupInfo(engine_group_id=1, layer_indices=[1], sw_size_tokens=512),
            ],
        )
        with pytest.raises(ServerError) as e:
            c.register_engine_driven(reg)
        assert e.value.code == "bad_registration"
        assert "hybrid model" in e.value.message
        assert "lmcache-driven" in e.value.message
        kv.close()
        w.close()
