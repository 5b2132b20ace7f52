"""`GET /env`: the process environment, sorted, as pretty JSON in text/plain. Values of
secret-looking variables are masked (LMCache prints them, spec L.15)."""

from __future__ import annotations

import json
import os
import re

from litestar import MediaType, Router, get

from lmcache_rs.http.auth import ALWAYS, SENSITIVE

SECRET = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_?KEY|AUTH)", re.I)
MASK = "***"


def masked_environ() -> dict[str, str]:
    return {k: (MASK if SECRET.search(k) else v) for k, v in os.environ.items()}


@get("/env", media_type=MediaType.TEXT, sync_to_thread=False, opt={SENSITIVE: ALWAYS})
def env() -> str:
    """Environment variables (secret-looking values masked)."""
    return json.dumps(masked_environ(), indent=2, sort_keys=True)


router = Router(path="/", route_handlers=[env], tags=["debug"])
