"""`GET /loglevel`: list loggers, read one, or set one (and its handlers)."""

from __future__ import annotations

import logging

from litestar import MediaType, Router, get
from litestar.params import FromQuery

from lmcache_rs.http.auth import SENSITIVE, WHEN_SETTING
from lmcache_rs.http.errors import ApiError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@get("/loglevel", media_type=MediaType.TEXT, sync_to_thread=False, opt={SENSITIVE: WHEN_SETTING})
def loglevel(logger_name: FromQuery[str | None] = None, level: FromQuery[str | None] = None) -> str:
    """No parameter: every logger and its level. `logger_name`: that logger's effective level.
    `logger_name` and `level`: sets the logger and its handlers (400 on an unknown level)."""
    if logger_name is None:
        names = sorted(
            n for n in logging.root.manager.loggerDict if isinstance(logging.getLogger(n), logging.Logger)
        )
        lines = [f"root: {logging.getLevelName(logging.root.level)}"]
        lines += [f"{n}: {logging.getLevelName(logging.getLogger(n).getEffectiveLevel())}" for n in names]
        return "\n".join(lines) + "\n"
    logger = logging.getLogger(logger_name)
    if level is None:
        return f"{logger_name}: {logging.getLevelName(logger.getEffectiveLevel())}\n"
    upper = level.upper()
    if upper not in LEVELS:
        raise ApiError(400, f"Invalid log level: {level}", media_type=MediaType.TEXT)
    logger.setLevel(upper)
    for handler in logger.handlers:
        handler.setLevel(upper)
    return f"{logger_name}: {upper}\n"


router = Router(path="/", route_handlers=[loglevel], tags=["debug"])
