"""One error path: handlers raise `ApiError` (or a Litestar exception), the handlers below
turn it into the JSON body the seed document specifies for that endpoint."""

from __future__ import annotations

import logging
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.openapi.datastructures import ResponseSpec

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error reply: `body` is sent as given (the seed's per-endpoint shapes)."""

    def __init__(
        self,
        status_code: int,
        body: Any,
        media_type: str = MediaType.JSON,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(str(body))
        self.status_code = status_code
        self.body = body
        self.media_type = media_type
        self.headers = headers


class EngineNotReady(ApiError):
    def __init__(self, body: Any = None) -> None:
        super().__init__(503, body or {"error": "engine not initialized"})


def api_error_handler(_: Request[Any, Any, Any], exc: ApiError) -> Response[Any]:
    return Response(
        content=exc.body, status_code=exc.status_code, media_type=exc.media_type, headers=exc.headers
    )


def http_exception_handler(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    body: dict[str, Any] = {"error": exc.detail, "status_code": exc.status_code, "detail": exc.detail}
    if isinstance(exc, ValidationException) and exc.extra:
        body["extra"] = exc.extra
    return Response(content=body, status_code=exc.status_code, media_type=MediaType.JSON)


def not_found_handler(request: Request[Any, Any, Any], exc: NotFoundException) -> Response[Any]:
    return Response(content={"error": f"Not Found: {request.url.path}"}, status_code=404)


def internal_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
    return Response(content={"error": f"internal error: {type(exc).__name__}"}, status_code=500)


EXCEPTION_HANDLERS: dict[Any, Any] = {
    ApiError: api_error_handler,
    NotFoundException: not_found_handler,
    HTTPException: http_exception_handler,
    Exception: internal_error_handler,
}


def error_responses(text: bool = False) -> dict[int, ResponseSpec]:
    """What every handler may answer besides success, for the OpenAPI document: 400 (bad
    input), 401 (missing token, sensitive routes), 404 (unknown name), 503 (engine not up or
    unhealthy), 500 (a bug, logged). Bodies are JSON objects (`error`, or the seed's
    `status`/`reason` shapes); `text` handlers answer errors as text/plain."""

    def spec(what: str) -> ResponseSpec:
        if text:
            return ResponseSpec(data_container=str, media_type=MediaType.TEXT, description=what)
        return ResponseSpec(data_container=dict[str, Any], description=what, generate_examples=False)

    return {
        400: spec("Bad input"),
        401: ResponseSpec(
            data_container=dict[str, Any], description="Bearer token required", generate_examples=False
        ),
        404: spec("Not found"),
        500: spec("Internal error (logged)"),
        503: spec("Engine not initialized or unhealthy"),
    }
