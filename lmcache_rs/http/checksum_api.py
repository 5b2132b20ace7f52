"""`POST /cache/checksums` (LMCache 0.5.6) and `GET /kvcache/check` (its older name, query
form): MD5 checksums of a registered worker's KV blocks, `chunk_size` blocks at a time, for
debugging KV corruption. The digests are `engine/checksums.py`'s (LMCache's definition).

Codes: 400 bad input (malformed or out-of-range block ids, chunk_size < 1); 404 instance not
registered; 501 an engine-driven worker (its KV memory is not mapped by this server). Both
need the bearer token: they read a tenant's KV.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from litestar import Router, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromQuery, JSONBody, QueryParameter

from lmcache_rs.engine.checksums import BlockItem, ChecksumError, block_checksums, compress, parse_block_ids
from lmcache_rs.http.auth import ALWAYS, SENSITIVE
from lmcache_rs.http.errors import ApiError

if TYPE_CHECKING:
    from lmcache_rs.runtime import Runtime

#: 1M block ids as a list fit.
BODY_BYTES = 16 << 20
CODES = {"bad_request": 400, "not_found": 404, "unreadable": 501}

BlockId = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]


class ChecksumRequest(msgspec.Struct, forbid_unknown_fields=True):
    """`block_ids`: ids and inclusive `[first, last]` ranges, in order (or LMCache's query
    string form "0,[2,5],8"); `chunk_size`: blocks per digest."""

    block_ids: list[BlockId | list[BlockId]] | str
    chunk_size: Annotated[int, msgspec.Meta(ge=1)]
    instance_id: int = 0
    layerwise: bool = False


class ChecksumResponse(msgspec.Struct):
    """`chunk_checksums`: one MD5 (hex) per group of `chunk_size` blocks over every layer, or
    with `layerwise` one list per layer (`layer_0`, ...). `block_id_ranges`: the blocks read,
    runs of 3 or more as [first, last]."""

    status: Literal["success"]
    chunk_size: int
    num_chunks: int
    chunk_checksums: list[str] | dict[str, list[str]]
    layerwise: bool
    block_id_ranges: list[BlockItem]


RESPONSES = {
    501: ResponseSpec(
        data_container=dict[str, Any],
        description="The worker's KV memory is not readable by this server (engine-driven)",
        generate_examples=False,
    )
}


def _checksums(
    runtime: Runtime, spec: str | list[BlockItem], chunk_size: int, instance_id: int, layerwise: bool
) -> ChecksumResponse:
    try:
        ids = parse_block_ids(spec)
        sums = block_checksums(runtime.engine.contexts, instance_id, ids, chunk_size, layerwise)
    except ChecksumError as e:
        raise ApiError(CODES[e.kind], {"error": e.message}) from None
    return ChecksumResponse(
        status="success",
        chunk_size=chunk_size,
        num_chunks=-(-len(ids) // chunk_size),
        chunk_checksums=sums,
        layerwise=layerwise,
        block_id_ranges=compress(ids),
    )


@post(
    "/cache/checksums",
    status_code=200,
    sync_to_thread=True,
    opt={SENSITIVE: ALWAYS},
    request_max_body_size=BODY_BYTES,
    responses=RESPONSES,
)
def post_checksums(data: JSONBody[ChecksumRequest], runtime: NamedDependency[Runtime]) -> ChecksumResponse:
    """MD5 per group of `chunk_size` blocks of a registered worker's KV cache."""
    return _checksums(runtime, data.block_ids, data.chunk_size, data.instance_id, data.layerwise)


@get("/kvcache/check", sync_to_thread=True, opt={SENSITIVE: ALWAYS}, responses=RESPONSES)
def kvcache_check(
    runtime: NamedDependency[Runtime],
    block_ids: Annotated[str, QueryParameter(description='ids and ranges, e.g. "0,[2,5],8"')],
    chunk_size: Annotated[int, QueryParameter(ge=1, description="blocks per digest")],
    instance_id: FromQuery[int] = 0,
    layerwise: FromQuery[bool] = False,
) -> ChecksumResponse:
    """Query form of POST /cache/checksums (LMCache's older name)."""
    return _checksums(runtime, block_ids, chunk_size, instance_id, layerwise)


router = Router(path="/", route_handlers=[post_checksums, kvcache_check], tags=["cache"])
