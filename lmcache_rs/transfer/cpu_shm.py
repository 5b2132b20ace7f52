"""Mapping `cpu_shm` KV handles (spec B.3, D): a worker's KV tensor in a POSIX shm segment.

The server opens `/dev/shm/<name>` itself (no `multiprocessing.shared_memory`, whose resource
tracker would unlink the worker's segment when the server exits, spec L.18), maps it and
rebuilds the worker's view with the advertised dtype, shape, stride and offset, after checking
the view fits the advertised span and the span fits the segment.
"""

from __future__ import annotations

import mmap
import os
import re

import torch

from lmcache_rs.protocol.messages import CpuShmHandle, TensorMetadata

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"^/?[A-Za-z0-9_.\-]{1,240}$")

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
}


class HandleError(ValueError):
    """A KV handle that cannot be mapped safely; the message says why."""


def parse_dtype(name: str) -> torch.dtype:
    dtype = DTYPES.get(name.removeprefix("torch."))
    if dtype is None:
        raise HandleError(f"unsupported dtype {name!r} (supported: {', '.join(sorted(DTYPES))})")
    return dtype


def view_extent(meta: TensorMetadata) -> int:
    """Elements from the storage start to one past the view's last element."""
    if len(meta.shape) != len(meta.stride):
        raise HandleError(f"shape {meta.shape} and stride {meta.stride} differ in length")
    if any(s < 0 for s in meta.shape) or any(s < 0 for s in meta.stride) or meta.storage_offset < 0:
        raise HandleError("negative shape, stride or storage_offset")
    if any(s == 0 for s in meta.shape):
        return meta.storage_offset
    return meta.storage_offset + 1 + sum((n - 1) * st for n, st in zip(meta.shape, meta.stride, strict=True))


class MappedTensor:
    """A worker tensor mapped into this process; keeps the mapping alive as long as it lives."""

    def __init__(self, handle: CpuShmHandle) -> None:
        name = handle.shm_name
        if not _NAME.match(name) or name.strip("/") in (".", ".."):
            raise HandleError(f"shm_name {name!r} is not a plain POSIX shm name")
        dtype = parse_dtype(handle.metadata.dtype)
        item = torch.empty((), dtype=dtype).element_size()
        if handle.nbytes <= 0 or handle.nbytes % item:
            raise HandleError(f"nbytes {handle.nbytes} is not a positive multiple of {item}")
        if view_extent(handle.metadata) * item > handle.nbytes:
            raise HandleError(
                f"view {handle.metadata.shape}/{handle.metadata.stride}+{handle.metadata.storage_offset} "
                f"does not fit in {handle.nbytes} bytes"
            )
        path = os.path.join(SHM_DIR, name.lstrip("/"))
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise HandleError(f"cannot open shared memory {name!r}: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < handle.nbytes:
                raise HandleError(f"shared memory {name!r} has {size} bytes, handle says {handle.nbytes}")
            self._mmap = mmap.mmap(fd, handle.nbytes)
        finally:
            os.close(fd)
        base = torch.frombuffer(self._mmap, dtype=torch.uint8, count=handle.nbytes).view(dtype)
        self.tensor = torch.as_strided(
            base, handle.metadata.shape, handle.metadata.stride, handle.metadata.storage_offset
        )
        self.name = name
