"""`POST /cache/explain`: why did this request miss? (issue 16; no LMCache server answers it.)

Given a prompt's token ids (or the request id of a recent lookup), a model, a world size and a
salt, it says chunk by chunk, for every kv rank and object group, where the KV is: resident in
L1 (or resident and read-locked), held by which L2 adapters, or absent, and why it left L1
(the index's drop log: evicted by watermark, quota or demand, deleted, cleared, released after
an L2 prefetch, a write whose lock expired), or `unknown`: never stored here, or dropped so long
ago that the bounded drop log (`--drop-log-entries`) forgot it.

Tenancy: every answer is about the caller's `cache_salt` only (the index and the L2 keys are
scoped by salt), and a `request_id` whose session belongs to another salt or model answers
exactly as an unknown request id does, so the endpoint is no cross-tenant side channel.
It changes nothing: no lock is taken, no recency is touched, no L2 object is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import msgspec
from litestar import Router, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from lmcache_rs import (
    InvalidKeyError,
    KeyScope,
    LmcacheCoreError,
    chunk_hashes_msgpack,
    mp_kv_rank,
    validate_model,
    validate_salt,
)
from lmcache_rs.http.auth import ALWAYS, SENSITIVE
from lmcache_rs.http.errors import ApiError
from lmcache_rs.storage.l2.base import L2Key, L2Unavailable

if TYPE_CHECKING:
    from lmcache_rs.runtime import Runtime

#: Most tokens one explain may hash (the body limit of 1 MiB bounds it first in practice).
MAX_TOKENS = 1_000_000
#: The key's kv rank field holds the world size in 8 bits.
MAX_WORLD_SIZE = 255


TokenId = Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]


class ExplainRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Either `token_ids` (hashed as the engine hashes a request) or `request_id` (a session of
    a recent lookup or store, within this model and salt)."""

    model_name: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    world_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_WORLD_SIZE)] = 1
    cache_salt: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    token_ids: Annotated[list[TokenId], msgspec.Meta(max_length=MAX_TOKENS)] | None = None
    request_id: Annotated[str, msgspec.Meta(max_length=1024)] | None = None


class ScopeInfo(msgspec.Struct):
    """One row of the answer's `where` lists: a worker's kv rank of an object group. `window` is the
    group's sliding window in tokens (null: full attention); `tail` rows hold the group's
    partial tail objects. A windowed group needs only the chunks of a prefix's last window."""

    #: The worker (0..world_size-1) and the key's kv rank field (LMCache's packed form).
    rank: int
    kv_rank: int
    object_group: int
    window: int | None
    tail: bool


class Where(msgspec.Struct):
    """Where one chunk is for one row of `scopes` (same order). `l1`: resident, locked
    (resident and read-locked), dropped (`reason`, `ago_seconds`) or unknown. `l2`: the
    adapters holding it."""

    l1: str
    reason: str | None
    ago_seconds: float | None
    l2: list[str]


class ChunkExplain(msgspec.Struct):
    chunk: int
    chunk_hash: str
    where: list[Where]


class ExplainSummary(msgspec.Struct):
    """`l1_prefix_chunks`: chunks from the start resident in L1 in every row (what an L1
    lookup could hit, windows aside); `l2_prefix_chunks`: per adapter, chunks from the start it
    holds in every row; `l1`: rows x chunks per L1 state; `reasons`: dropped ones by reason."""

    l1_prefix_chunks: int
    l2_prefix_chunks: dict[str, int]
    l1: dict[str, int]
    reasons: dict[str, int]


class ExplainResponse(msgspec.Struct):
    model_name: str
    world_size: int
    cache_salt: str
    chunk_size: int
    #: Complete chunks explained (a trailing partial chunk is never stored).
    total_chunks: int
    #: Whether a worker of (model, world size) is registered; without one every lookup
    #: misses (`no_gpu_context`) and only object group 0 is explained.
    layout_registered: bool
    scopes: list[ScopeInfo]
    #: L2 adapters that could not answer (their column reads as not holding the chunk).
    l2_unavailable: list[str]
    summary: ExplainSummary
    chunks: list[ChunkExplain]


def _hashes(runtime: Runtime, body: ExplainRequest) -> list[bytes]:
    engine = runtime.engine
    if (body.token_ids is None) == (body.request_id is None):
        raise ApiError(400, {"error": "give exactly one of token_ids and request_id"})
    if body.token_ids is not None:
        try:
            raw = msgspec.msgpack.encode(body.token_ids)
            return chunk_hashes_msgpack(raw, engine.chunk_size).hashes
        except (LmcacheCoreError, OverflowError, ValueError) as e:
            raise ApiError(400, {"error": f"token_ids: {e}"}) from None
    assert body.request_id is not None
    session = engine.control.session_view(body.request_id)
    unknown = ApiError(404, {"error": f"unknown request_id {body.request_id!r} (for this model and salt)"})
    if session is None:
        raise unknown
    scopes = session.scopes
    if not scopes or any((s.model_name, s.cache_salt) != (body.model_name, body.cache_salt) for s in scopes):
        raise unknown  # another tenant's (or model's) request: indistinguishable from none
    return session.hashes


def _scopes(runtime: Runtime, body: ExplainRequest) -> tuple[bool, list[tuple[ScopeInfo, KeyScope]]]:
    layout = runtime.engine.contexts.layout(body.model_name, body.world_size)
    groups: list[tuple[int, int | None, bool]] = [(0, None, False)]
    if layout is not None:
        groups = []
        for og in layout:
            window = og.window if og.windowed else None
            groups.append((og.id, window, False))
            if og.tail_id is not None:
                groups.append((og.tail_id, window, True))
    rows = []
    for gid, window, tail in groups:
        for r in range(body.world_size):
            rank = mp_kv_rank(body.world_size, r)
            info = ScopeInfo(rank=r, kv_rank=rank, object_group=gid, window=window, tail=tail)
            rows.append((info, KeyScope(body.model_name, rank, gid, body.cache_salt)))
    return layout is not None, rows


def _prefix(rows: list[list[bool]], n: int) -> int:
    k = 0
    while k < n and all(row[k] for row in rows):
        k += 1
    return k


@post("/cache/explain", status_code=200, sync_to_thread=True, opt={SENSITIVE: ALWAYS})
def explain(data: JSONBody[ExplainRequest], runtime: NamedDependency[Runtime]) -> ExplainResponse:
    """Where each chunk of a prompt (or of a recent request) is, per kv rank and object group,
    and why absent ones are absent; within the caller's salt only."""
    try:
        validate_model(data.model_name)
        validate_salt(data.cache_salt)
    except (InvalidKeyError, LmcacheCoreError) as e:
        raise ApiError(400, {"error": str(e)}) from None
    hashes = _hashes(runtime, data)
    registered, rows = _scopes(runtime, data)
    index = runtime.engine.index
    l1 = [index.explain(scope, hashes) for _, scope in rows]
    adapters = runtime.l2.adapters if runtime.l2 is not None else []
    held: dict[str, list[list[bool]]] = {}
    unavailable = []
    for a in adapters:
        if not a.available():
            unavailable.append(a.name)
            continue
        try:
            held[a.name] = [
                [n is not None for n in a.lengths([L2Key.of(scope, h) for h in hashes])] for _, scope in rows
            ]
            a.succeeded()
        except (L2Unavailable, OSError) as e:
            a.failed("lookup", e)
            unavailable.append(a.name)
    states: dict[str, int] = {"resident": 0, "locked": 0, "dropped": 0, "unknown": 0}
    reasons: dict[str, int] = {}
    chunks = []
    for i, h in enumerate(hashes):
        where = []
        for r in range(len(rows)):
            w = l1[r][i]
            states[w.state] = states.get(w.state, 0) + 1
            if w.reason is not None:
                reasons[w.reason] = reasons.get(w.reason, 0) + 1
            where.append(
                Where(
                    l1=w.state,
                    reason=w.reason,
                    ago_seconds=w.ago_seconds,
                    l2=[name for name, cols in held.items() if cols[r][i]],
                )
            )
        chunks.append(ChunkExplain(chunk=i, chunk_hash=h.hex(), where=where))
    in_l1 = [[w.state in ("resident", "locked") for w in row] for row in l1]
    return ExplainResponse(
        model_name=data.model_name,
        world_size=data.world_size,
        cache_salt=data.cache_salt,
        chunk_size=runtime.engine.chunk_size,
        total_chunks=len(hashes),
        layout_registered=registered,
        scopes=[info for info, _ in rows],
        l2_unavailable=unavailable,
        summary=ExplainSummary(
            l1_prefix_chunks=_prefix(in_l1, len(hashes)),
            l2_prefix_chunks={name: _prefix(cols, len(hashes)) for name, cols in held.items()},
            l1=states,
            reasons=reasons,
        ),
        chunks=chunks,
    )


router = Router(path="/", route_handlers=[explain], tags=["cache"])
