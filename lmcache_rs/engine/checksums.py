"""Checksums of a registered worker's paged KV blocks (`POST /cache/checksums`, `GET
/kvcache/check`, spec I.1): for debugging KV corruption, e.g. comparing a worker's blocks
after a store with the same blocks after a retrieve into other blocks.

The blocks (`block_ids`, in the order given) are taken `chunk_size` at a time (the last group
may be shorter). Each group's digest is the MD5 of, for every KV layer in registration order,
the layer's blocks of that group gathered along its block axis into a dense row-major tensor
(`[2, n, ...]` for K/V layouts, `[n, block_size, dim]` for MLA); `layerwise` gives one digest
per layer instead. This is LMCache's definition, including its one quirk: bfloat16 layers are
hashed as float32 values (torch cannot hand bfloat16 to numpy), so digests match LMCache's
for the same memory. Other dtypes are hashed as their raw bytes.

Only workers whose KV memory this server has mapped can be read: lmcache-driven ones (CPU
shared memory or CUDA IPC). An engine-driven worker copies chunks itself; its KV never leaves
its process.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Literal

import torch

from lmcache_rs.engine.contexts import EngineDrivenContext, KVContext

if TYPE_CHECKING:
    from lmcache_rs.engine.contexts import ContextRegistry

#: Most block ids one call may name, ranges expanded (LMCache stages at most 1M ids).
MAX_BLOCK_IDS = 1 << 20

#: A block id item: an id, or an inclusive range [first, last].
BlockItem = int | list[int]

Failure = Literal["bad_request", "not_found", "unreadable"]

_ITEM = re.compile(r"\[(\d{1,19}),(\d{1,19})\]|(\d{1,19})")


class ChecksumError(Exception):
    """Why checksums cannot be computed; `kind` picks the HTTP code (400, 404, 501)."""

    def __init__(self, kind: Failure, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def parse_block_ids(spec: str | list[BlockItem]) -> list[int]:
    """The block ids of `"0,[2,5],8"` (LMCache's query form) or of `[0, [2, 5], 8]`: ints and
    inclusive ranges, in order. Raises ChecksumError (bad_request) on anything else."""
    items: list[tuple[int, int]] = []
    if isinstance(spec, str):
        text = "".join(spec.split())
        if not text:
            raise ChecksumError("bad_request", "block_ids is required")
        pos = 0
        while pos < len(text):
            m = _ITEM.match(text, pos)
            if m is None:
                raise ChecksumError(
                    "bad_request",
                    f"block_ids: expected an id or [first,last] at {text[pos : pos + 20]!r} (e.g. 0,[2,5],8)",
                )
            if m.group(3) is not None:
                items.append((int(m.group(3)), int(m.group(3))))
            else:
                items.append((int(m.group(1)), int(m.group(2))))
            pos = m.end()
            if pos < len(text):
                if text[pos] != ",":
                    raise ChecksumError("bad_request", f"block_ids: expected ',' at {text[pos : pos + 20]!r}")
                pos += 1
                if pos == len(text):
                    raise ChecksumError("bad_request", "block_ids: trailing ','")
    else:
        for item in spec:
            if isinstance(item, int):
                items.append((item, item))
            elif len(item) == 2:
                items.append((item[0], item[1]))
            else:
                raise ChecksumError("bad_request", f"block_ids: a range is [first, last], got {item}")
    if not items:
        raise ChecksumError("bad_request", "block_ids is required")
    total = 0
    for a, b in items:
        if a < 0 or b < 0:
            raise ChecksumError("bad_request", "block_ids: ids are >= 0")
        if a > b:
            raise ChecksumError("bad_request", f"block_ids: range [{a},{b}] has first > last")
        total += b - a + 1
        if total > MAX_BLOCK_IDS:
            raise ChecksumError("bad_request", f"block_ids: more than {MAX_BLOCK_IDS} blocks")
    return [i for a, b in items for i in range(a, b + 1)]


def compress(ids: list[int]) -> list[BlockItem]:
    """LMCache's compact form of a block list: runs of 3 or more consecutive ids as [first,
    last], others as single ids (`[0, [2, 5], 8]`)."""
    out: list[BlockItem] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        if j - i >= 2:
            out.append([ids[i], ids[j]])
        else:
            out.extend(ids[i : j + 1])
        i = j + 1
    return out


def _block_axis(t: torch.Tensor) -> int:
    return 1 if t.dim() == 5 else 0  # [2, NB, ...] (NHD, HND) or MLA [NB, BS, D]


def _bytes(t: torch.Tensor) -> bytes:
    t = t.cpu()
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)  # LMCache's digests: bfloat16 hashed as float32
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _context(contexts: ContextRegistry, instance_id: int) -> KVContext:
    # Not `contexts.get`: reading a worker's blocks is no sign of its liveness.
    ctx = next((c for c in contexts.all() if c.instance_id == instance_id), None)
    if ctx is None:
        raise ChecksumError("not_found", f"instance_id {instance_id} is not registered")
    if isinstance(ctx, EngineDrivenContext):
        raise ChecksumError(
            "unreadable",
            f"instance_id {instance_id} is an engine-driven worker: it copies its KV into L1 itself "
            "and this server never maps its KV cache, so it cannot read its blocks (lmcache-driven "
            "workers only)",
        )
    return ctx


def block_checksums(
    contexts: ContextRegistry, instance_id: int, block_ids: list[int], chunk_size: int, layerwise: bool
) -> list[str] | dict[str, list[str]]:
    """MD5 per group of `chunk_size` blocks of the worker's KV (see the module doc)."""
    if chunk_size <= 0:
        raise ChecksumError("bad_request", "chunk_size must be a positive number of blocks")
    ctx = _context(contexts, instance_id)
    bad = next((b for b in block_ids if b >= ctx.num_blocks), None)
    if bad is not None:
        raise ChecksumError("bad_request", f"block id {bad} out of range [0, {ctx.num_blocks})")
    layers = ctx.layer_tensors
    device = layers[0].device  # registration keeps every layer on one device
    per_layer: list[list[str]] = [[] for _ in layers]
    whole: list[str] = []
    for start in range(0, len(block_ids), chunk_size):
        group = torch.tensor(block_ids[start : start + chunk_size], dtype=torch.int64, device=device)
        md5 = hashlib.md5()
        for li, t in enumerate(layers):
            data = _bytes(t.index_select(_block_axis(t), group))
            if layerwise:
                per_layer[li].append(hashlib.md5(data).hexdigest())
            else:
                md5.update(data)
        if not layerwise:
            whole.append(md5.hexdigest())
    if layerwise:
        return {f"layer_{i}": d for i, d in enumerate(per_layer)}
    return whole
