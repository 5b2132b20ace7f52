"""Forced clears of L1 racing transfers never hand a worker another chunk's KV (issue 14).

A force clear drops every object at once, including ones a transfer is still copying into or
out of. Their bytes must not go to a new object until that transfer is over: a retrieve that
was promised a chunk copies that chunk's bytes, and a writer still copying in after a clear
never lands in another object's bytes. The server runs WITHOUT --verify-checksums: wrong KV must
be prevented, not caught.

- `test_forced_clears_never_serve_wrong_kv`: 8 worker processes (both transfer modes) sharing
  prefixes in a small L1 (constant eviction) while a clearer clears every 20-50 ms through
  `POST /clear-cache`, `POST /cache/clear` and the ZMQ `clear` op (forced, and some not).
  LMCACHE_RS_STRESS_SECONDS sets the duration (default 10 s).
- One deterministic test per mechanism that can be driven from outside (engine-driven: the
  worker's copy out after prepare_retrieve, its copy in after prepare_store). The third, a
  clear during the server's own copy (lmcache-driven), is only reached by the stress test.
"""

from __future__ import annotations

import httpx
import pytest
from kvsim import Worker, lookup, tokens
from kvstress import (
    CALL_TIMEOUT,
    CHUNK_BYTES,
    CLEAR_CYCLE,
    DST_BLOCK,
    SRC_BLOCK,
    Clearer,
    ClearPath,
    EngineDrivenSim,
    blocks,
    clear_l1,
    ed_key,
    exact_chunks,
    run_workers,
    seconds_from_env,
    wipe,
    write_chunks,
)

from lmcache_rs import chunk_hashes
from lmcache_rs.client import MPClient, ServerError
from lmcache_rs.protocol.messages import ShmSlot

SECONDS = seconds_from_env(10)
#: The stress test's L1: 24 chunks, while 8 workers store up to 6 each (half of them shared).
STRESS_L1_CHUNKS = 24
#: The targeted tests' L1: 32 chunks, of which they use at most 10 (below the eviction watermark).
TARGETED_L1_CHUNKS = 32
#: How many other chunks a targeted test stores after the clear, hunting for the cleared slot.
OTHER_STORES = 8
#: Engine-driven workers wait up to this long between a prepare and their copy (as a busy
#: engine does), so that clears land inside their transfers often.
DAWDLE_S = 0.005
FORCE_PATHS: list[ClearPath] = ["clear-cache", "cache/clear", "zmq"]


def l1_gb(chunks: int) -> str:
    return str(chunks * CHUNK_BYTES / (1 << 30))


def test_forced_clears_never_serve_wrong_kv(server_factory) -> None:
    s = server_factory("--l1-size-gb", l1_gb(STRESS_L1_CHUNKS))
    clearer = Clearer(s.http, s.url, seed=3)
    try:
        total, codes = run_workers(s.url, SECONDS, dawdle_s=DAWDLE_S, on_start=clearer.start)
    finally:
        clears = clearer.stop()
    print("workers:", dict(sorted(total.items())))
    print("clearer:", dict(sorted(clears.items())))
    evicted = [
        line
        for line in httpx.get(s.http + "/metrics", timeout=CALL_TIMEOUT).text.splitlines()
        if line.startswith("lmcache_mp_l1_evicted_chunks_total")
    ]
    print("metrics:", evicted)
    summary = {**total, **{f"clearer {k}": v for k, v in clears.items()}}
    assert not [k for k in summary if "CRASHED" in k], summary
    assert total["MISSING_WORKER_REPORTS"] == 0, summary
    assert total["WRONG_chunks"] == 0, (
        f"{total['WRONG_chunks']} of {total['checked_chunks']} chunks retrieved ok held another "
        f"chunk's bytes: {summary}"
    )
    assert total["UNANSWERED"] + clears["UNANSWERED"] == 0, summary
    assert clears["CLEAR_FAILED"] == 0, summary
    assert codes == [0] * 8, (codes, summary)
    # Liveness: the load ran in both modes, retrieves succeeded, every clear path cleared.
    assert total["exact_chunks"] > 0, summary
    assert total["engine_driven_requests"] > 0, summary
    assert total["lmcache_driven_requests"] > 0, summary
    for path, force in set(CLEAR_CYCLE):
        assert clears[f"clear:{path}:{'force' if force else 'soft'}"] > 0, summary
    with MPClient(s.url, timeout=CALL_TIMEOUT) as c:
        assert c.noop() == "OK"


# ---- one deterministic test per mechanism ------------------------------------------------------


def overlaps(a: ShmSlot, b: ShmSlot) -> bool:
    return a.offset < b.offset + b.length and b.offset < a.offset + a.length


def store_others(c: MPClient, other: EngineDrivenSim, slot: ShmSlot) -> list[tuple[list[int], int]]:
    """Stores one-chunk prompts of other KV through `other` (prepare, copy in, commit), up to
    OTHER_STORES or until one is given a slot over `slot`. Returns (tokens, offset) of each."""
    stored = []
    for i in range(OTHER_STORES):
        t = tokens(256, seed=1000 + i)
        write_chunks(other.layers, chunk_hashes(t), blocks(SRC_BLOCK, 1))
        key = ed_key(t, f"other-{i}")
        ctx = c.prepare_store(key, other.instance_id)
        (got,) = ctx.slots
        other.w.write_slots(ctx.slots, ctx.chunk_indices, blocks(SRC_BLOCK, 1))
        assert c.commit_store(key, other.instance_id)
        stored.append((t, got.offset))
        if overlaps(got, slot):
            break
    return stored


@pytest.mark.parametrize("path", FORCE_PATHS)
def test_copy_out_after_a_forced_clear_reads_the_prepared_chunk(server_factory, path: ClearPath) -> None:
    """Engine-driven retrieve: prepare_retrieve, then a force clear, then stores of other chunks
    (which take free slots), then the worker copies out of the slot it was given: it must read
    the chunk it was promised, not one stored after the clear."""
    s = server_factory("--l1-size-gb", l1_gb(TARGETED_L1_CHUNKS))
    with (
        s.client(CALL_TIMEOUT) as c,
        s.client(CALL_TIMEOUT) as c2,
        httpx.Client(base_url=s.http, timeout=CALL_TIMEOUT) as http,
    ):
        reader, other = EngineDrivenSim(c, 1), EngineDrivenSim(c2, 2)
        x = tokens(256, seed=1)
        hx = chunk_hashes(x)
        write_chunks(reader.layers, hx, blocks(SRC_BLOCK, 1))
        assert reader.store(x, blocks(SRC_BLOCK, 1), "x")
        assert lookup(c, x, "r") == 1
        reply = c.prepare_retrieve(ed_key(x, "r", end=256), reader.instance_id)
        assert reply.success
        (slot,) = reply.context.slots

        assert clear_l1(path, True, http, c2)
        stored = store_others(c2, other, slot)

        dst = blocks(DST_BLOCK, 1)
        wipe(reader.layers, dst)
        reader.w.read_slots(reply.context.slots, dst)
        c.commit_retrieve(ed_key(x, "r", end=256), reader.instance_id)
        exact = exact_chunks(reader.layers, hx, dst) == 1
        assert exact, (
            f"the copy out of slot {slot.offset} (prepared before a force clear through {path}) read "
            f"another chunk's bytes; other chunks stored after the clear took offsets "
            f"{[off for _, off in stored]}"
        )
        c.end_session("r")
        reader.close()
        other.close()


@pytest.mark.parametrize("path", FORCE_PATHS)
def test_copy_in_after_a_forced_clear_never_lands_in_another_chunk(server_factory, path: ClearPath) -> None:
    """Engine-driven store: prepare_store, then a force clear, then stores of other chunks, then
    the first writer copies into the slot it was given and commits (refused: its object was
    dropped). Every chunk served afterwards, with no clear in between, is exactly its own KV."""
    s = server_factory("--l1-size-gb", l1_gb(TARGETED_L1_CHUNKS))
    with (
        s.client(CALL_TIMEOUT) as c,
        s.client(CALL_TIMEOUT) as c2,
        s.client(CALL_TIMEOUT) as c3,
        httpx.Client(base_url=s.http, timeout=CALL_TIMEOUT) as http,
    ):
        late, other = EngineDrivenSim(c, 1), EngineDrivenSim(c2, 2)
        reader = Worker(c3, num_blocks=2 * DST_BLOCK)  # lmcache-driven: the server copies out
        x = tokens(256, seed=1)
        write_chunks(late.layers, chunk_hashes(x), blocks(SRC_BLOCK, 1))
        kx = ed_key(x, "x")
        ctx = c.prepare_store(kx, late.instance_id)
        (slot,) = ctx.slots

        assert clear_l1(path, True, http, c2)
        stored = store_others(c2, other, slot)

        late.w.write_slots(ctx.slots, ctx.chunk_indices, blocks(SRC_BLOCK, 1))
        try:
            committed = c.commit_store(kx, late.instance_id)
        except ServerError as e:
            committed = e.code != "not_stored"
        assert not committed, "a store whose object a force clear dropped was committed"

        wrong = []
        for i, (t, off) in enumerate([*stored, (x, slot.offset)]):
            rid = f"check-{i}"
            hit = lookup(c3, t, rid)
            if hit:
                dst = blocks(DST_BLOCK, 1)
                wipe(reader.kv.layers, dst)
                assert reader.retrieve(t, dst, rid, end=256)
                if not exact_chunks(reader.kv.layers, chunk_hashes(t), dst):
                    wrong.append(off)
            c3.end_session(rid)
        assert not wrong, (
            f"chunks stored after a force clear through {path} at offsets {wrong} were served with "
            f"the bytes a writer prepared before the clear copied into slot {slot.offset} afterwards"
        )
        # Not vacuous: the other chunks were all still in L1 to be checked.
        assert all(lookup(c3, t, f"again-{i}") == 1 for i, (t, _) in enumerate(stored))
        late.close()
        other.close()
        reader.close()
