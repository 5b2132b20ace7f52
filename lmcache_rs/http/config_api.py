"""`GET /conf` (seed) and `GET /config` (LMCache 0.5.6 name): the loaded configuration."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
from litestar import MediaType, Response, Router, get
from litestar.di import NamedDependency

from lmcache_rs.config import ServerConfig
from lmcache_rs.http.errors import ApiError
from lmcache_rs.http.state import HttpState


def redacted(cfg: ServerConfig) -> dict[str, Any]:
    """The configuration without secrets: the HTTP token and passwords in L2 URLs."""
    out: dict[str, Any] = msgspec.to_builtins(cfg)
    if out["http"].get("auth_token"):
        out["http"]["auth_token"] = "***"
    for a in out["storage_manager"]["l2_adapters"]:
        if "url" in a:
            a["url"] = _strip_password(a["url"])
    return out


def _strip_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _config(http_state: NamedDependency[HttpState]) -> Response[Any]:
    if http_state.config is None:
        raise ApiError(503, {"error": "configs not initialized"})
    body = msgspec.json.format(msgspec.json.encode(redacted(http_state.config)), indent=2)
    return Response(body, media_type=MediaType.JSON)


@get("/conf", sync_to_thread=False)
def conf(http_state: NamedDependency[HttpState]) -> Response[dict[str, Any]]:
    """Every configuration section (mp, storage_manager, http) as indented JSON."""
    return _config(http_state)


@get("/config", sync_to_thread=False)
def config(http_state: NamedDependency[HttpState]) -> Response[dict[str, Any]]:
    """Alias of /conf."""
    return _config(http_state)


router = Router(path="/", route_handlers=[conf, config], tags=["config"])
