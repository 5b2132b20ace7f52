"""A vLLM-like paged KV cache on a CUDA device, registered as `cuda` handles (spec B.3): for
GPU tests and the GPU benchmark. Needs CUDA.

Each layer is one tensor from torch's caching allocator; its handle carries the storage's
shared-CUDA tuple (`UntypedStorage._share_cuda_()`), the view's dtype/shape/stride/offset and
the device UUID, as LMCache's GPU workers send them. `event()` gives an interprocess event
recorded on the current stream, as the worker's `event_ipc_handle`; `wait(handle)` makes the
current stream wait for the server's reply event.
"""

from __future__ import annotations

import torch

from lmcache_rs.client.shm_kv import paged_shape, select_blocks, tensor_metadata
from lmcache_rs.protocol.messages import CudaHandle


class CudaKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        layout: str = "NHD",
        device: int = 0,
    ) -> None:
        shape = paged_shape(layout, num_blocks, block_size, num_heads, head_dim)
        self.layout = layout
        self.device = torch.device("cuda", device)
        self.layers = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.uuid = str(torch.cuda.get_device_properties(device).uuid)

    def handles(self) -> list[CudaHandle]:
        out = []
        for t in self.layers:
            shared = t.untyped_storage()._share_cuda_()
            out.append(
                CudaHandle(
                    version=1,
                    metadata=tensor_metadata(t, self.uuid),
                    storage_handle=list(shared),
                )
            )
        return out

    def fill_random(self, seed: int = 0) -> None:
        g = torch.Generator(device=self.device).manual_seed(seed)
        for t in self.layers:
            t.copy_(torch.randn(t.shape, generator=g, device=self.device).to(t.dtype))

    def event(self) -> bytes:
        """An interprocess event after everything queued so far (the worker's `event_ipc_handle`)."""
        ev = torch.cuda.Event(interprocess=True)
        ev.record()
        return bytes(ev.ipc_handle())

    def wait(self, handle: bytes) -> None:
        """Blocks until the server's reply event has completed."""
        torch.cuda.Event.from_ipc_handle(self.device, handle).synchronize()

    def blocks_view(self, block_ids: list[int]) -> list[torch.Tensor]:
        return select_blocks(self.layers, self.layout, block_ids)
