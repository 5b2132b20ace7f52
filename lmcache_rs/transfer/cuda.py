"""The CUDA path of LMCache-driven transfer (spec B.3 `cuda`, B.4 events, D.1, D.2, K).

GPU workers register each KV tensor as a `cuda` handle: torch's shared-storage tuple (what
`UntypedStorage._share_cuda_()` returns in the worker) plus the view's dtype, shape, stride
and offset and the device's UUID. The server reopens the storage on the device with that UUID
(`UntypedStorage._new_shared_cuda`) and views it as the worker does.

Copies run on one CUDA stream per registered worker and are kept large: a chunk's paged blocks
are gathered on the GPU into a contiguous staging buffer (`gather`, one `index_select` per
layer and plane), then one DMA per chunk moves it to its pinned L1 slot; retrieve is the
reverse (one DMA into staging, then `scatter` into the blocks). The worker's event (an
interprocess CUDA event, sent as its IPC handle) is waited on by the stream before the first
copy; after the last copy the server records its own interprocess event and replies with its
handle, which the worker waits on. The handler waits for that event too before it admits or
unlocks anything, so L1 never holds a chunk whose bytes are still in flight.

This module needs CUDA; it is imported only when a `cuda` handle arrives.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from lmcache_rs.protocol.messages import CudaHandle
from lmcache_rs.transfer.cpu_shm import HandleError, parse_dtype, view_extent
from lmcache_rs.transfer.gather import ObjectCopy, gather, scatter

#: Chunks per staging buffer (device memory held per registered worker: this times chunk bytes).
STAGING_CHUNKS = 2

_uuid_lock = threading.Lock()
_uuid_to_index: dict[str, int] = {}


def device_index(uuid: str) -> int:
    """The CUDA ordinal of the device with this UUID, as this process numbers them."""
    with _uuid_lock:
        if not _uuid_to_index:
            for i in range(torch.cuda.device_count()):
                _uuid_to_index[str(torch.cuda.get_device_properties(i).uuid)] = i
        idx = _uuid_to_index.get(uuid)
    if idx is None:
        raise HandleError(
            f"no visible CUDA device has UUID {uuid!r} (this server sees {torch.cuda.device_count()}); "
            "run it where it can see the workers' GPUs"
        )
    return idx


def open_cuda_tensor(handle: CudaHandle) -> torch.Tensor:
    """The worker's KV tensor, mapped into this process through CUDA IPC."""
    if not torch.cuda.is_available():
        raise HandleError("a cuda KV handle needs a CUDA device in the server")
    sh = handle.storage_handle
    # (device, handle, size_bytes, offset_bytes, ref_counter_handle, ref_counter_offset,
    #  event_handle, event_sync_required), as UntypedStorage._share_cuda_() returns it.
    kinds = (int, bytes, int, int, bytes, int, bytes, bool)
    if len(sh) != len(kinds) or not all(
        isinstance(v, k) and (k is bool or not isinstance(v, bool)) for v, k in zip(sh, kinds, strict=False)
    ):
        raise HandleError(
            "storage_handle must be torch's 8-field shared-storage tuple (int, bytes, int, ...)"
        )
    dtype = parse_dtype(handle.metadata.dtype)
    idx = device_index(handle.metadata.device_uuid)
    size_bytes = int(sh[2])
    if view_extent(handle.metadata) * dtype.itemsize > size_bytes:
        raise HandleError(
            f"view {handle.metadata.shape} does not fit the shared storage of {size_bytes} bytes"
        )
    with torch.cuda.device(idx):
        storage = torch.UntypedStorage._new_shared_cuda(idx, *sh[1:])
        t = torch.empty((), device=f"cuda:{idx}", dtype=dtype)
        t.set_(storage, handle.metadata.storage_offset, handle.metadata.shape, handle.metadata.stride)
    return t


def open_event(handle: bytes, device: torch.device) -> torch.cuda.Event | None:
    """The worker's interprocess event (None for an empty or CPU stub handle)."""
    if not handle or handle == b"stub_ipc_handle":
        return None
    event: torch.cuda.Event = torch.cuda.Event.from_ipc_handle(device, handle)
    return event


@dataclass
class CudaMover:
    """Copies between one worker's paged GPU KV and L1, on its own stream."""

    device: torch.device
    #: The largest object this worker's layout stores (a staging slot's size).
    chunk_bytes: int
    stream: torch.cuda.Stream = field(init=False)
    staging: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(self.device)
            self.staging = torch.empty(
                STAGING_CHUNKS * self.chunk_bytes, dtype=torch.uint8, device=self.device
            )

    def _slot(self, i: int) -> torch.Tensor:
        j = i % STAGING_CHUNKS
        return self.staging[j * self.chunk_bytes : (j + 1) * self.chunk_bytes]

    def _finish(self) -> bytes:
        done = torch.cuda.Event(interprocess=True)
        done.record(self.stream)
        done.synchronize()  # releases the GIL while it waits
        return bytes(done.ipc_handle())

    def idle(self, wait: bytes) -> bytes:
        """An event for a reply that copies nothing (after the worker's own)."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            ev = open_event(wait, self.device)
            if ev is not None:
                self.stream.wait_event(ev)
            return self._finish()

    def store(self, layers: list[torch.Tensor], copies: list[ObjectCopy], wait: bytes) -> bytes:
        """Gathers each object's blocks into staging and DMAs it to its L1 bytes (`c.obj`).
        Returns the event handle the worker waits on; the copies are complete when this returns."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            ev = open_event(wait, self.device)
            if ev is not None:
                self.stream.wait_event(ev)
            for i, c in enumerate(copies):
                staging = self._slot(i)[: c.nbytes]
                blocks = [b.to(self.device, non_blocking=True) for b in c.blocks]
                gather(ObjectCopy(c.groups, blocks, c.obj, c.rows), layers, staging)
                c.obj.copy_(staging, non_blocking=True)
            return self._finish()

    def retrieve(
        self,
        layers: list[torch.Tensor],
        copies: list[ObjectCopy],
        chunk_tokens: int,
        null_block_id: int,
        wait: bytes,
    ) -> bytes:
        """DMAs each object (`c.obj`) into staging and scatters it into its blocks."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            ev = open_event(wait, self.device)
            if ev is not None:
                self.stream.wait_event(ev)
            for i, c in enumerate(copies):
                staging = self._slot(i)[: c.nbytes]
                staging.copy_(c.obj, non_blocking=True)
                scatter(c, layers, chunk_tokens, null_block_id, staging)
            return self._finish()
