"""Bearer-token protection of the mutating and sensitive endpoints.

When the server has a token (`--http-auth-token-file`, or `LMCACHE_RS_HTTP_TOKEN`), handlers
marked `opt={SENSITIVE: ALWAYS}` (or `WHEN_SETTING` and called with a `level` query parameter)
answer 401 unless the request carries `Authorization: Bearer <token>`. Probes, status, quota
reads and metrics stay open, so Kubernetes and Prometheus need no secret; so does the
/dashboard page, which holds no data and sends the token on its /stats/history fetches. Without a token
nothing is protected (the API binds where configured; keep it on a private interface).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from lmcache_rs.http.errors import ApiError

SENSITIVE = "sensitive"
ALWAYS = "always"
#: Only requests that change something (GET /loglevel with `level`).
WHEN_SETTING = "when_setting"

Guard = Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], None]


def needs_token(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> bool:
    mode = handler.opt.get(SENSITIVE)
    return mode == ALWAYS or (mode == WHEN_SETTING and "level" in connection.query_params)


def make_guard(token: str | None) -> Guard:
    expected = f"Bearer {token}".encode() if token else None

    def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        if expected is None or not needs_token(connection, handler):
            return
        got = connection.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, expected):
            raise ApiError(
                401,
                {"error": "missing or wrong bearer token: send 'Authorization: Bearer <token>'"},
                headers={"WWW-Authenticate": 'Bearer realm="lmcache-rs"'},
            )

    return guard
