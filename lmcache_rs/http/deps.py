"""Dependencies injected into route handlers (no handler reads app.state itself)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar.di import Provide

from lmcache_rs.http.errors import EngineNotReady
from lmcache_rs.http.state import HttpState

if TYPE_CHECKING:
    from lmcache_rs.runtime import Runtime


def dependencies(state: HttpState) -> dict[str, Provide]:
    def provide_state() -> HttpState:
        return state

    def provide_runtime() -> Runtime:
        if state.runtime is None:
            raise EngineNotReady()
        return state.runtime

    return {
        "http_state": Provide(provide_state, sync_to_thread=False),
        "runtime": Provide(provide_runtime, sync_to_thread=False),
    }
