"""The Litestar app factory. Route modules are discovered, not listed: every `*_api.py`
module of this package and of `common/` that exposes a module-level `router` is mounted
(the seed document's extension mechanism). Nothing is built at import time."""

from __future__ import annotations

import importlib
import logging
import pkgutil
from types import ModuleType

from litestar import Litestar, Router
from litestar.openapi import OpenAPIConfig

from lmcache_rs.http import common
from lmcache_rs.http.auth import make_guard
from lmcache_rs.http.deps import dependencies
from lmcache_rs.http.errors import EXCEPTION_HANDLERS, error_responses
from lmcache_rs.http.state import HttpState

log = logging.getLogger(__name__)

#: Generic modules in `common/` that this server cannot host (none yet; an embedded-engine
#: module such as a script runner would go here).
COMMON_SKIP: frozenset[str] = frozenset()


def discover(package: ModuleType, skip: frozenset[str] = frozenset()) -> list[Router]:
    routers = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not info.name.endswith("_api") or info.name in skip:
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        router = getattr(module, "router", None)
        if isinstance(router, Router):
            routers.append(router)
        else:
            log.warning("%s.%s has no module-level router; not mounted", package.__name__, info.name)
    return routers


def document_errors(router: Router) -> None:
    """Adds the shared error responses to every handler's OpenAPI entry (handler-specific
    ones win), so clients and schema fuzzers see every status code the API can answer."""
    for route in router.routes:
        for handler in getattr(route, "route_handlers", []):
            text = str(handler.media_type).startswith("text/")
            handler.responses = {**error_responses(text), **(handler.responses or {})}


def create_app(state: HttpState) -> Litestar:
    # Imported here: the runtime builds the app, and route modules name `Runtime` in their
    # signatures (Litestar resolves those annotations at registration).
    import lmcache_rs.http as http_pkg  # noqa: PLC0415
    from lmcache_rs.runtime import Runtime  # noqa: PLC0415

    routers = discover(http_pkg) + discover(common, COMMON_SKIP)
    for router in routers:
        document_errors(router)
    token = state.config.http.auth_token if state.config is not None else None
    return Litestar(
        route_handlers=routers,
        guards=[make_guard(token)],
        dependencies=dependencies(state),
        exception_handlers=EXCEPTION_HANDLERS,
        openapi_config=OpenAPIConfig(title="lmcache-rs HTTP API", version=state.version, path="/schema"),
        request_max_body_size=1 << 20,
        signature_namespace={"Runtime": Runtime, "HttpState": HttpState},
        logging_config=None,  # the server's logging is configured once, by the CLI
    )
