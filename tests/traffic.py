"""Background traffic against a real server for the dashboard and metrics tests: simulated
workers (tests/kvsim.py) storing, looking up and retrieving for three tenants, with misses
and a few error replies. Bounded in requests and time; stops when asked."""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator

from kvsim import Worker, lookup, tokens

from lmcache_rs.client import MPClient

C = 256
BPC = C // 16  # blocks per chunk (kvsim's block size 16)
SALTS = ("alice", "bob", "carol")


def _blocks(first: int, chunks: int) -> list[int]:
    return list(range(first, first + chunks * BPC))


def _loop(url: str, model: str, seed: int, stop: threading.Event, max_rounds: int, errors: list[str]) -> None:
    try:
        with MPClient(url, timeout=20) as c:
            w = Worker(c, model=model)
            try:
                for i in itertools.islice(itertools.count(), max_rounds):
                    if stop.is_set():
                        break
                    salt = SALTS[i % len(SALTS)]
                    # A shared 3-chunk prefix per tenant and family, then 1 new chunk each round.
                    prefix = tokens(3 * C, seed=seed * 100 + i % 6)
                    t = prefix + tokens(C, seed=seed * 1_000_000 + i)
                    w.store(t, _blocks(1, 4), request_id=f"s{i}", salt=salt)
                    rid = f"r{seed}-{i}"
                    # Chunks found; every 4th lookup asks for a prompt never stored (a miss).
                    hit = lookup(c, t if i % 4 else tokens(2 * C, seed=-i - 1), rid, salt=salt, model=model)
                    if hit and i % 4:
                        w.retrieve(t, _blocks(100, hit), rid, end=hit * C, salt=salt)
                    c.end_session(rid)
                    if i % 25 == 7:  # an error reply: a store for an instance never registered
                        with contextlib.suppress(Exception):  # the error reply is the point
                            c.call("store", w.key(t, "bad"), 1, [[1]], b"")
            finally:
                w.close()
    except Exception as e:  # reported by the caller
        errors.append(f"{type(e).__name__}: {e}")


@contextlib.contextmanager
def traffic(url: str, workers: int = 2, max_rounds: int = 100_000) -> Iterator[list[str]]:
    """Runs `workers` simulated workers (one model each) until the block exits; yields the list
    their failures go to."""
    stop = threading.Event()
    errors: list[str] = []
    threads = [
        threading.Thread(
            target=_loop, args=(url, f"demo-model-{k}", k, stop, max_rounds, errors), daemon=True
        )
        for k in range(workers)
    ]
    for t in threads:
        t.start()
    try:
        yield errors
    finally:
        stop.set()
        for t in threads:
            t.join(60)


def run_traffic(url: str, workers: int = 2, rounds: int = 100) -> list[str]:
    """`rounds` rounds of every worker, to the end; returns their failures."""
    stop = threading.Event()
    errors: list[str] = []
    threads = [
        threading.Thread(target=_loop, args=(url, f"demo-model-{k}", k, stop, rounds, errors), daemon=True)
        for k in range(workers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors
