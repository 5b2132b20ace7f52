"""`/periodic-threads`, `/periodic-threads/{thread_name}`, `/periodic-threads-health`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
from litestar import Router, get
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery

from lmcache_rs.http.errors import ApiError
from lmcache_rs.observability.periodic import Level, ThreadStatus

if TYPE_CHECKING:
    from lmcache_rs.runtime import Runtime

LEVEL_NAMES = ", ".join(lv.value for lv in Level)


class LevelCounts(msgspec.Struct):
    total: int
    running: int
    active: int


class Summary(msgspec.Struct):
    total_count: int
    running_count: int
    active_count: int
    by_level: dict[str, LevelCounts]


class PeriodicThreads(msgspec.Struct):
    summary: Summary
    threads: list[ThreadStatus]


class UnhealthyThread(msgspec.Struct):
    name: str
    level: str
    last_run_ago: float | None
    interval: float


class PeriodicHealth(msgspec.Struct):
    healthy: bool
    unhealthy_count: int
    unhealthy_threads: list[UnhealthyThread]


@get("/periodic-threads", sync_to_thread=False)
def periodic_threads(
    runtime: NamedDependency[Runtime],
    level: FromQuery[str | None] = None,
    running_only: FromQuery[bool] = False,
    active_only: FromQuery[bool] = False,
) -> PeriodicThreads:
    """Every periodic thread with its last run; filters by level, running, active."""
    if level is not None and level not in {lv.value for lv in Level}:
        raise ApiError(400, {"error": f"Invalid level: {level}. Valid values: {LEVEL_NAMES}"})
    statuses = [t.status() for t in runtime.periodic.threads()]
    by_level = {
        lv.value: LevelCounts(
            total=sum(s.level == lv.value for s in statuses),
            running=sum(s.level == lv.value and s.is_running for s in statuses),
            active=sum(s.level == lv.value and s.is_active for s in statuses),
        )
        for lv in Level
    }
    summary = Summary(
        total_count=len(statuses),
        running_count=sum(s.is_running for s in statuses),
        active_count=sum(s.is_active for s in statuses),
        by_level=by_level,
    )
    shown = [
        s
        for s in statuses
        if (level is None or s.level == level)
        and (not running_only or s.is_running)
        and (not active_only or s.is_active)
    ]
    return PeriodicThreads(summary=summary, threads=shown)


@get("/periodic-threads/{thread_name:str}", sync_to_thread=False)
def periodic_thread(thread_name: FromPath[str], runtime: NamedDependency[Runtime]) -> ThreadStatus:
    """One periodic thread's status (404 when unknown)."""
    t = runtime.periodic.get(thread_name)
    if t is None:
        raise ApiError(404, {"error": f"Thread not found: {thread_name}"})
    return t.status()


@get("/periodic-threads-health", sync_to_thread=False)
def periodic_health(runtime: NamedDependency[Runtime]) -> PeriodicHealth:
    """Critical and high threads that are not running or missed 3 intervals."""
    bad = [t.status() for t in runtime.periodic.unhealthy()]
    return PeriodicHealth(
        healthy=not bad,
        unhealthy_count=len(bad),
        unhealthy_threads=[
            UnhealthyThread(name=s.name, level=s.level, last_run_ago=s.last_run_ago, interval=s.interval)
            for s in bad
        ],
    )


router = Router(
    path="/", route_handlers=[periodic_threads, periodic_thread, periodic_health], tags=["periodic threads"]
)
