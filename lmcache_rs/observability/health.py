"""Health of the data path: the request I/O loop's heartbeat and L1 (issue 14).

The HTTP layer asks the runtime, never the transport: `Runtime.io_status()` returns an
`IoLoopStatus` from whatever runs the ZMQ I/O loop (`IoLoop`: today the Python ZmqServer,
later the Rust one), and `io_problem` turns it into a reason. The rules:

* **I/O loop.** The loop ticks on every iteration; an idle loop still ticks, since it polls
  with a bounded timeout (ZmqServer.POLL_MS). Unhealthy when its thread is not alive (an
  exception escaped the loop, or the server is stopping) or has not ticked for
  `--io-stall-timeout-seconds` (a handler blocking the loop, a deadlock).
* **L1** (`l1_problems`): unhealthy when the `l1-eviction-cycle` thread is unhealthy (not
  running, not ticked within 3 intervals, or failing), or when L1 is at or above its eviction
  trigger watermark **and** chunk allocations failed for lack of space since the start of the
  previous eviction cycle (`L1Health` samples the `allocation_failures` counter after every
  cycle): L1 then stays full although the cycle runs, and stores are being dropped (every
  evictable object is locked, the policy is `noop`, or demand eviction is off and the cycle
  cannot keep up). Failures while L1 is below the watermark (the cycle has room to make) and
  a full L1 that still accepts stores are healthy.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

import msgspec

from lmcache_rs.observability.periodic import PeriodicThread

if TYPE_CHECKING:
    from lmcache_rs._core import L1Stats


class IoLoopStatus(msgspec.Struct, kw_only=True):
    """A snapshot of the request I/O loop."""

    #: The loop's thread is running (False before start, after stop, or after it died).
    alive: bool
    #: The server is stopping (the loop ends on purpose).
    stopping: bool
    #: Seconds since the loop last ticked (None: it never did).
    last_tick_ago: float | None
    #: Requests received and replies sent by the loop.
    requests_received: int
    replies_sent: int
    #: Requests handed to a pool and not yet answered.
    pending_requests: int
    #: The exception that ended the loop, if one did.
    error: str | None = None


class IoLoop(Protocol):
    """What runs the request I/O loop and reports its heartbeat."""

    def io_status(self) -> IoLoopStatus: ...


def io_problem(st: IoLoopStatus, stall_after: float) -> str | None:
    """Why the I/O loop is unhealthy, or None (rules in the module docstring)."""
    if not st.alive:
        if st.error is not None:
            return f"request I/O thread died: {st.error}"
        if st.stopping:
            return "request I/O thread stopped: the server is shutting down"
        return "request I/O thread is not running"
    if st.last_tick_ago is None or st.last_tick_ago > stall_after:
        ago = "never" if st.last_tick_ago is None else f"{st.last_tick_ago:.1f} s ago"
        return (
            f"request I/O thread stalled: last loop iteration {ago} (limit {stall_after:g} s), "
            f"{st.pending_requests} requests pending"
        )
    return None


def describe_thread(t: PeriodicThread) -> str:
    """Why a periodic thread is unhealthy, in one phrase."""
    st = t.status()
    since = "never ran" if st.last_run_ago is None else f"last ran {st.last_run_ago:.1f} s ago"
    state = "not running" if not st.is_running else since
    if st.is_running and t.is_failing and st.last_summary is not None:
        state = f"failed its last {st.consecutive_failures} runs ({st.last_summary.message})"
    return f"periodic thread {t.name} ({t.level.value}, every {t.interval:g} s) {state}"


class L1Health:
    """Samples L1's `allocation_failures` counter after every eviction cycle, so a status
    request can tell how many allocations failed since the previous cycle began, whoever
    else asks and however often."""

    def __init__(self, failures: int) -> None:
        self._lock = threading.Lock()
        #: The counter after the last two cycles (both the start value at first).
        self._samples = (failures, failures)

    def tick(self, failures: int) -> None:
        """Called after each eviction cycle with the counter's value."""
        with self._lock:
            self._samples = (self._samples[1], failures)

    def recent_failures(self, failures: int) -> int:
        """Allocation failures since the start of the previous cycle (at most two intervals)."""
        with self._lock:
            return max(0, failures - self._samples[0])


def l1_problems(
    stats: L1Stats,
    recent_failures: int,
    trigger_watermark: float,
    eviction: PeriodicThread | None,
    policy: str,
    demand_eviction: bool,
) -> list[str]:
    """Why L1 is unhealthy (empty: healthy); rules in the module docstring."""
    problems = []
    if eviction is None:
        problems.append("the l1-eviction-cycle thread is not registered")
    elif not (eviction.is_running and eviction.is_active) or eviction.is_failing:
        problems.append(describe_thread(eviction))
    ratio = stats["usage_ratio"]
    if recent_failures > 0 and ratio >= trigger_watermark:
        why = f"{stats['read_locked_objects']} objects read-locked and {stats['staging_objects']} "
        why += "being written cannot be evicted"
        if policy == "noop":
            why += "; policy noop never evicts"
        elif not demand_eviction:
            why += "; demand eviction is off"
        problems.append(
            f"L1 is full ({ratio:.0%} used, trigger watermark {trigger_watermark:.0%}) and refused "
            f"{recent_failures} chunk allocations for lack of space since the previous eviction "
            f"cycle: {why}"
        )
    return problems
