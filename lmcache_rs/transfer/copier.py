"""CPU object copies spread over a few threads, each copying whole objects with torch at one
intra-op thread.

Why not torch's own parallelism: a store or retrieve is hundreds of small torch ops (one
`index_select` or slice copy per layer, plane and object), and with OpenMP each op is split over
the cores and ends at a barrier. When other threads want those cores (lookups, engine clients,
another transfer), one preempted OpenMP thread holds every op's barrier up: on the 2-core VM a
256 MiB store that took 40 ms alone took 60 ms typically and 1-4 s at worst while one client
looked up back to back (`benches/bench_control.py --sections tail`). Here the objects of a
request are taken one at a time by up to `threads` threads (the caller and pool helpers), each
object whole by one thread: nothing waits at a per-op barrier, and a preempted thread delays
only the object it holds.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


def default_threads() -> int:
    """Copy threads when the configuration says 0: the cores, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


class CpuCopier:
    """Runs a request's object copies on the calling thread and up to `threads - 1` shared
    helpers. Sets torch's intra-op threads to 1 for the whole process (see the module doc)."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        torch.set_num_threads(1)
        self._pool = (
            ThreadPoolExecutor(self.threads - 1, thread_name_prefix="cpu-copy") if self.threads > 1 else None
        )

    def run(self, fn: Callable[[T], None], items: Sequence[T]) -> None:
        """Calls `fn` on every item, each once. Returns only when no call is running, also when
        one raised (no copy keeps writing into or reading from memory its caller gives back
        next); then raises the first error. Items are taken in order; after an error no new
        one is started."""
        n = len(items)
        helpers = min(self.threads, n) - 1
        if helpers <= 0 or self._pool is None:
            for it in items:
                fn(it)
            return
        taken = itertools.count()  # next() on it is atomic under the GIL
        errors: list[BaseException] = []

        def work() -> None:
            while not errors and (i := next(taken)) < n:
                try:
                    fn(items[i])
                except BaseException as e:
                    errors.append(e)
                    return

        futures = [self._pool.submit(work) for _ in range(helpers)]
        work()
        for f in futures:
            # A helper still queued behind other requests' copies would find nothing left.
            if not f.cancel():
                f.result()
        if errors:
            raise errors[0]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
