"""`GET /cache/objects` and `DELETE /cache/objects` (LMCache 0.5.6; aliases `GET /l2/keys` and
`DELETE /l2`): list the objects of an L2 adapter page by page, and delete objects by key from
L1, L2 or both.

Keys travel as `EncodedKey` (spec I.3): `{chunk_hash_hex, model_name, kv_rank, object_group_id,
cache_salt}`, exactly the fields of a stored key, so a listed key deleted as listed is that
object (the encoding round-trips). Both list every tenant's objects: they need the bearer token.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec
from litestar import Router, delete, get
from litestar.di import NamedDependency
from litestar.params import FromQuery, JSONBody, QueryParameter

from lmcache_rs import InvalidKeyError, KeyScope, LmcacheCoreError
from lmcache_rs.http.auth import ALWAYS, SENSITIVE
from lmcache_rs.http.errors import ApiError
from lmcache_rs.storage.l2.base import L2Adapter, L2Key, L2Unavailable

if TYPE_CHECKING:
    from lmcache_rs.runtime import Runtime

#: Most keys one delete may name (LMCache's limit).
MAX_KEYS = 10_000
MAX_PAGE = 5000
_TOKEN = re.compile(r"[0-9a-f]{1,64}")
BAD_TOKEN = {"error": "invalid page_token (pass the last page's next_page_token)"}
U32 = 1 << 32
#: Body limit of the deletes: 10,000 keys with long names fit (the server's default is 1 MiB).
DELETE_BODY_BYTES = 32 << 20


class EncodedKey(msgspec.Struct, forbid_unknown_fields=True):
    """One stored key. `kv_rank` is the key's packed rank field, as stored (not the worker)."""

    chunk_hash_hex: str
    model_name: str
    kv_rank: Annotated[int, msgspec.Meta(ge=0, lt=U32)]
    object_group_id: Annotated[int, msgspec.Meta(ge=0, lt=U32)] = 0
    cache_salt: str = ""

    @classmethod
    def of(cls, k: L2Key) -> EncodedKey:
        return cls(k.chunk_hash.hex(), k.model_name, k.kv_rank, k.object_group, k.cache_salt)

    def decode(self) -> tuple[KeyScope, bytes]:
        try:
            h = bytes.fromhex(self.chunk_hash_hex)
        except ValueError:
            raise ApiError(
                400, {"error": f"chunk_hash_hex is not hex: {self.chunk_hash_hex[:80]!r}"}
            ) from None
        if not h:
            raise ApiError(400, {"error": "chunk_hash_hex is empty"})
        try:
            return KeyScope(self.model_name, self.kv_rank, self.object_group_id, self.cache_salt), h
        except (InvalidKeyError, LmcacheCoreError, OverflowError, ValueError, TypeError) as e:
            raise ApiError(400, {"error": f"invalid key: {e}"}) from None


class ObjectEntry(msgspec.Struct):
    key: EncodedKey
    #: Bytes of the chunk (the payload, as in L1; the stored object adds its header).
    size_bytes: int


class ObjectPage(msgspec.Struct):
    """One page. `shared`: the adapter's store is shared by other servers (Redis), so the
    listing includes their objects. `next_page_token`: pass it as `page_token` for the next
    page; null on the last one. Filtered by `model_name`, a page may hold fewer entries."""

    adapter: str
    shared: bool
    entries: list[ObjectEntry]
    next_page_token: str | None


class DeleteRequest(msgspec.Struct, forbid_unknown_fields=True):
    keys: Annotated[list[EncodedKey], msgspec.Meta(max_length=MAX_KEYS)]
    tier: Literal["l1", "l2", "all"] = "l2"
    #: L1: also delete read-locked objects (their bytes stay until their readers finish).
    force: bool = False
    #: L2: only this adapter (default: every adapter).
    adapter: str | None = None


class DeleteResult(msgspec.Struct, omit_defaults=True):
    """`deleted`: keys removed from at least one place; `skipped`: keys found nowhere (or,
    in L1 without force, read-locked); `by_tier`: deletions per place (`l1`, adapter names)."""

    deleted: int
    skipped: int
    ok: bool
    by_tier: dict[str, int]
    error: str | None = None


class L2DeleteRequest(msgspec.Struct, forbid_unknown_fields=True):
    keys: Annotated[list[EncodedKey], msgspec.Meta(max_length=MAX_KEYS)]
    adapter: str | None = None


class L2DeleteResult(msgspec.Struct):
    requested: int
    adapter: str | None
    ok: bool
    deleted: int


def _adapters(runtime: Runtime, name: str | None) -> list[L2Adapter]:
    adapters = runtime.l2.adapters if runtime.l2 is not None else []
    if name is None:
        return adapters
    chosen = [a for a in adapters if a.name == name]
    if not chosen:
        raise ApiError(404, {"error": f"no L2 adapter named {name!r} (GET /config/adapters)"})
    return chosen


def _list(
    runtime: Runtime,
    tier: str,
    adapter: str | None,
    model_name: str | None,
    page_size: int,
    page_token: str | None,
) -> ObjectPage:
    if tier == "l1":
        if adapter is not None:
            raise ApiError(400, {"error": "adapter names an L2 adapter: use tier l2"})
        return _list_l1(runtime, model_name, page_size, page_token)
    if page_token is not None and not _TOKEN.fullmatch(page_token):
        raise ApiError(400, BAD_TOKEN)
    if runtime.l2 is None or not runtime.l2.adapters:
        raise ApiError(400, {"error": "no L2 adapters configured"})
    a = _adapters(runtime, adapter)[0]
    try:
        ids = a.object_ids(page_token or "", page_size)
        keys = a.read_keys([oid for _, oid, _ in ids])
        a.succeeded()
    except (L2Unavailable, OSError) as e:
        a.failed("list", e)
        raise ApiError(503, {"error": f"L2 adapter {a.name!r} unavailable: {e}"}) from None
    entries = [
        ObjectEntry(EncodedKey.of(k), size)
        for (_, _, size), k in zip(ids, keys, strict=True)
        if k is not None and (model_name is None or k.model_name == model_name)
    ]
    last = ids[-1][1] if len(ids) == page_size else None
    return ObjectPage(adapter=a.name, shared=a.type_name != "fs", entries=entries, next_page_token=last)


#: An L1 page token: the last key of the previous page, msgpack, hex.
_Cursor = tuple[bytes, str, int, int, str]
_cursor_decoder = msgspec.msgpack.Decoder(_Cursor)


def _list_l1(runtime: Runtime, model_name: str | None, page_size: int, page_token: str | None) -> ObjectPage:
    after = None
    if page_token is not None:
        try:
            after = _cursor_decoder.decode(bytes.fromhex(page_token))
            if not all(0 <= n < U32 for n in after[2:4]):
                raise ValueError("kv_rank or object group out of range")
        except (ValueError, msgspec.DecodeError):
            raise ApiError(
                400, {"error": "invalid page_token (pass the last page's next_page_token)"}
            ) from None
    rows = runtime.engine.index.list_objects(after, page_size, model_name)
    entries = [
        ObjectEntry(
            EncodedKey(o.chunk_hash.hex(), o.model_name, o.kv_rank, o.object_group, o.cache_salt), o.size
        )
        for o in rows
    ]
    token = None
    if len(rows) == page_size:
        last = rows[-1]
        cursor: _Cursor = (last.chunk_hash, last.model_name, last.kv_rank, last.object_group, last.cache_salt)
        token = msgspec.msgpack.encode(cursor).hex()
    return ObjectPage(adapter="l1", shared=False, entries=entries, next_page_token=token)


PageSize = Annotated[int, QueryParameter(ge=1, le=MAX_PAGE, description="entries per page (1..5000)")]


@get("/cache/objects", sync_to_thread=True, opt={SENSITIVE: ALWAYS})
def list_objects(
    runtime: NamedDependency[Runtime],
    tier: FromQuery[Literal["l1", "l2"]] = "l2",
    adapter: FromQuery[str | None] = None,
    model_name: FromQuery[str | None] = None,
    page_size: PageSize = 500,
    page_token: FromQuery[str | None] = None,
) -> ObjectPage:
    """One page of an L2 adapter's objects (default: the primary adapter), in object id order."""
    return _list(runtime, tier, adapter, model_name, page_size, page_token)


@get("/l2/keys", sync_to_thread=True, opt={SENSITIVE: ALWAYS})
def list_l2_keys(
    runtime: NamedDependency[Runtime],
    adapter: FromQuery[str | None] = None,
    model_name: FromQuery[str | None] = None,
    page_size: PageSize = 500,
    page_token: FromQuery[str | None] = None,
) -> ObjectPage:
    """Alias of GET /cache/objects?tier=l2."""
    return _list(runtime, "l2", adapter, model_name, page_size, page_token)


def _delete(runtime: Runtime, body: DeleteRequest) -> DeleteResult:
    decoded = [k.decode() for k in body.keys]
    if body.adapter is not None and body.tier == "l1":
        raise ApiError(400, {"error": "adapter names an L2 adapter: use tier l2 or all"})
    if body.tier == "l2" and (runtime.l2 is None or not runtime.l2.adapters):
        raise ApiError(400, {"error": "no L2 adapters configured"})
    adapters = _adapters(runtime, body.adapter) if body.tier != "l1" else []
    hit = [False] * len(decoded)
    by_tier: dict[str, int] = {}
    if body.tier in ("l1", "all"):
        index = runtime.engine.index
        n = 0
        for i, (scope, h) in enumerate(decoded):
            if index.delete(scope, [h], body.force):
                runtime.l1.journal_forgot(scope, [h])
                hit[i] = True
                n += 1
        by_tier["l1"] = n
    errors = []
    for a in adapters:
        n = 0
        try:
            for i, (scope, h) in enumerate(decoded):
                if a.delete([L2Key.of(scope, h)]):
                    hit[i] = True
                    n += 1
            a.succeeded()
        except (L2Unavailable, OSError) as e:
            a.failed("delete", e)
            errors.append(f"{a.name}: {e}")
        by_tier[a.name] = n
    deleted = sum(hit)
    return DeleteResult(
        deleted=deleted,
        skipped=len(decoded) - deleted,
        ok=not errors,
        by_tier=by_tier,
        error="; ".join(errors) if errors else None,
    )


@delete(
    "/cache/objects",
    status_code=200,
    sync_to_thread=True,
    opt={SENSITIVE: ALWAYS},
    request_max_body_size=DELETE_BODY_BYTES,
)
def delete_objects(data: JSONBody[DeleteRequest], runtime: NamedDependency[Runtime]) -> DeleteResult:
    """Deletes objects by key from L1, L2 (default) or both; at most 10,000 keys a call."""
    return _delete(runtime, data)


@delete(
    "/l2",
    status_code=200,
    sync_to_thread=True,
    opt={SENSITIVE: ALWAYS},
    request_max_body_size=DELETE_BODY_BYTES,
)
def delete_l2(data: JSONBody[L2DeleteRequest], runtime: NamedDependency[Runtime]) -> L2DeleteResult:
    """Alias: deletes objects by key from L2 (every adapter, or `adapter`)."""
    r = _delete(runtime, DeleteRequest(keys=data.keys, tier="l2", adapter=data.adapter))
    return L2DeleteResult(requested=len(data.keys), adapter=data.adapter, ok=r.ok, deleted=r.deleted)


router = Router(
    path="/", route_handlers=[list_objects, list_l2_keys, delete_objects, delete_l2], tags=["cache"]
)
