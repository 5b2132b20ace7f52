"""Periodic threads with health (spec G).

Each thread runs its job every `interval` seconds. A job that raises counts as a failed run and
the loop goes on (LMCache's eviction thread dies silently instead, spec L.3). A thread is
*active* when it ticked within 3 intervals; it is *failing* after FAILING_AFTER failed runs in a
row. The server is healthy when every critical and high thread is running, active and not
failing (a loop that runs but whose every run raises does not do its job).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

log = logging.getLogger(__name__)


#: Consecutive failed runs that make a thread unhealthy (one success resets the count).
FAILING_AFTER = 3


class Level(enum.StrEnum):
    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"


class RunSummary(msgspec.Struct, kw_only=True):
    timestamp: float
    duration_ms: float
    success: bool
    message: str
    extra_info: dict[str, Any] = msgspec.field(default_factory=dict)


class ThreadStatus(msgspec.Struct, kw_only=True):
    name: str
    level: str
    interval: float
    init_wait: float
    is_running: bool
    is_active: bool
    consecutive_failures: int
    last_run_time: float | None
    last_run_ago: float | None
    total_runs: int
    failed_runs: int
    success_rate: float | None
    last_summary: RunSummary | None


#: A job returns nothing, a message, or (message, extra_info).
Job = Callable[[], str | tuple[str, dict[str, Any]] | None]


class PeriodicThread:
    def __init__(
        self,
        name: str,
        interval: float,
        level: Level,
        job: Job,
        init_wait: float = 0.0,
        max_run_seconds: float | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval of {name} must be > 0, got {interval}")
        self.name = name
        self.interval = interval
        #: A run in progress for longer than this makes the thread inactive (a job that
        #: works in bounded slices longer than its interval, like the L2 flush, sets it).
        self.max_run_seconds = 3 * interval if max_run_seconds is None else max_run_seconds
        self._run_started: float | None = None
        self.level = level
        self.init_wait = init_wait
        self._job = job
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._started_at: float | None = None
        self._last_run_mono: float | None = None
        self._last_run_wall: float | None = None
        self.total_runs = 0
        self.failed_runs = 0
        self.consecutive_failures = 0
        self._last: RunSummary | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def run_once(self) -> RunSummary:
        """Runs the job now on the calling thread and records the result."""
        t0 = time.monotonic()
        wall = time.time()
        with self._lock:
            self._run_started = t0
        try:
            out = self._job()
            message, extra = out if isinstance(out, tuple) else (out or "ok", {})
            summary = RunSummary(
                timestamp=wall,
                duration_ms=(time.monotonic() - t0) * 1e3,
                success=True,
                message=message,
                extra_info=extra,
            )
        except Exception as e:  # a failing run is counted; the loop goes on
            log.exception("periodic thread %s: run failed", self.name)
            summary = RunSummary(
                timestamp=wall,
                duration_ms=(time.monotonic() - t0) * 1e3,
                success=False,
                message=f"{type(e).__name__}: {e}",
            )
        with self._lock:
            self.total_runs += 1
            self.failed_runs += not summary.success
            self.consecutive_failures = 0 if summary.success else self.consecutive_failures + 1
            self._last = summary
            self._last_run_mono = time.monotonic()
            self._last_run_wall = wall
            self._run_started = None
        return summary

    def _loop(self) -> None:
        if self.init_wait > 0 and self._stop.wait(self.init_wait):
            return
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self.interval)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    @property
    def is_active(self) -> bool:
        if not self.is_running:
            return False
        now = time.monotonic()
        with self._lock:
            last, started = self._last_run_mono, self._run_started
        if started is not None:  # a run is in progress
            return now - started < self.max_run_seconds
        if last is None:
            assert self._started_at is not None
            return now - self._started_at < self.init_wait + 3 * self.interval
        return now - last < 3 * self.interval

    @property
    def is_failing(self) -> bool:
        return self.consecutive_failures >= FAILING_AFTER

    def status(self) -> ThreadStatus:
        with self._lock:
            last_wall, last_mono, summary = self._last_run_wall, self._last_run_mono, self._last
            total, failed = self.total_runs, self.failed_runs
        return ThreadStatus(
            name=self.name,
            level=self.level.value,
            interval=self.interval,
            init_wait=self.init_wait,
            is_running=self.is_running,
            is_active=self.is_active,
            consecutive_failures=self.consecutive_failures,
            last_run_time=last_wall,
            last_run_ago=None if last_mono is None else time.monotonic() - last_mono,
            total_runs=total,
            failed_runs=failed,
            success_rate=None if total == 0 else 100.0 * (total - failed) / total,
            last_summary=summary,
        )


class PeriodicRegistry:
    """The server's periodic threads by name (one registry per server, no global)."""

    def __init__(self) -> None:
        self._threads: dict[str, PeriodicThread] = {}
        self._lock = threading.Lock()

    def register(self, thread: PeriodicThread) -> PeriodicThread:
        with self._lock:
            old = self._threads.get(thread.name)
            self._threads[thread.name] = thread
        if old is not None:
            old.stop()
        return thread

    def get(self, name: str) -> PeriodicThread | None:
        with self._lock:
            return self._threads.get(name)

    def threads(self) -> list[PeriodicThread]:
        with self._lock:
            return list(self._threads.values())

    def start_all(self) -> None:
        for t in self.threads():
            t.start()

    def stop_all(self) -> None:
        for t in self.threads():
            t.stop()

    def unhealthy(self) -> list[PeriodicThread]:
        """Critical and high threads that are not running, have not ticked in 3 intervals, or
        failed their last FAILING_AFTER runs."""
        return [
            t
            for t in self.threads()
            if t.level in (Level.CRITICAL, Level.HIGH)
            and (not (t.is_running and t.is_active) or t.is_failing)
        ]
