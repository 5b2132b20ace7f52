"""The operation table (spec B.4): names, legacy ids, argument types, pools, failure values.

One row per operation. The transport decodes each argument frame with the row's types and
routes the request to the row's pool; the engine registers one handler per operation it
serves and answers the rest `unsupported_op` (`Engine.refusal`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from lmcache_rs import ChainMemo, decode_key
from lmcache_rs.protocol.messages import (
    BlockAllocationRecord,
    EngineDrivenRegistered,
    EngineDrivenRegistration,
    EngineGroupInfo,
    IPCCacheServerKey,
    PrepareRetrieveReply,
    PrepareStoreFailed,
    ServerKey,
    ext_hook,
)


class Pool(enum.Enum):
    """Where a request runs (spec B.4, DESIGN §4)."""

    #: Inline on the I/O thread: bounded work that never blocks (constant answers, lookup,
    #: query, ping, end_session). Measured: handing a lookup to a pool thread cost ~0.9 ms of
    #: queueing (GIL hand-off) on a loaded 2-core machine, more than the lookup itself.
    SYNC = "sync"
    #: The control pool: what may block or take long (wait_prefetch_status, clear,
    #: free_lookup_locks, block allocation reports); never waits behind transfers.
    NORMAL = "normal"
    #: The data pool: all requests of one client identity run on one thread in FIFO order.
    AFFINITY = "affinity"


#: Marker: an op whose successful reply has no payload frame (the handler returns None).
NO_PAYLOAD: Any = None


class ArgDecoder(Protocol):
    """Decodes one argument frame (a msgspec Decoder, or KeyDecoder)."""

    def decode(self, frame: bytes, /) -> Any: ...


@dataclass(frozen=True)
class OpSpec:
    name: str
    legacy_id: int | None
    args: tuple[Any, ...] = ()
    pool: Pool = Pool.NORMAL
    #: Payload frame of an error reply: the op's natural failure value (what an LMCache
    #: client decodes when it ignores the error frame; spec J.7 says what it concludes).
    fallback: Any = None
    #: Refused `overloaded` when too many requests are pending. False for ops that free
    #: resources (commits, unregistrations, free_lookup_locks) or whose failure an LMCache
    #: client cannot see (its register_kv_cache and clear read any nil reply as success).
    sheddable: bool = True
    decoders: tuple[ArgDecoder, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class KeyHashing:
    """How a server hashes the keys it decodes: its memo and chunk size."""

    memo: ChainMemo
    chunk_size: int


class KeyDecoder:
    """Decodes an `IPCCacheServerKey` frame in one pass in Rust (`_core.decode_key`): msgspec
    would skip the token array and the hasher parse it again, each a serial walk over ~135 KB
    for a 32k-token prompt. Same fields, defaults and errors (ValueError) as the Struct."""

    _configs = msgspec.msgpack.Decoder(dict[str, Any] | None)

    def decode(self, frame: bytes, hashing: KeyHashing | None = None) -> ServerKey:
        """With `hashing`, the ids come as their chunk hashes (`ServerKey.token_chain`), through
        the memo's byte-keyed table: a prompt seen before is neither parsed nor hashed."""
        k = decode_key(frame) if hashing is None else decode_key(frame, hashing.memo, hashing.chunk_size)
        configs = k.request_configs
        return ServerKey(
            model_name=k.model_name,
            world_size=k.world_size,
            worker_id=k.worker_id,
            # a view: the frame is not copied
            token_ids=msgspec.Raw(memoryview(frame)[k.token_start : k.token_end]),
            start=k.start,
            end=k.end,
            request_id=k.request_id,
            cache_salt=k.cache_salt,
            request_configs=None if configs is None else self._configs.decode(configs),
            num_kv_readers=k.num_kv_readers,
            token_u32=k.token_ids,
            token_chain=k.token_chain,
        )


def _decoder(t: Any) -> ArgDecoder:
    if t is IPCCacheServerKey:
        return KeyDecoder()
    return msgspec.msgpack.Decoder(t, ext_hook=ext_hook)


def _op(name: str, legacy_id: int | None, *args: Any, **kw: Any) -> OpSpec:
    return OpSpec(name, legacy_id, tuple(args), decoders=tuple(_decoder(t) for t in args), **kw)


Key = IPCCacheServerKey
BlockIds = list[list[int]]
A = Pool.AFFINITY
S = Pool.SYNC

OPS: tuple[OpSpec, ...] = (
    _op(
        "register_kv_cache",
        1,
        int,
        list[Any],
        str,
        int,
        str,
        dict[str, Any],
        list[EngineGroupInfo],
        pool=A,
        sheddable=False,
    ),
    _op("unregister_kv_cache", 2, int, pool=A, sheddable=False),
    _op("register_q_cache", 3),
    _op("unregister_q_cache", 4),
    _op("store_q", 5),
    _op("store", 6, Key, int, BlockIds, bytes, pool=A, fallback=[b"", False]),
    _op("retrieve", 7, Key, int, BlockIds, bytes, int, pool=A, fallback=[b"", False]),
    _op("lookup", 8, Key, int, pool=S),
    _op("query_prefetch_status", 9, str, fallback=0, pool=S),
    _op("wait_prefetch_status", 10, str, float),
    _op("free_lookup_locks", 12, Key, int, sheddable=False),
    _op("end_session", 13, str, pool=S),
    # Engine-driven (spec D.3, J.7). A failed registration answers ("", 0), which an LMCache
    # client reads as "pickle mode": its pickled commits are refused, so nothing it stores or
    # retrieves reads as success. A failed prepare_store answers a context without slots: the
    # client gathers privately and commits empty data, answered false ("not stored").
    _op(
        "register_kv_cache_engine_driven_context",
        14,
        EngineDrivenRegistration,
        pool=A,
        fallback=EngineDrivenRegistered(),
        sheddable=False,
    ),
    _op("unregister_kv_cache_engine_driven_context", 15, int, pool=A, sheddable=False),
    _op("prepare_store", 16, Key, int, pool=A, fallback=PrepareStoreFailed()),
    _op("commit_store", 17, Key, int, bytes, pool=A, fallback=False, sheddable=False),
    _op("prepare_retrieve", 18, Key, int, pool=A, fallback=PrepareRetrieveReply(success=False)),
    _op("commit_retrieve", 19, Key, int, pool=A, fallback=False, sheddable=False),
    _op("clear", 20, bool, sheddable=False),
    _op("get_chunk_size", 21, pool=S),
    _op("ping", 22, int | None, pool=S),
    _op("report_block_allocation", 23, int, str, list[BlockAllocationRecord]),
    _op("noop", 24, pool=S),
    _op("cb_register_rope", 25),
    _op("cb_unregister_rope", 26),
    _op("cb_retrieve_pre_computed", 27),
    _op("cb_unified_lookup", 28),
    _op("p2p_lookup_and_lock", 29),
    _op("p2p_query_lookup_results", 30),
    _op("p2p_unlock_objects", 31),
    _op("get_experimental", 32, pool=S, fallback=[]),
    _op("cb_protocol_handshake", 33),
    _op("cb_reorder_plan", None),
    _op("subscribe_kv_events", None),
    _op("server_module_call", None),
)

BY_NAME: dict[str, OpSpec] = {op.name: op for op in OPS}
BY_ID: dict[int, OpSpec] = {op.legacy_id: op for op in OPS if op.legacy_id is not None}


def find(op: object) -> OpSpec | None:
    """The row for an integer legacy id or a string name (bools are not ids)."""
    if isinstance(op, bool):
        return None
    if isinstance(op, int):
        return BY_ID.get(op)
    if isinstance(op, str):
        return BY_NAME.get(op)
    return None
