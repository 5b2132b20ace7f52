"""A vLLM-like paged KV cache in POSIX shared memory, for CPU workers, tests and benchmarks.

One segment per layer (`/lmcache_kv_<pid>_<n>`), each holding a `[2, NB, BS, H, D]` (NHD)
tensor; `handles()` describes them as `cpu_shm` KV handles for register_kv_cache. With
`storage_of`, several layers view one segment, as vLLM lays out hybrid models (Gemma-3 style:
the layers of different KV groups share a tensor and use disjoint block ids).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from multiprocessing import shared_memory

import torch

from lmcache_rs.protocol.messages import CpuShmHandle, TensorMetadata

_seq = itertools.count()


def paged_shape(layout: str, num_blocks: int, block_size: int, heads: int, head_dim: int) -> tuple[int, ...]:
    """One layer's paged KV tensor shape as vLLM lays it out: NHD `[2, NB, BS, H, D]` (flash
    attention), HND `[2, NB, H, BS, D]`, MLA `[NB, BS, D]`."""
    if layout == "NHD":
        return (2, num_blocks, block_size, heads, head_dim)
    if layout == "HND":
        return (2, num_blocks, heads, block_size, head_dim)
    if layout == "MLA":
        return (num_blocks, block_size, head_dim)
    raise ValueError(f"unknown layout {layout!r}")


def tensor_metadata(t: torch.Tensor, device_uuid: str) -> TensorMetadata:
    """Where a layer's view sits in its storage, as a KV handle describes it."""
    return TensorMetadata(
        dtype=str(t.dtype).removeprefix("torch."),
        shape=list(t.shape),
        stride=list(t.stride()),
        storage_offset=int(t.storage_offset()),
        device_uuid=device_uuid,
    )


def select_blocks(layers: list[torch.Tensor], layout: str, block_ids: list[int]) -> list[torch.Tensor]:
    """Per layer, a CPU copy of the given paged blocks, for byte-exact comparisons."""
    dim = 0 if layout == "MLA" else 1
    return [t.index_select(dim, torch.tensor(block_ids, device=t.device)).cpu() for t in layers]


class ShmKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float16,
        layout: str = "NHD",
        storage_of: list[int] | None = None,
    ) -> None:
        """`storage_of[layer]`: the segment the layer views (default: one segment per layer)."""
        shape = paged_shape(layout, num_blocks, block_size, num_heads, head_dim)
        self.layout = layout
        self.shape = shape
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        item = torch.empty((), dtype=dtype).element_size()
        nbytes = item
        for n in shape:
            nbytes *= n
        self.nbytes = nbytes
        self._segments: list[shared_memory.SharedMemory] = []
        self.layers: list[torch.Tensor] = []
        self.storage_of = list(range(num_layers)) if storage_of is None else list(storage_of)
        if len(self.storage_of) != num_layers:
            raise ValueError(f"storage_of names {len(self.storage_of)} layers, not {num_layers}")
        views: list[torch.Tensor] = []
        for _ in range(max(self.storage_of) + 1):
            name = f"lmcache_kv_{os.getpid()}_{next(_seq)}"
            shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
            self._segments.append(shm)
            views.append(torch.frombuffer(shm.buf, dtype=dtype, count=nbytes // item).view(shape))
        self.layers = [views[i] for i in self.storage_of]

    def handles(self) -> list[CpuShmHandle]:
        out = []
        for layer, t in enumerate(self.layers):
            shm = self._segments[self.storage_of[layer]]
            out.append(
                CpuShmHandle(
                    version=1,
                    metadata=tensor_metadata(t, "cpu"),
                    shm_name=f"/{shm.name}",
                    nbytes=self.nbytes,
                )
            )
        return out

    def fill_random(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        for i in sorted(set(self.storage_of)):
            t = self.layers[self.storage_of.index(i)]
            t.copy_(torch.randn(t.shape, generator=g).to(self.dtype))

    def blocks_view(self, block_ids: list[int]) -> list[torch.Tensor]:
        """Per layer, the given blocks (copied), for byte-exact comparisons."""
        return select_blocks(self.layers, self.layout, block_ids)

    def close(self) -> None:
        self.layers.clear()
        for shm in self._segments:
            with contextlib.suppress(BufferError):  # a view is still alive somewhere; unlink anyway
                shm.close()
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()
        self._segments.clear()
