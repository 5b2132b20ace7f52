"""`GET /version`, `/lmc_version`, `/commit_id`: JSON strings."""

from __future__ import annotations

import msgspec
from litestar import MediaType, Response, Router, get
from litestar.di import NamedDependency

from lmcache_rs.http.state import HttpState


def _json_string(value: str) -> Response[bytes]:
    return Response(msgspec.json.encode(value), media_type=MediaType.JSON)


@get("/version", sync_to_thread=False)
def version(http_state: NamedDependency[HttpState]) -> Response[bytes]:
    """`<package version>-<commit id>`."""
    return _json_string(f"{http_state.version}-{http_state.commit}")


@get("/lmc_version", sync_to_thread=False)
def lmc_version(http_state: NamedDependency[HttpState]) -> Response[bytes]:
    """The package version."""
    return _json_string(http_state.version)


@get("/commit_id", sync_to_thread=False)
def commit_id(http_state: NamedDependency[HttpState]) -> Response[bytes]:
    """The git commit of the running source (`NA` when unknown)."""
    return _json_string(http_state.commit)


router = Router(path="/", route_handlers=[version, lmc_version, commit_id], tags=["version"])
