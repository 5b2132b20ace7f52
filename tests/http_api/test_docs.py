"""docs/http-api.md has a section for every mounted route."""

from __future__ import annotations

import re
from pathlib import Path

from lmcache_rs.http.app import create_app
from lmcache_rs.http.state import HttpState

DOC = Path(__file__).resolve().parents[2] / "docs" / "http-api.md"


def test_every_mounted_route_is_documented() -> None:
    app = create_app(HttpState())
    sections = set(re.findall(r"^## ([A-Z]+ \S+)$", DOC.read_text(), re.M))
    missing = []
    for route in app.routes:
        if route.path.startswith("/schema"):
            continue
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        for method in sorted(route.methods - {"HEAD", "OPTIONS"}):
            if f"{method} {path}" not in sections:
                missing.append(f"{method} {path}")
    assert missing == [], f"routes without a section in docs/http-api.md: {missing}"
