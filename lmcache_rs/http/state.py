"""What route handlers get injected: the runtime (once ready) and build information."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from lmcache_rs import __version__

if TYPE_CHECKING:
    from lmcache_rs.config import ServerConfig
    from lmcache_rs.runtime import Runtime


@cache
def commit_id() -> str:
    """The git commit of the installed source tree, or "NA"."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip() or "NA"
    except (OSError, subprocess.SubprocessError):
        return "NA"


class HttpState:
    """Set `runtime` once the engine is up; until then engine routes answer 503.
    (A plain class: Litestar introspects dataclass fields of injected values.)"""

    def __init__(self, config: ServerConfig | None = None, runtime: Runtime | None = None) -> None:
        self.config = config
        self.runtime = runtime
        self.version = __version__
        self.commit = commit_id()


class ErrorBody(msgspec.Struct):
    error: str
