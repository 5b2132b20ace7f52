"""Store / lookup / retrieve through a real server and simulated workers sharing KV via shm."""

from __future__ import annotations

import time

import pytest
import torch
from kvsim import MODEL, Worker, lookup, tokens

from lmcache_rs.client import ServerError
from lmcache_rs.client.client import make_key

C = 256  # chunk size
BPC = C // 16  # blocks per chunk


def blocks(first: int, chunks: int) -> list[int]:
    return list(range(first, first + chunks * BPC))


def assert_same(w: Worker, src: list[int], dst: list[int]) -> None:
    for a, b in zip(w.kv.blocks_view(src), w.kv.blocks_view(dst), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("layout", "dtype"),
    [("NHD", torch.float16), ("HND", torch.bfloat16), ("MLA", torch.float32), ("NHD", torch.float32)],
)
def test_roundtrip_is_byte_exact(server, layout: str, dtype: torch.dtype) -> None:
    with server.client() as c:
        w = Worker(c, layout=layout, dtype=dtype, model=f"m-{layout}-{dtype}")
        t = tokens(3 * C + 100)
        assert w.store(t, blocks(1, 3))
        assert lookup(c, t, "r", model=w.model) == 3
        assert w.retrieve(t, blocks(100, 3), "r", end=3 * C)
        assert_same(w, blocks(1, 3), blocks(100, 3))
        c.end_session("r")
        w.close()


def test_partial_store_and_prefix_lookup(server) -> None:
    with server.client() as c:
        w = Worker(c)
        t = tokens(4 * C, seed=1)
        # The engine stores chunk by chunk as they complete: [0, 2C) then [2C, 4C).
        assert w.store(t, blocks(1, 2), start=0, end=2 * C)
        assert lookup(c, t, "a") == 2
        assert w.store(t, blocks(40, 2), start=2 * C, end=4 * C)
        assert lookup(c, t, "b") == 4
        # A different continuation of the same prefix hits only the shared chunks.
        t2 = t[: 2 * C] + tokens(2 * C, seed=2)
        assert lookup(c, t2, "c") == 2
        # Retrieve [2C, 4C) only, as vLLM does when it already holds the first chunks.
        assert w.retrieve(t, blocks(100, 2), "b", start=2 * C, end=4 * C)
        assert_same(w, blocks(40, 2), blocks(100, 2))
        for r in "abc":
            c.end_session(r)
        w.close()


def test_a_prompt_seen_before_is_hashed_from_the_memo(server) -> None:
    """Every request hashes its prompt (the chain is per request), but chunks hashed by an
    earlier request come from the server's memo, found by their msgpack bytes: /status and
    /metrics count them. A store records its chunks; a lookup only those L1 holds."""
    import httpx  # noqa: PLC0415

    def memo() -> dict[str, int]:
        return httpx.get(server.http + "/status").json()["hash_memo"]

    with server.client() as c:
        w = Worker(c)
        t = tokens(3 * C, seed=11)
        before = memo()
        assert w.store(t, blocks(1, 3))
        assert memo()["misses"] - before["misses"] == 3
        assert lookup(c, t, "first") == 3
        assert lookup(c, t[: 2 * C] + tokens(C, seed=12), "second") == 2
        after = memo()
        assert after["hits"] - before["hits"] == 3 + 2, after
        assert after["misses"] - before["misses"] == 3 + 1, after
        assert after["entries"] == 3, "the second lookup's new chunk is not in L1: not recorded"
        assert after["key_bytes"] >= 3 * (40 + C)  # keyed by msgpack bytes: 1 to 5 a token
        assert lookup(c, t[: 2 * C] + tokens(C, seed=12), "third") == 2
        assert memo()["misses"] - after["misses"] == 1
        metrics = httpx.get(server.http + "/metrics").text
        assert 'lmcache_rs_hash_memo_chunks_total{result="hit"}' in metrics
        for r in ("first", "second", "third"):
            c.end_session(r)
        w.close()


def test_the_hash_memo_can_be_sized_and_turned_off(server_factory) -> None:
    import httpx  # noqa: PLC0415

    small = server_factory("--hash-memo-mib", "1")
    off = server_factory("--hash-memo-mib", "0")
    # 1 MiB of entries in two tables, (32 + 4 * 256 + 64) + (40 + 5 * 256 + 64) bytes a chunk:
    # 418 chunks a table (two equal generations).
    assert httpx.get(small.http + "/status").json()["hash_memo"]["capacity"] == 2 * 209
    with off.client() as c:
        w = Worker(c)
        t = tokens(2 * C, seed=13)
        assert w.store(t, blocks(1, 2))
        assert lookup(c, t, "r") == 2
        memo = httpx.get(off.http + "/status").json()["hash_memo"]
        assert (memo["capacity"], memo["entries"], memo["hits"]) == (0, 0, 0)
        c.end_session("r")
        w.close()


def test_skip_first_n_tokens_leaves_them_untouched(server) -> None:
    with server.client() as c:
        w = Worker(c)
        t = tokens(2 * C, seed=3)
        assert w.store(t, blocks(1, 2))
        assert lookup(c, t, "r") == 2
        dst = blocks(100, 2)
        for layer in w.kv.layers:
            layer[:, dst] = 7.0
        skip = 2 * 16 + 5  # two whole blocks and 5 tokens of the third
        assert w.retrieve(t, dst, "r", skip=skip)
        for src_l, dst_l in zip(w.kv.blocks_view(blocks(1, 2)), w.kv.blocks_view(dst), strict=True):
            flat_src = src_l.reshape(2, -1, *src_l.shape[3:])  # [K/V, tokens, heads, dim]
            flat_dst = dst_l.reshape(2, -1, *dst_l.shape[3:])
            assert torch.all(flat_dst[:, :skip] == 7.0)
            assert torch.equal(flat_dst[:, skip:], flat_src[:, skip:])
        c.end_session("r")
        w.close()


def test_null_blocks_are_not_stored(server) -> None:
    with server.client() as c:
        w = Worker(c)
        t = tokens(2 * C, seed=4)
        assert w.store(t, [0] * BPC + blocks(1, 1))  # chunk 0 is all null blocks
        assert lookup(c, t, "r") == 0  # chunk 1 alone is no prefix
        c.end_session("r")
        w.close()


def test_salts_isolate_tenants(server) -> None:
    with server.client() as c:
        w = Worker(c)
        t = tokens(2 * C, seed=5)
        assert w.store(t, blocks(1, 2), salt="alice")
        assert lookup(c, t, "x", salt="alice") == 2
        assert lookup(c, t, "y", salt="bob") == 0
        assert lookup(c, t, "z") == 0
        with pytest.raises(ServerError) as e:
            w.retrieve(t, blocks(100, 2), "y", salt="bob")
        assert e.value.code == "not_found"
        assert e.value.fallback[1] is False
        for r in "xyz":
            c.end_session(r)
        w.close()


def test_query_answers_once_and_tokens_replace_the_chain(server) -> None:
    with server.client() as c:
        w = Worker(c)
        t = tokens(2 * C, seed=6)
        assert w.store(t, blocks(1, 2), request_id="same")
        key = make_key(t, "same", model_name=MODEL)
        c.call("lookup", key, 1)
        assert c.call("query_prefetch_status", "same") == 2
        assert c.call("query_prefetch_status", "same") == 0
        assert c.call("query_prefetch_status", "unknown") == 0
        # Same request id, other tokens: the cached chain must not be reused.
        other = tokens(2 * C, seed=7)
        assert lookup(c, other, "same") == 0
        c.call("lookup", key, 1)
        assert c.call("wait_prefetch_status", "same", 1.0) == 2
        c.end_session("same")
        w.close()


def test_world_size_two_needs_every_rank(server) -> None:
    with server.client() as c:
        w0 = Worker(c, world_size=2, worker_id=0, seed=10)
        w1 = Worker(c, world_size=2, worker_id=1, seed=11)
        t = tokens(3 * C, seed=8)
        assert w0.store(t, blocks(1, 3))
        assert lookup(c, t, "r0", world_size=2) == 0, "rank 1 has nothing yet"
        assert w1.store(t, blocks(1, 2), end=2 * C)
        assert lookup(c, t, "r1", world_size=2) == 2
        # Each rank retrieves its own bytes.
        assert w0.retrieve(t, blocks(100, 2), "r1", end=2 * C)
        assert w1.retrieve(t, blocks(100, 2), "r1", end=2 * C)
        assert_same(w0, blocks(1, 2), blocks(100, 2))
        assert_same(w1, blocks(1, 2), blocks(100, 2))
        assert not torch.equal(w0.kv.blocks_view(blocks(1, 1))[0], w1.kv.blocks_view(blocks(1, 1))[0])
        for r in ("r0", "r1"):
            c.end_session(r)
        w0.close()
        w1.close()


def test_bad_requests_get_error_replies_and_the_server_keeps_serving(server) -> None:
    with server.client() as c:
        w = Worker(c)
        t = tokens(2 * C, seed=9)
        cases = [
            (("store", w.key(t, "e"), w.instance_id, [blocks(1, 1)], b""), "bad_request"),  # too few blocks
            (("store", w.key(t, "e"), w.instance_id, [[10_000] * (2 * BPC)], b""), "bad_request"),
            (("store", w.key(t, "e", salt="a/b"), w.instance_id, [blocks(1, 2)], b""), "invalid_key"),
            (("store", w.key(t, "e", start=3), w.instance_id, [blocks(1, 2)], b""), "bad_request"),
            (("lookup", make_key(t, "e", num_kv_readers=0), 1), "bad_request"),
            (("lookup", make_key([-1] * C, "e2"), 1), "bad_request"),
            (("retrieve", w.key(t, "e"), 424242, [blocks(1, 2)], b"", 0), "unknown_instance"),
            (("prepare_store", w.key(t, "e"), w.instance_id), "wrong_transfer_mode"),
            (("cb_register_rope",), "unsupported_op"),
            (("register_kv_cache", 5, [1, 2], "m", 1, "vllm", {}, []), "bad_registration"),
            (("register_kv_cache", 5, [], "m", 1, "vllm", {}, []), "bad_registration"),
            ((999, 1), "unknown_op"),
            (("clear",), "bad_request"),  # missing argument frame
            (("ping", "not-an-int"), "bad_request"),
        ]
        for args, code in cases:
            with pytest.raises(ServerError) as e:
                c.call(*args)
            assert e.value.code == code, (args[0], e.value)
        # Each error reply is logged by the I/O thread; its lines reach Python's logging
        # (NativeServer.next_log's LogLine) with their level. A bound, not a timing assertion.
        line = "WARNING lmcache_rs.transport.io_thread: request cb_register_rope failed: unsupported_op"
        deadline = time.monotonic() + 30
        while line not in server.log():
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.05)
        assert w.store(t, blocks(1, 2))
        assert lookup(c, t, "ok") == 2
        c.end_session("ok")
        w.close()


def test_registration_without_kv_layout_is_refused(server) -> None:
    from lmcache_rs.client import ShmKVCache  # noqa: PLC0415

    with server.client() as c:
        kv = ShmKVCache(1, 8, 16, 2, 32)
        with pytest.raises(ServerError, match="kv_layout"):
            c.register_kv_cache(77, kv.handles(), MODEL, 1, layout_hints={})
        kv.close()


def test_lookups_are_answered_while_transfers_queue(server) -> None:
    """A burst of stores from one client does not delay another client's lookups beyond the
    store in progress (separate pools); both clients get every reply."""
    with server.client() as a, server.client() as b:
        w = Worker(a, num_blocks=1024)
        t = tokens(8 * C, seed=12)
        uids = [a.send("store", w.key(t, f"s{i}"), w.instance_id, [blocks(1, 8)], b"") for i in range(20)]
        t0 = time.monotonic()
        assert lookup(b, tokens(C, seed=13), "other") == 0
        assert b.ping() is True
        lookup_latency = time.monotonic() - t0
        results = [a.recv(u) for u in uids]
        assert all(ok for _, ok in results)
        assert lookup_latency < 30  # answered, not starved (speed is measured in benches)
        w.close()


def test_scattered_and_reversed_block_ids_roundtrip(server) -> None:
    """Block ids in no order (vLLM reuses freed blocks anywhere): every run shape scatters right."""
    import random  # noqa: PLC0415

    with server.client() as c:
        w = Worker(c)
        t = tokens(2 * C, seed=50)
        src = blocks(1, 2)
        assert w.store(t, src)
        assert lookup(c, t, "r") == 2
        rng = random.Random(3)
        dst = rng.sample([b for b in range(100, 250) if not 200 <= b < 206], 2 * BPC)
        dst[3:9] = list(range(200, 206))  # one run of six inside the shuffle
        dst = [x for x in dst[:BPC]] + list(reversed(dst[BPC:]))
        assert len(set(dst)) == len(dst)
        assert w.retrieve(t, dst, "r", skip=16 + 3)
        got = w.kv.blocks_view(dst)
        want = w.kv.blocks_view(src)
        for g, e in zip(got, want, strict=True):
            assert torch.equal(g[:, 2:], e[:, 2:])  # blocks after the skipped ones
            assert torch.equal(g[:, 1, 3:], e[:, 1, 3:])  # the partially skipped block's tail
        c.end_session("r")
        w.close()


def test_cuda_handles_get_clear_answers_without_cuda(server) -> None:
    """A GPU worker registering with a server that sees no CUDA device learns why at once."""
    from lmcache_rs.protocol.messages import CudaHandle, CudaRawHandle, TensorMetadata  # noqa: PLC0415

    meta = TensorMetadata(dtype="bfloat16", shape=[2, 8, 16, 2, 32], stride=[8192, 1024, 64, 32, 1])
    shared = [0, b"\x01" * 64, 65536, 0, b"ref", 0, b"\x02" * 64, False]
    with server.client() as c:
        if not torch.cuda.is_available():
            with pytest.raises(ServerError) as e:
                c.register_kv_cache(
                    91, [CudaHandle(version=1, metadata=meta, storage_handle=shared)], MODEL, 1
                )
            assert e.value.code == "bad_registration"
            assert "no CUDA device" in e.value.message
        raw = CudaRawHandle(version=1, metadata=meta, ipc_handle=b"\0" * 64, alloc_offset=0, nbytes=65536)
        with pytest.raises(ServerError) as e:
            c.register_kv_cache(92, [raw], MODEL, 1)
        assert e.value.code == "bad_registration"
        assert "cuda_raw" in e.value.message
        assert c.noop() == "OK"
