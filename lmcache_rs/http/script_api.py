"""`POST /run_script`: LMCache's script runner (it executes an uploaded Python script inside
the server process) stays off here: the route exists only to say so, with a 404 that explains
why. Nothing in the request is read, let alone run."""

from __future__ import annotations

from litestar import MediaType, Response, Router, post

from lmcache_rs.http.auth import ALWAYS, SENSITIVE

DISABLED = (
    "POST /run_script is disabled: lmcache-rs never runs code sent over HTTP. (LMCache's "
    "run_script executes an uploaded Python script inside the server; it is off by default "
    "there and not served by its multiprocess server.) Use the documented endpoints "
    "(/status, /cache/explain, /metrics, /threads) to inspect the server.\n"
)


@post(
    "/run_script", status_code=404, media_type=MediaType.TEXT, sync_to_thread=False, opt={SENSITIVE: ALWAYS}
)
def run_script() -> Response[str]:
    """Always 404 with an explanation: running code over HTTP is never enabled."""
    return Response(DISABLED, status_code=404, media_type=MediaType.TEXT)


router = Router(path="/", route_handlers=[run_script], tags=["debug"])
