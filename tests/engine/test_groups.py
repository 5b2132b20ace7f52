"""engine/groups.py: object groups of hybrid (sliding-window) layouts and store selection, as pure
functions (the lookup fold is tested in rust/control/groups.rs, the retrieve plan in
rust/control/data/tests.rs)."""

from __future__ import annotations

import pytest
import torch

from lmcache_rs.engine.contexts import control_layout
from lmcache_rs.engine.groups import (
    FULL_ATTENTION,
    TAIL_ID_FLAG,
    chunk_blocks,
    object_groups,
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


@pytest.mark.parametrize(
    ("window", "span", "tail", "whole_rows", "first_rows"),
    [
        (-1, 0, False, BPC, BPC),
        (512, 2, False, BPC, BPC),  # a window of whole chunks: no tail objects
        (384, 2, True, BPC, 8),  # its first chunk: only the last 8 blocks, from a tail object
        (128, 1, False, 8, 8),  # shorter than a chunk: every chunk's last 8 blocks
        (1000, 4, True, BPC, 15),
    ],
)
def test_a_retrieve_is_planned_from_the_span_the_tail_and_the_rows(
    window: int, span: int, tail: bool, whole_rows: int, first_rows: int
) -> None:
    """What `ControlPlane.read_start` plans a window's reads from (`control_layout`: id, tail
    id, span; rust/control/data/tests.rs checks the plan for these spans), and the blocks the
    retrieve writes of a whole chunk and of the window's first."""
    og = layout([-1, window])[-1]
    assert control_layout([og]) == [(og.id, og.tail_id, span)]
    assert (og.tail_id is not None) == tail
    assert (og.whole_rows[0], og.first_rows[0]) == (whole_rows, first_rows)
