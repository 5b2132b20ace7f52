"""engine/groups.py: object groups of hybrid (sliding-window) layouts, store selection, the
lookup fold and the retrieve plan, as pure functions."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from lmcache_rs.engine.groups import (
    FULL_ATTENTION,
    TAIL_ID_FLAG,
    Row,
    chunk_blocks,
    fold,
    lock_fold,
    needed,
    object_groups,
    read_plan,
    store_plan,
)
from lmcache_rs.transfer.gather import GroupLayout

C = 256
B = 16
BPC = C // B


def kernel(*layers: int, block: int = B) -> GroupLayout:
    return GroupLayout(tuple(layers), "NHD", 2, block, 2, 32, torch.float16)


def layout(windows: list[int], layers: list[tuple[int, ...]] | None = None, tags: list[int] | None = None):
    layers = layers or [(i,) for i in range(len(windows))]
    return object_groups(windows, tags or [0] * len(windows), [kernel(*ls) for ls in layers], C)


def test_plain_model_is_one_full_attention_group_of_whole_chunks() -> None:
    (og,) = layout([-1, -1], [(0, 2), (1, 3)])
    assert (og.id, og.window, og.span, og.tail_id) == (0, FULL_ATTENTION, 0, None)
    assert og.whole_rows == (BPC, BPC)
    assert og.whole_bytes == 2 * kernel(0, 1).chunk_bytes(C)


def test_one_group_per_window_full_first_then_by_window_and_first_layer() -> None:
    groups = layout([1024, -1, 128, 1024, 384, -1], [(5,), (0,), (3,), (1,), (2,), (4,)])
    assert [(og.id, og.window, og.engine_groups) for og in groups] == [
        (0, -1, (1, 5)),
        (1, 128, (2,)),
        (2, 384, (4,)),
        (3, 1024, (0, 3)),
    ]
    # Engine groups keep their declared order inside an object group (spec C.4).
    assert [k.layers for k in groups[3].kernels] == [(5,), (1,)]
    # Tags split groups of one window; 0 or below reads as full attention.
    assert [og.window for og in layout([512, 512, 0], tags=[0, 1, 0])] == [-1, 512, 512]


@pytest.mark.parametrize(
    ("window", "span", "whole", "tail"),
    [
        (128, 1, 8, None),  # shorter than a chunk: only each chunk's last 8 blocks
        (100, 1, 7, None),
        (256, 1, BPC, None),
        (384, 2, BPC, 8),  # the window's first chunk needs its last 128 tokens
        (512, 2, BPC, None),
        (1000, 4, BPC, 15),
        (4096, 16, BPC, None),
    ],
)
def test_window_rows(window: int, span: int, whole: int, tail: int | None) -> None:
    og = layout([-1, window])[1]
    assert (og.span, og.whole_rows, og.tail_rows) == (span, (whole,), None if tail is None else (tail,))
    assert og.tail_id == (None if tail is None else 1 | TAIL_ID_FLAG)
    assert og.first_rows == ((whole,) if tail is None else (tail,))


def vllm_table(first: int, n_tokens: int, window: int) -> list[int]:
    """Block ids of a sequence as vLLM holds them after computing `n_tokens`: blocks wholly
    out of the window are the null block (0)."""
    ids = list(range(first, first + n_tokens // B))
    skipped = max(n_tokens - window + 1, 0) // B if window > 0 else 0
    return [0] * skipped + ids[skipped:]


def plan(og, tables: list[list[int]], n: int) -> dict[int, list[int]]:
    blocks = [torch.tensor(t) for t in tables]
    return {b.object_group: b.chunks for b in store_plan(og, blocks, n, 0)}


@pytest.mark.parametrize(
    ("window", "whole", "tail"),
    [
        (512, [6, 7], []),
        (384, [7], [6]),  # chunk 6: blocks 96..103 null, its last 8 live: a tail object
        (128, [7], []),
        (-1, list(range(8)), []),
    ],
)
def test_store_keeps_only_live_blocks(window: int, whole: list[int], tail: list[int]) -> None:
    groups = layout([-1, window])
    og = groups[-1]
    got = plan(og, [vllm_table(1, 2048, -1), vllm_table(200, 2048, window)], 8)
    assert got.get(og.id, []) == whole
    assert got.get(og.tail_id or -1, []) == tail
    # A fully live table stores every chunk whole; an all-null one stores nothing.
    assert plan(og, [vllm_table(1, 2048, -1), list(range(200, 328))], 8) == {og.id: list(range(8))}
    assert plan(og, [[0] * 128, [0] * 128], 8) == {}


def test_store_needs_every_engine_group_of_an_object_group_live() -> None:
    og = layout([512, 512])[0]
    a = list(range(1, 129))
    b = list(range(200, 328))
    b[7 * BPC + 3] = 0
    assert plan(og, [a, b], 8) == {og.id: list(range(7))}


def test_chunk_blocks_are_the_chunks_last_rows() -> None:
    og = layout([-1, 128])[1]
    blocks = [torch.arange(100, 132), torch.arange(200, 232)]
    assert chunk_blocks(og, blocks, 1, og.whole_rows)[0].tolist() == list(range(224, 232))


def row(span: int, whole: str, tail: str = "") -> Row:
    return Row(span, [c == "x" for c in whole], [c == "x" for c in tail])


def test_fold_matches_the_measured_example() -> None:
    """Spec C.6 (window 512, chunks of 256): A (8 chunks) stored with its early sliding blocks
    null, B (4 chunks) fully stored."""
    full_a, win_a = row(0, "xxxxxxxx"), row(2, "......xx")
    assert fold(8, [full_a, win_a]) == 8
    assert fold(9, [row(0, "xxxxxxxx."), row(2, "......xx.")]) == 8  # A + one new chunk
    assert fold(4, [row(0, "xxxx"), row(2, "....")]) == 0  # A's first half
    assert fold(3, [row(0, "xxx"), row(2, "xxx")]) == 3  # B's first 3 chunks
    assert fold(8, [row(0, "xxxxxxxx"), row(2, "")]) == 0  # another salt


def test_fold_windows_shorter_and_with_tails() -> None:
    assert fold(8, [row(0, "xxxxxxxx"), row(1, ".......x")]) == 8
    assert fold(8, [row(0, "xxxxxxxx"), row(1, "....x...")]) == 5
    # Span 2 with tail objects: the window's first chunk may be a tail, the others not.
    assert fold(8, [row(0, "xxxxxxxx"), row(2, ".......x", "......x.")]) == 8
    assert fold(8, [row(0, "xxxxxxxx"), row(2, "......x.", ".....x..")]) == 7
    assert fold(8, [row(0, "xxxxxxxx"), row(2, ".......x", ".....x..")]) == 0  # a tail is no middle chunk
    # Shorter prefixes than the window need every chunk whole.
    assert fold(1, [row(3, ".", "x")]) == 0
    assert fold(2, [row(3, "xx")]) == 2
    # Full attention bounds everything; rows of several ranks must all serve.
    assert fold(8, [row(0, "xxxxx..."), row(2, "xxxxxxxx")]) == 5
    assert fold(8, [row(0, "xxxxxxxx"), row(2, "......xx"), row(2, ".....xx.")]) == 0


def serves_brute(r: Row, k: int) -> bool:
    if k == 0:
        return True
    if r.span == 0 or k < r.span:
        return all(r.has_whole(j) for j in range(k))
    first = k - r.span
    return r.has_tail(first) and all(r.has_whole(j) for j in range(first + 1, k))


def test_fold_against_brute_force() -> None:
    rng = random.Random(7)
    for _ in range(500):
        n = rng.randrange(0, 12)
        rows = [
            Row(
                span,
                [rng.random() < 0.7 for _ in range(rng.randrange(0, n + 1))],
                [rng.random() < 0.3 for _ in range(n)],
            )
            for span in rng.sample([0, 1, 2, 3, 5], rng.randrange(1, 4))
        ]
        want = max(k for k in range(n + 1) if all(serves_brute(r, k) for r in rows))
        assert fold(n, rows) == want
        for r in rows:  # what needed() returns is exactly resident and covers the window
            locks = needed(r, want)
            covered = sorted(itertools.chain.from_iterable(range(lo, hi) for _, lo, hi in locks))
            if want:
                first = 0 if r.span == 0 or want < r.span else want - r.span
                assert covered == list(range(first, want))
            for tail, lo, hi in locks:
                assert all(
                    (r.has_tail(j) and not r.has_whole(j)) if tail else r.has_whole(j) for j in range(lo, hi)
                )


def test_lock_fold_refolds_when_a_chunk_went_missing() -> None:
    rows = [row(2, "....xxxx")]
    gone = {(0, False, 7)}  # chunk 7 was evicted after its presence was read
    held: set[tuple[int, bool, int]] = set()

    def lock(t):
        i, tail, lo, hi = t
        n = 0
        for j in range(lo, hi):
            if (i, tail, j) in gone:
                break
            held.add((i, tail, j))
            n += 1
        return n

    def unlock(t):
        i, tail, lo, hi = t
        for j in range(lo, hi):
            held.remove((i, tail, j))

    hit, taken = lock_fold(8, rows, lock, unlock)
    assert hit == 7
    assert taken == [(0, False, 5, 7)]
    assert held == {(0, False, 5), (0, False, 6)}


@pytest.mark.parametrize(
    ("window", "c0", "c1", "want"),
    [
        (-1, 2, 5, [([2, 3, 4], BPC, False)]),
        (512, 0, 8, [([6, 7], BPC, False)]),
        (512, 7, 8, [([7], BPC, False)]),  # the engine holds chunk 6 itself
        (512, 0, 1, [([0], BPC, False)]),
        (384, 0, 8, [([6], 8, True), ([7], BPC, False)]),
        (128, 0, 8, [([7], 8, False)]),
        (1000, 0, 3, [([0, 1, 2], BPC, False)]),  # prefix shorter than the window: all whole
    ],
)
def test_read_plan_reads_only_the_window(window: int, c0: int, c1: int, want: list) -> None:
    og = layout([-1, window])[-1]
    got = [(r.chunks, r.rows[0], r.first_of_window) for r in read_plan(og, c0, c1)]
    assert got == want
