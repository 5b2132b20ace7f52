"""Object groups of a registered KV layout: hybrid models with sliding-window layers (spec C.4,
C.6, D.1, D.2).

vLLM registers a hybrid model's layers as several engine KV groups, each with its own block
table and `sw_size_tokens` (-1: full attention, else the window in tokens). Once a sequence is
longer than a window, vLLM frees that group's blocks that fell out of the window and passes the
null block for them. Stored as one object per chunk over all groups, such a chunk would carry
the null block's bytes and a later lookup would serve them (spec C.6: wrong KV). So:

* **One object group per distinct window** (and `extra_object_group_tag`), always: group 0 is
  full attention, the others follow by window, then first layer. Its objects are keyed with
  its id (`KeyScope.object_group`) and hold the concatenation over its kernel groups (the
  engine groups sharing the window, in declared order) of `[kv, layers, rows, BS, hidden]`.
* A window of w tokens needs, for a prefix of k chunks, the last w tokens: chunks
  `[k - span, k)` with `span = ceil(w / chunk)`, of which the first only its last
  `r = w - (span - 1) * chunk` tokens ("the tail"). A window shorter than a chunk (span 1)
  therefore only ever needs each chunk's tail: its objects hold the last `ceil(w / block)`
  blocks. A longer window stores whole chunks, and when `r` is shorter than a chunk also
  *tail objects* (id `group | TAIL_ID_FLAG`): the tail of a chunk whose earlier blocks were
  already null, which can serve only as the first chunk of a window.
* **Store** keeps, per group, a chunk whose blocks in the object's rows are all live; a
  partly null chunk is kept as a tail object when its tail is live; anything else is skipped.
  An object never holds a null block's bytes.
* **Lookup** folds per-row presence (row = object group x kv rank): full attention needs every
  chunk of the prefix, a window only its last chunks; it runs natively on the request I/O
  thread (rust/control/groups.rs), which leases exactly the chunks (and kinds) each row needs.
* **Retrieve** reads, per group, only the chunks the window of the retrieved prefix covers and
  of the first of them only the tail rows (`first_rows`), so it writes only in-window blocks;
  the plan is made in Rust by `ControlPlane.read_start` (rust/control/data.rs `read_plan`).

The functions here are pure (no index, no I/O); the data services (lmcache_driven.py) plan
stores with them before their one call into the core, and `contexts.control_layout` hands the
lookup and `ControlPlane.read_start` what they need of a layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmcache_rs.transfer.gather import GroupLayout

#: `sw_size_tokens` of a full-attention group (any value <= 0 reads as full attention).
FULL_ATTENTION = -1
#: Added to a windowed group's id to key its tail objects (object group ids are u32 in keys).
TAIL_ID_FLAG = 1 << 16


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ObjectGroup:
    """The engine groups sharing one window, stored as one kind of chunk object."""

    id: int
    #: Window in tokens; FULL_ATTENTION for full attention.
    window: int
    tag: int
    #: Positions of its engine groups in the registration (and in a request's `block_ids`).
    engine_groups: tuple[int, ...]
    #: Their layouts (the kernel groups), in declared order.
    kernels: tuple[GroupLayout, ...]
    chunk_tokens: int
    #: Blocks per kernel group a whole object holds (the chunk's last ones).
    whole_rows: tuple[int, ...]
    #: Blocks per kernel group a tail object holds; None: this group has no tail objects.
    tail_rows: tuple[int, ...] | None = None
    engine_group_ids: tuple[int, ...] = field(default=())

    @property
    def windowed(self) -> bool:
        return self.window != FULL_ATTENTION

    @property
    def span(self) -> int:
        """Chunks the window of a prefix covers (0: every chunk, full attention)."""
        return _ceil_div(self.window, self.chunk_tokens) if self.windowed else 0

    @property
    def tail_id(self) -> int | None:
        return None if self.tail_rows is None else self.id | TAIL_ID_FLAG

    @property
    def first_rows(self) -> tuple[int, ...]:
        """Blocks per kernel group of the window's first chunk that a retrieve writes."""
        return self.whole_rows if self.tail_rows is None else self.tail_rows

    def nbytes(self, rows: Sequence[int]) -> int:
        return sum(k.rows_bytes(r) for k, r in zip(self.kernels, rows, strict=True))

    @property
    def whole_bytes(self) -> int:
        return self.nbytes(self.whole_rows)

    @property
    def tail_bytes(self) -> int:
        return 0 if self.tail_rows is None else self.nbytes(self.tail_rows)

    def bpc(self, k: int) -> int:
        """Blocks per chunk of kernel group `k`."""
        return self.chunk_tokens // self.kernels[k].block_size

    def status(self) -> dict[str, Any]:
        return {
            "object_group_idx": self.id,
            "sliding_window_tokens": self.window,
            "window_chunks": self.span,
            "engine_group_ids": list(self.engine_group_ids),
            "layer_indices": sorted(li for k in self.kernels for li in k.layers),
            "blocks_per_object": list(self.whole_rows),
            "bytes_per_object": self.whole_bytes,
            "tail_object_group_idx": self.tail_id,
            "tail_blocks_per_object": None if self.tail_rows is None else list(self.tail_rows),
            "tail_bytes_per_object": self.tail_bytes,
        }

    def signature(self) -> tuple[int, int, int, int]:
        """What every worker of one (model, world) must agree on."""
        return (self.id, self.window, self.whole_bytes, self.tail_bytes)


ObjectLayout = tuple[ObjectGroup, ...]


def object_groups(
    windows: Sequence[int],
    tags: Sequence[int],
    kernels: Sequence[GroupLayout],
    chunk_tokens: int,
    engine_group_ids: Sequence[int] | None = None,
) -> ObjectLayout:
    """The object groups of a registration whose engine group i has window `windows[i]`
    (<= 0: full attention), tag `tags[i]` and layout `kernels[i]`."""
    ids = list(engine_group_ids) if engine_group_ids is not None else list(range(len(kernels)))
    by_key: dict[tuple[int, int], list[int]] = {}
    for i, (w, tag) in enumerate(zip(windows, tags, strict=True)):
        by_key.setdefault((FULL_ATTENTION if w <= 0 else w, tag), []).append(i)

    def order(item: tuple[tuple[int, int], list[int]]) -> tuple[bool, int, int, int]:
        (w, tag), members = item
        return (w != FULL_ATTENTION, w, min(kernels[i].layers[0] for i in members), tag)

    out: list[ObjectGroup] = []
    for gid, ((w, tag), members) in enumerate(sorted(by_key.items(), key=order)):
        ks = tuple(kernels[i] for i in members)
        bpc = [chunk_tokens // k.block_size for k in ks]
        whole = tuple(bpc)
        tail: tuple[int, ...] | None = None
        if w != FULL_ATTENTION:
            span = _ceil_div(w, chunk_tokens)
            r = w - (span - 1) * chunk_tokens  # tokens of the window's first chunk, in (0, chunk]
            t = tuple(min(b, _ceil_div(r, k.block_size)) for b, k in zip(bpc, ks, strict=True))
            if span == 1:
                whole = t  # every chunk is the first of its window: keep its tail only
            elif t != whole:
                tail = t
        out.append(
            ObjectGroup(
                id=gid,
                window=w,
                tag=tag,
                engine_groups=tuple(members),
                kernels=ks,
                chunk_tokens=chunk_tokens,
                whole_rows=whole,
                tail_rows=tail,
                engine_group_ids=tuple(ids[i] for i in members),
            )
        )
    return tuple(out)


# ---- store ------------------------------------------------------------------------------------


def chunk_blocks(
    og: ObjectGroup, blocks: Sequence[torch.Tensor], i: int, rows: Sequence[int]
) -> list[torch.Tensor]:
    """Per kernel group of `og`, the ids of chunk `i`'s last `rows[k]` blocks (`blocks`: one
    id tensor per engine group of the registration, covering the request's range)."""
    out = []
    for k, (e, r) in enumerate(zip(og.engine_groups, rows, strict=True)):
        end = (i + 1) * og.bpc(k)
        out.append(blocks[e][end - r : end])
    return out


@dataclass(frozen=True)
class StoreBatch:
    """Chunks of a store that go to one kind of object of one group."""

    group: ObjectGroup
    object_group: int
    rows: tuple[int, ...]
    chunks: list[int]

    @property
    def nbytes(self) -> int:
        return self.group.nbytes(self.rows)


def store_plan(
    og: ObjectGroup, blocks: Sequence[torch.Tensor], n: int, null_block_id: int
) -> list[StoreBatch]:
    """Which of the `n` chunks of a store `og` keeps, and as which kind of object: whole when
    every block of the object's rows is live, else (groups with tail objects) a tail object
    when the tail is; a chunk with a null block in what it would hold is skipped."""
    whole = torch.ones(n, dtype=torch.bool)
    tail = torch.ones(n, dtype=torch.bool)
    tail_rows = og.tail_rows or og.whole_rows
    for k, (e, wr, tr) in enumerate(zip(og.engine_groups, og.whole_rows, tail_rows, strict=True)):
        bpc = og.bpc(k)
        live = blocks[e][: n * bpc].view(n, bpc) != null_block_id
        whole &= live[:, bpc - wr :].all(dim=1)
        tail &= live[:, bpc - tr :].all(dim=1)
    out = [StoreBatch(og, og.id, og.whole_rows, whole.nonzero().flatten().tolist())]
    if og.tail_rows is not None and og.tail_id is not None:
        out.append(StoreBatch(og, og.tail_id, og.tail_rows, (tail & ~whole).nonzero().flatten().tolist()))
    return [b for b in out if b.chunks]
