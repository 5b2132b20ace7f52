"""`GET /dashboard` (a live page for people) and `GET /stats/history` (the JSON it draws).

The page is one HTML document assembled from `static/dashboard.{html,css,js}` at its first
request: plain JavaScript that draws its charts as SVG, no library and no network access but
this server, so it works offline. A Content-Security-Policy pins its script and style by
hash and lets it talk only to this origin. It polls `/stats/history` every sample interval
(2 s), asking only for samples newer than the last it has, so a page opened late still shows
the whole window (`--stats-history-seconds`) from its first load.

Auth: the page itself holds no data and is open. `/stats/history` is a sensitive endpoint:
with a server token, it answers 401 without `Authorization: Bearer <token>`; the page takes
the token from its URL fragment (`/dashboard#token=...`, never sent to the server or logged)
or asks for it, keeps it in the tab's sessionStorage and sends it on each fetch.
"""

from __future__ import annotations

import base64
import hashlib
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from litestar import MediaType, Response, Router, get
from litestar.di import NamedDependency
from litestar.params import Parameter

from lmcache_rs.http.auth import ALWAYS, SENSITIVE
from lmcache_rs.observability.history import History

if TYPE_CHECKING:
    from lmcache_rs.runtime import Runtime

STATIC = Path(__file__).resolve().parent / "static"


class Page:
    def __init__(self, html: str, csp: str) -> None:
        self.html = html
        self.csp = csp


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@cache
def page() -> Page:
    """The page with its style and script inlined, and a CSP that allows exactly those."""
    css = (STATIC / "dashboard.css").read_text(encoding="utf-8")
    js = (STATIC / "dashboard.js").read_text(encoding="utf-8")
    html = (STATIC / "dashboard.html").read_text(encoding="utf-8")
    html = html.replace("/*STYLE*/", css).replace("/*SCRIPT*/", js)
    csp = "; ".join(
        (
            "default-src 'none'",
            f"script-src {_sha256(js)}",
            f"style-src {_sha256(css)}",
            "connect-src 'self'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )
    return Page(html, csp)


@get("/dashboard", media_type=MediaType.HTML, sync_to_thread=False)
def dashboard() -> Response[str]:
    """A live page: health and periodic threads, L1 and L2 use over time, tenants, traffic
    (lookups/s, hit ratio, store and retrieve GB/s, request time p50/p99, errors) and the
    registered workers. It holds no data itself (it reads /stats/history)."""
    p = page()
    return Response(
        p.html,
        media_type=MediaType.HTML,
        headers={
            "Content-Security-Policy": p.csp,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


@get("/stats/history", sync_to_thread=True, opt={SENSITIVE: ALWAYS})
def stats_history(
    runtime: NamedDependency[Runtime],
    since: float | None = Parameter(
        default=None, description="only samples taken after this server time (Unix seconds)"
    ),
) -> History:
    """The server now (health, periodic threads, L1/L2, tenants, workers, errors) and its
    recent samples (every --stats-history-interval-seconds, for --stats-history-seconds)."""
    return runtime.history.current(since)


router = Router(path="/", route_handlers=[dashboard, stats_history], tags=["dashboard"])
