"""Paged KV blocks <-> one contiguous chunk object (spec C.4).

An object holds, for each kernel group of its object group in order, a dense row-major tensor
`[kv_size, layers_in_group, rows, block_size, hidden]` (K plane then V plane; MLA has one plane):
`rows` blocks of the chunk, its last ones. A plain object holds every block of the chunk
(`rows * block_size = chunk_tokens`); a sliding-window group's object may hold only the chunk's
last blocks (engine/groups.py says which). Engine layouts per layer: NHD `[2, NB, BS, H, D]`
(vLLM flash-attn), HND `[2, NB, H, BS, D]`, MLA `[NB, BS, D]`. Copies are torch ops: one
`index_select` per layer and plane to gather, one slice copy per run of consecutive block ids
to scatter; no Python loops over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupLayout:
    """The layers of one KV group and how their tensors are laid out."""

    layers: tuple[int, ...]
    fmt: str  # "NHD", "HND" or "MLA"
    kv_size: int
    block_size: int
    heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    def chunk_bytes(self, chunk_tokens: int) -> int:
        return self.rows_bytes(chunk_tokens // self.block_size)

    def rows_bytes(self, rows: int) -> int:
        """Bytes of `rows` blocks of every layer of the group."""
        return self.kv_size * len(self.layers) * rows * self.block_size * self.hidden * self.dtype.itemsize

    def plane(self, tensor: torch.Tensor, kv: int) -> torch.Tensor:
        """One K or V plane of a layer tensor, as `[NB, BS, H, D]` token-major (a view for NHD)."""
        if self.fmt == "NHD":
            return tensor[kv]
        if self.fmt == "HND":
            return tensor[kv].transpose(1, 2)
        return tensor.unsqueeze(2)  # MLA [NB, BS, D] -> [NB, BS, 1, D]

    def dest(self, chunk: torch.Tensor, rows: int) -> torch.Tensor:
        """The group's bytes of an object holding `rows` blocks, as `[kv, L, rows, BS, H, D]`."""
        return chunk.view(self.dtype).view(
            self.kv_size, len(self.layers), rows, self.block_size, self.heads, self.head_dim
        )


@dataclass(frozen=True)
class ObjectCopy:
    """One object's copy between its L1 bytes `obj` and paged blocks.

    `blocks[k]` are the engine block ids of the chunk's last `len(blocks[k])` blocks in kernel
    group `groups[k]`; the object holds the chunk's last `rows[k]` blocks (>= that many), so
    the blocks map onto the object's last rows. `skip_tokens` (retrieve): token positions of
    the chunk, counted from its start, that are left untouched."""

    groups: Sequence[GroupLayout]
    blocks: Sequence[torch.Tensor]
    obj: torch.Tensor
    rows: Sequence[int]
    skip_tokens: int = 0

    @property
    def nbytes(self) -> int:
        return sum(g.rows_bytes(r) for g, r in zip(self.groups, self.rows, strict=True))


def gather(c: ObjectCopy, layer_tensors: list[torch.Tensor], chunk: torch.Tensor | None = None) -> None:
    """Copies the paged blocks of `c` into the uint8 `chunk` (default: the object itself).
    Every row of the object is written: `len(c.blocks[k]) == c.rows[k]`."""
    chunk = c.obj if chunk is None else chunk
    pos = 0
    for g, block_ids, rows in zip(c.groups, c.blocks, c.rows, strict=True):
        if len(block_ids) != rows:
            raise ValueError(f"gather: {len(block_ids)} blocks for an object of {rows} rows")
        size = g.rows_bytes(rows)
        dest = g.dest(chunk[pos : pos + size], rows)
        for li, layer in enumerate(g.layers):
            for kv in range(g.kv_size):
                src = g.plane(layer_tensors[layer], kv)
                if g.fmt == "NHD":
                    torch.index_select(src, 0, block_ids, out=dest[kv, li])
                else:
                    dest[kv, li].copy_(src.index_select(0, block_ids))
        pos += size


def block_runs(ids: list[int], rows: list[int]) -> list[tuple[int, int, int]]:
    """`(first block, first row, length)` runs where block ids and chunk rows both advance by
    one: each run is one slice copy. (`index_copy_` is 4-6x slower than a slice copy on CPU,
    and vLLM hands out block ids mostly in runs.)"""
    runs: list[tuple[int, int, int]] = []
    for b, r in zip(ids, rows, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == b and runs[-1][1] + runs[-1][2] == r:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((b, r, 1))
    return runs


def scatter(
    c: ObjectCopy,
    layer_tensors: list[torch.Tensor],
    chunk_tokens: int,
    null_block_id: int,
    chunk: torch.Tensor | None = None,
) -> None:
    """Copies the object (or `chunk`, a copy of it) back into the paged blocks of `c`, leaving
    null blocks and the chunk's first `c.skip_tokens` token positions untouched."""
    chunk = c.obj if chunk is None else chunk
    pos = 0
    for g, block_ids, obj_rows in zip(c.groups, c.blocks, c.rows, strict=True):
        size = g.rows_bytes(obj_rows)
        src_all = g.dest(chunk[pos : pos + size], obj_rows)
        pos += size
        ids = block_ids.tolist()
        if len(ids) > obj_rows:
            raise ValueError(f"scatter: {len(ids)} blocks from an object of {obj_rows} rows")
        first_row = obj_rows - len(ids)  # the object row of ids[0]
        # Block index (in the chunk) of ids[0], to place the skipped token positions.
        first_block = chunk_tokens // g.block_size - len(ids)
        full, partial = divmod(c.skip_tokens, g.block_size)
        full -= first_block
        partial_row = None
        if partial and 0 <= full < len(ids) and ids[full] != null_block_id:
            partial_row = (ids[full], first_row + full)
        first = max(full + (1 if partial else 0), 0)
        kept = [(b, first_row + r) for r, b in enumerate(ids) if r >= first and b != null_block_id]
        runs = block_runs([b for b, _ in kept], [r for _, r in kept])
        for li, layer in enumerate(g.layers):
            for kv in range(g.kv_size):
                dst = g.plane(layer_tensors[layer], kv)
                src = src_all[kv, li]
                for b, r, n in runs:
                    dst[b : b + n].copy_(src[r : r + n])
                if partial_row is not None:
                    b, r = partial_row
                    dst[b, partial:].copy_(src[r, partial:])
