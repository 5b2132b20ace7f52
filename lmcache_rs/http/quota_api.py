"""`/quota`: per-cache_salt L1 budgets for IsolatedLRU (seed document; spec I.4 messages).

Quotas are soft: a salt over its budget is evicted down to it on the next eviction cycle
(about 1 s); a salt without a quota has limit 0 (allowlist). `_default` names the empty salt.
A quota applies to L1 and, separately, to each L2 adapter whose policy is IsolatedLRU;
`current_usage_gb` is the salt's L1 + L2 bytes, split in `l1_usage_gb` and `l2_usage_gb`.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Request, Router, delete, get, put
from litestar.di import NamedDependency
from litestar.params import FromPath

from lmcache_rs import InvalidKeyError, validate_salt
from lmcache_rs.http.auth import ALWAYS, SENSITIVE
from lmcache_rs.http.errors import ApiError

if TYPE_CHECKING:
    from lmcache_rs.runtime import Runtime

GiB = 1 << 30
DEFAULT_SALT = "_default"


class QuotaEntry(msgspec.Struct):
    limit_gb: float
    current_usage_gb: float
    l1_usage_gb: float
    l2_usage_gb: float


class QuotaList(msgspec.Struct):
    users: dict[str, QuotaEntry]


class QuotaSet(msgspec.Struct):
    cache_salt: str
    limit_gb: Any
    status: str


class QuotaGet(msgspec.Struct):
    cache_salt: str
    limit_gb: float
    current_usage_gb: float
    exists: bool
    l1_usage_gb: float
    l2_usage_gb: float


class QuotaDeleted(msgspec.Struct):
    cache_salt: str
    status: str


def to_salt(path_salt: str) -> str:
    salt = "" if path_salt == DEFAULT_SALT else path_salt
    try:
        validate_salt(salt)
    except InvalidKeyError as e:
        raise ApiError(400, {"error": str(e)}) from None
    return salt


def to_path(salt: str) -> str:
    return DEFAULT_SALT if salt == "" else salt


def parse_limit(raw: bytes) -> tuple[Any, float]:
    """The body's limit as given (echoed back) and as a float, with the seed's messages.

    Parsed with the stdlib so `1e999`, `NaN` and `Infinity` read as non-finite numbers (and get
    "must be finite") exactly as LMCache answers, instead of failing as invalid JSON."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, {"error": "invalid JSON body"}) from None
    if not isinstance(body, dict) or "limit_gb" not in body:
        raise ApiError(400, {"error": "body must be {'limit_gb': <float>}"})
    given = body["limit_gb"]
    try:
        value = float(given)
    except (TypeError, ValueError):
        raise ApiError(400, {"error": "limit_gb must be numeric"}) from None
    if not math.isfinite(value):
        raise ApiError(400, {"error": "limit_gb must be finite"})
    if value < 0:
        raise ApiError(400, {"error": "limit_gb must be non-negative"})
    return given, value


def l2_usage(runtime: Runtime) -> dict[str, int]:
    return runtime.l2.usage_by_salt() if runtime.l2 is not None else {}


@get("/quota", sync_to_thread=True)
def list_quotas(runtime: NamedDependency[Runtime]) -> QuotaList:
    """Every registered quota with the salt's live L1 + L2 usage."""
    l2 = l2_usage(runtime)
    users = {}
    for q in runtime.l1.index.list_quotas():
        l1_bytes, l2_bytes = q.usage_bytes, l2.get(q.cache_salt, 0)
        users[to_path(q.cache_salt)] = QuotaEntry(
            limit_gb=q.limit_bytes / GiB,
            current_usage_gb=(l1_bytes + l2_bytes) / GiB,
            l1_usage_gb=l1_bytes / GiB,
            l2_usage_gb=l2_bytes / GiB,
        )
    return QuotaList(users=users)


@put("/quota/{cache_salt:str}", opt={SENSITIVE: ALWAYS})
async def set_quota(
    cache_salt: FromPath[str], request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]
) -> QuotaSet:
    """Creates or updates a quota. Body: {"limit_gb": <float>} (finite, >= 0)."""
    salt = to_salt(cache_salt)
    given, value = parse_limit(await request.body())
    runtime.l1.index.set_quota(salt, int(value * GiB))
    return QuotaSet(cache_salt=cache_salt, limit_gb=given, status="ok")


@get("/quota/{cache_salt:str}", sync_to_thread=True)
def get_quota(cache_salt: FromPath[str], runtime: NamedDependency[Runtime]) -> QuotaGet:
    """One salt's quota and live L1 + L2 usage; `exists` is false (limit 0) when it has none."""
    salt = to_salt(cache_salt)
    idx = runtime.l1.index
    limit = idx.get_quota(salt)
    l1_bytes, l2_bytes = idx.salt_usage(salt), l2_usage(runtime).get(salt, 0)
    return QuotaGet(
        cache_salt=cache_salt,
        limit_gb=0.0 if limit is None else limit / GiB,
        current_usage_gb=(l1_bytes + l2_bytes) / GiB,
        exists=limit is not None,
        l1_usage_gb=l1_bytes / GiB,
        l2_usage_gb=l2_bytes / GiB,
    )


@delete("/quota/{cache_salt:str}", status_code=200, sync_to_thread=False, opt={SENSITIVE: ALWAYS})
def delete_quota(cache_salt: FromPath[str], runtime: NamedDependency[Runtime]) -> QuotaDeleted:
    """Removes a quota; the salt's bytes are evicted on the next cycle (limit 0)."""
    removed = runtime.l1.index.remove_quota(to_salt(cache_salt))
    return QuotaDeleted(cache_salt=cache_salt, status="removed" if removed else "not_found")


router = Router(path="/", route_handlers=[list_quotas, set_quota, get_quota, delete_quota], tags=["quota"])
