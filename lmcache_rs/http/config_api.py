"""`GET /conf` (seed) and `GET /config` (LMCache 0.5.6 name): the loaded configuration, in the
seed's shape: `mp` (with the HTTP listener's `http_host` and `http_port`, as LMCache's MP
config carries them), `storage_manager`, `observability`, and our `http` section."""

from __future__ import annotations

import logging
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
    out["mp"]["http_host"] = cfg.http.http_host
    out["mp"]["http_port"] = cfg.http.http_port
    out["observability"] = observability(cfg)
    for a in out["storage_manager"]["l2_adapters"]:
        if "url" in a:
            a["url"] = _strip_password(a["url"])
    return out


def observability(cfg: ServerConfig) -> dict[str, Any]:
    """What the server exposes to watch it: its live log level (`GET /loglevel` changes it),
    the Prometheus and OpenAPI paths, and whether the sensitive endpoints need a token."""
    return {
        "log_level": logging.getLevelName(logging.getLogger("lmcache_rs").getEffectiveLevel()),
        "metrics_enabled": cfg.http.enabled,
        "metrics_path": "/metrics",
        "openapi_path": "/schema/openapi.json",
        "http_auth_enabled": cfg.http.auth_token is not None,
    }


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
    """Every configuration section (mp, storage_manager, observability, http) as indented JSON."""
    return _config(http_state)


class AdapterInfo(msgspec.Struct):
    """One L2 adapter (LMCache 0.5.6's fields plus ours: `name`, `type`)."""

    index: int
    name: str
    type: str
    #: LMCache's field name for `type`.
    type_name: str
    tier: str
    #: The first adapter: with several, each store is written to every adapter and a lookup
    #: loads from the one holding the longest prefix, ties going to the primary.
    primary: bool
    #: Whether it can be reconfigured at run time (LMCache's /reconfigure): never here.
    reconfigurable: bool


class AdapterList(msgspec.Struct):
    adapters: list[AdapterInfo]


@get("/config/adapters", sync_to_thread=False)
def config_adapters(http_state: NamedDependency[HttpState]) -> AdapterList:
    """The configured L2 adapters in order (empty without L2)."""
    if http_state.config is None:
        raise ApiError(503, {"error": "configs not initialized"})
    out = []
    for i, a in enumerate(http_state.config.storage_manager.l2_adapters):
        kind = str(type(a).__struct_config__.tag)
        out.append(
            AdapterInfo(
                index=i,
                name=a.name or f"{kind}-{i}",
                type=kind,
                type_name=kind,
                tier="l2",
                primary=i == 0,
                reconfigurable=False,
            )
        )
    return AdapterList(adapters=out)


@get("/config", sync_to_thread=False)
def config(http_state: NamedDependency[HttpState]) -> Response[dict[str, Any]]:
    """Alias of /conf."""
    return _config(http_state)


router = Router(path="/", route_handlers=[conf, config, config_adapters], tags=["config"])
