"""Request timings per operation: counts, sums and a fixed-bucket latency histogram.

The ZMQ server records every request it answers from a pool or inline (`record`); the metrics
collector exports the sums as `lmcache_rs_request_seconds` / `_queue_seconds` summaries and the
histogram as `lmcache_rs_request_duration_seconds` (Prometheus computes p50/p99 with
`histogram_quantile`), and the stats history (observability.history) derives the same
quantiles from the bucket counts between two samples, so the page and Grafana agree.

The buckets are fixed (no per-request allocation): one `bisect` and four additions under a
lock per request. The request time is what the server adds to a round trip: the wait for a
pool thread plus the handler.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Mapping, Sequence

import msgspec

#: Upper bounds (seconds) of the latency buckets; a last, unbounded bucket follows. From 25 us
#: (a lookup answered on the I/O thread) to 10 s (a retrieve of a long prefix on a slow host).
BUCKETS: tuple[float, ...] = (
    25e-6,
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    500e-3,
    1.0,
    2.5,
    5.0,
    10.0,
)


class OpTiming(msgspec.Struct, array_like=True):
    """One operation's totals since the start: requests, seconds in the handler, seconds
    queued for a pool thread, and requests per latency bucket (len(BUCKETS) + 1, not
    cumulative; the request time is queue + handler)."""

    count: int
    handler_seconds: float
    queue_seconds: float
    buckets: list[int]


class RequestTimings:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: dict[str, OpTiming] = {}

    def record(self, op: str, handler_s: float, queued_s: float = 0.0) -> None:
        i = bisect.bisect_left(BUCKETS, handler_s + queued_s)
        with self._lock:
            t = self._ops.get(op)
            if t is None:
                t = self._ops[op] = OpTiming(0, 0.0, 0.0, [0] * (len(BUCKETS) + 1))
            t.count += 1
            t.handler_seconds += handler_s
            t.queue_seconds += queued_s
            t.buckets[i] += 1

    def snapshot(self) -> dict[str, OpTiming]:
        """A copy of every operation's totals."""
        with self._lock:
            return {
                op: OpTiming(t.count, t.handler_seconds, t.queue_seconds, list(t.buckets))
                for op, t in self._ops.items()
            }


def diff(now: Mapping[str, OpTiming], before: Mapping[str, OpTiming]) -> dict[str, OpTiming]:
    """What happened between two snapshots (an op missing from `before` counts from zero; a
    snapshot older than a reset is treated as zero, as Prometheus treats a counter reset)."""
    out = {}
    for op, t in now.items():
        b = before.get(op)
        if b is None or b.count > t.count:
            out[op] = t
            continue
        out[op] = OpTiming(
            t.count - b.count,
            t.handler_seconds - b.handler_seconds,
            t.queue_seconds - b.queue_seconds,
            [max(0, x - y) for x, y in zip(t.buckets, b.buckets, strict=True)],
        )
    return out


def quantile(q: float, buckets: Sequence[int]) -> float | None:
    """The q-quantile of a histogram (per-bucket counts over BUCKETS and +Inf), interpolated
    linearly inside its bucket as Prometheus' `histogram_quantile` does; None when empty. A
    quantile in the unbounded bucket answers the highest finite bound."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        if n and seen + n >= rank:
            if i == len(BUCKETS):
                return BUCKETS[-1]
            lo = 0.0 if i == 0 else BUCKETS[i - 1]
            hi = BUCKETS[i]
            return lo + (hi - lo) * max(0.0, rank - seen) / n
        seen += n
    return BUCKETS[-1]
