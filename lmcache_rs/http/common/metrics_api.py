"""`GET /metrics` (Prometheus text) and `POST /metrics/reset`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar import MediaType, Response, Router, get, post
from litestar.di import NamedDependency
from prometheus_client import CONTENT_TYPE_LATEST

from lmcache_rs.http.auth import ALWAYS, SENSITIVE

if TYPE_CHECKING:
    from lmcache_rs.runtime import Runtime


@get("/metrics", sync_to_thread=True, media_type=CONTENT_TYPE_LATEST)
def metrics(runtime: NamedDependency[Runtime]) -> Response[bytes]:
    """Every metric of this server in the Prometheus text format."""
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@post(
    "/metrics/reset",
    status_code=200,
    media_type=MediaType.TEXT,
    sync_to_thread=False,
    opt={SENSITIVE: ALWAYS},
)
def metrics_reset(runtime: NamedDependency[Runtime]) -> str:
    """Resets every counter of this server to zero (for test harnesses and benchmarks)."""
    runtime.metrics.reset()
    return "ok"


router = Router(path="/", route_handlers=[metrics, metrics_reset], tags=["metrics"])
