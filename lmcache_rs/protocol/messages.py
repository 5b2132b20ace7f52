"""Wire types of the LMCache 0.5.x MP protocol (spec B.3), as msgspec Structs.

Structs encode as msgpack maps keyed by field name in declaration order, which is what LMCache
clients send and expect. Field names and defaults are part of the wire contract.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from lmcache_rs._core import TokenChain

#: msgpack ext code of a `DeviceIPCWrapper` (a KV tensor handle).
IPC_WRAPPER_EXT = 1

#: Event handle the server returns on CPU paths (spec B.4: there is no device event).
STUB_EVENT = b"stub_ipc_handle"


class IPCCacheServerKey(msgspec.Struct, kw_only=True):
    """What a request is about: a token prefix of one request, for one rank (`worker_id`) or
    all ranks (None). `token_ids` is kept as its msgpack encoding (an array of ints): the
    server hashes those bytes in Rust (`chunk_hashes_msgpack`) without building a Python list;
    clients build it with `encode_tokens`."""

    model_name: str
    world_size: int
    worker_id: int | None
    token_ids: msgspec.Raw
    start: int
    end: int
    request_id: str
    cache_salt: str = ""
    request_configs: dict[str, Any] | None = None
    num_kv_readers: int = 0


class ServerKey(IPCCacheServerKey, kw_only=True):
    """A key as the server decodes it (`protocol.ops.KeyDecoder`, one pass in Rust): also its
    token ids, parsed once, as native-endian uint32 bytes, or instead (decoded with the
    engine's hash memo) their chunk hashes, `token_chain`. Never sent."""

    token_u32: bytes = b""
    token_chain: TokenChain | None = None


class EngineGroupInfo(msgspec.Struct, kw_only=True):
    """One vLLM KV cache group: which layers share a block table."""

    engine_group_id: int
    layer_indices: list[int]
    tokens_per_block: int = 0
    sw_size_tokens: int = -1
    extra_object_group_tag: int = 0
    recurrent_state: bool = False


class EngineDrivenRegistration(msgspec.Struct, kw_only=True):
    """Payload of register_kv_cache_engine_driven_context (op 14): the worker's KV geometry.
    Chunks are `[2, num_layers, slots, hidden_dim_size]` (MLA: `[num_layers, slots, hidden]`)
    with slots = `num_physical_slots` or the chunk size. Later client fields are ignored, except
    that more than one engine group (hybrid models) is refused rather than misread."""

    instance_id: int
    model_name: str
    world_size: int
    block_size: int
    num_layers: int
    hidden_dim_size: int
    dtype_str: str
    use_mla: bool
    num_physical_slots: int | None = None
    engine_group_infos: list[EngineGroupInfo] = msgspec.field(default_factory=list)


class EngineDrivenRegistered(msgspec.Struct, kw_only=True):
    """Reply to op 14: the L1 pool workers map. ("", 0) tells an LMCache client "pickle", which
    this server refuses; it comes with an error frame saying why there is no pool."""

    shm_name: str = ""
    pool_size: int = 0


class ShmSlot(msgspec.Struct, kw_only=True):
    """One chunk's place in the L1 pool: bytes [offset, offset + length), viewed as `shape`."""

    offset: int
    length: int
    shape: list[int]
    dtype: str


class StoreSlots(msgspec.Struct, kw_only=True):
    """Where to write: `slots[i]` takes chunk `chunk_indices[i]` of the key's range (chunks
    already cached, or being written by another worker, are left out)."""

    slots: list[ShmSlot]
    chunk_indices: list[int]


class PrepareStoreReply(msgspec.Struct, kw_only=True):
    context: StoreSlots


class PrivateGather(msgspec.Struct, kw_only=True):
    """A store context without a `slots` list (encodes as `{}`)."""


class PrepareStoreFailed(msgspec.Struct, kw_only=True):
    """Reply to a prepare_store that cannot be served: `{"context": {}}`. With no `slots` list,
    LMCache's SHM client gathers the chunks into private buffers and sends `commit_store` with
    empty data, which is answered false: it concludes "not stored". (An empty `slots` list would
    read as "every chunk is cached already": store ok, no commit; spec J.7.)"""

    context: PrivateGather = msgspec.field(default_factory=PrivateGather)


class RetrieveSlots(msgspec.Struct, kw_only=True):
    slots: list[ShmSlot]


class PrepareRetrieveReply(msgspec.Struct, kw_only=True):
    """`data` carried pickled chunks in LMCache's pickle mode; here it is always empty."""

    success: bool
    data: bytes = b""
    context: RetrieveSlots = msgspec.field(default_factory=lambda: RetrieveSlots(slots=[]))


class TensorMetadata(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Where a tensor view sits inside its shared storage."""

    dtype: str
    shape: list[int]
    stride: list[int]
    storage_offset: int = 0
    device_uuid: str = ""


class CpuShmHandle(msgspec.Struct, tag_field="type", tag="cpu_shm", kw_only=True, forbid_unknown_fields=True):
    """A KV tensor living in a POSIX shared-memory segment (CPU workers)."""

    version: int
    metadata: TensorMetadata
    shm_name: str
    nbytes: int


class CudaHandle(msgspec.Struct, tag_field="type", tag="cuda", kw_only=True, forbid_unknown_fields=True):
    """A CUDA tensor shared through torch's storage sharing (LMCache-driven GPU workers)."""

    version: int
    metadata: TensorMetadata
    storage_handle: list[Any] = msgspec.field(default_factory=list)


class CudaRawHandle(
    msgspec.Struct, tag_field="type", tag="cuda_raw", kw_only=True, forbid_unknown_fields=True
):
    version: int
    metadata: TensorMetadata
    ipc_handle: bytes
    alloc_offset: int
    nbytes: int


IPCWrapper = CpuShmHandle | CudaHandle | CudaRawHandle


class Unsupported(msgspec.Struct, kw_only=True):
    """A handle kind this server does not map (cuda_vmm, musa, npu): kept to answer clearly."""

    type: str


def encode_tokens(token_ids: list[int]) -> msgspec.Raw:
    """`token_ids` in their wire form, for `IPCCacheServerKey`."""
    return msgspec.Raw(msgspec.msgpack.encode(token_ids))


def ext_hook(code: int, data: memoryview) -> Any:
    """Decodes ext type 1 (DeviceIPCWrapper) into one of the handle Structs."""
    if code != IPC_WRAPPER_EXT:
        raise msgspec.ValidationError(f"unknown msgpack ext type {code}")
    raw = msgspec.msgpack.decode(data)
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in ("cpu_shm", "cuda", "cuda_raw"):
        return Unsupported(type=str(kind))
    return msgspec.convert(raw, IPCWrapper)


def to_ext(handle: CpuShmHandle | CudaHandle | CudaRawHandle) -> msgspec.msgpack.Ext:
    """A handle as it travels: ext type 1 around its msgpack map (client side)."""
    return msgspec.msgpack.Ext(IPC_WRAPPER_EXT, msgspec.msgpack.encode(handle))


EngineType = Literal["vllm", "atom", "sglang", "trtllm", "mock"]


class ErrorInfo(msgspec.Struct, kw_only=True):
    """Body of the optional 4th reply frame that marks a failed request (docs/protocol.md)."""

    code: str
    message: str
    op: str = ""


class ErrorFrame(msgspec.Struct, kw_only=True):
    error: ErrorInfo


class BlockAllocationRecord(msgspec.Struct, kw_only=True):
    req_id: str
    new_block_ids: list[int] = msgspec.field(default_factory=list)
    new_token_ids: list[int] = msgspec.field(default_factory=list)
