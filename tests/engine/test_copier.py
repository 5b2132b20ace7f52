"""CpuCopier: every object copied once, in parallel, and nothing left running when it returns."""

from __future__ import annotations

import threading

import pytest
import torch

from lmcache_rs.cli import _parser, build_config
from lmcache_rs.config import ConfigError, MPConfig
from lmcache_rs.transfer.copier import CpuCopier, default_threads


def test_every_item_once_and_torch_at_one_thread() -> None:
    copier = CpuCopier(3)
    try:
        assert torch.get_num_threads() == 1
        seen: list[int] = []
        lock = threading.Lock()

        def fn(i: int) -> None:
            with lock:
                seen.append(i)

        copier.run(fn, list(range(100)))
        assert sorted(seen) == list(range(100))
        copier.run(fn, [])
    finally:
        copier.close()
    assert 1 <= default_threads() <= 4


def test_items_run_at_once_on_two_threads() -> None:
    """Two items that each wait for the other: only a parallel run finishes them."""
    copier = CpuCopier(2)
    both = threading.Barrier(2, timeout=30)
    threads: set[int] = set()
    try:
        copier.run(lambda i: (threads.add(threading.get_ident()), both.wait()), [0, 1])
    finally:
        copier.close()
    assert len(threads) == 2


def test_one_thread_copies_on_the_caller() -> None:
    copier = CpuCopier(1)
    me = threading.get_ident()
    where: list[int] = []
    copier.run(lambda i: where.append(threading.get_ident()), [0, 1, 2])
    copier.close()
    assert where == [me, me, me]


def test_an_error_returns_only_when_no_copy_runs() -> None:
    """The first item fails while the second is still copying: `run` raises only after the
    second finished (its caller frees the memory next), and starts no further item."""
    copier = CpuCopier(2)
    running = 0
    started: list[int] = []
    lock = threading.Lock()
    second_in = threading.Event()

    def fn(i: int) -> None:
        nonlocal running
        with lock:
            running += 1
            started.append(i)
        try:
            if i == 0:
                assert second_in.wait(30)
                raise ValueError("copy 0 failed")
            if i == 1:
                second_in.set()
                threading.Event().wait(0.2)  # still copying when item 0 fails
        finally:
            with lock:
                running -= 1

    try:
        with pytest.raises(ValueError, match="copy 0 failed"):
            copier.run(fn, list(range(50)))
        assert running == 0
        assert len(started) < 50
    finally:
        copier.close()


def test_a_busy_pool_does_not_hold_a_request_up() -> None:
    """Another request's copies occupy the helper: the next request copies its items on its own
    thread and returns without waiting for the helper."""
    copier = CpuCopier(2)
    release = threading.Event()
    blocked = threading.Barrier(3, timeout=30)

    def slow(i: int) -> None:
        blocked.wait()
        assert release.wait(30)

    a = threading.Thread(target=copier.run, args=(slow, [0, 1]))
    a.start()
    try:
        blocked.wait()  # both of A's items are running: the helper is taken
        done: list[int] = []
        b = threading.Thread(target=copier.run, args=(done.append, [0, 1, 2]))
        b.start()
        b.join(30)
        assert not b.is_alive()
        assert sorted(done) == [0, 1, 2]
    finally:
        release.set()
        a.join(30)
        copier.close()


def test_the_flag_sets_the_copy_threads() -> None:
    assert build_config(_parser().parse_args(["server", "--cpu-copy-threads", "3"])).mp.cpu_copy_threads == 3
    assert build_config(_parser().parse_args(["server"])).mp.cpu_copy_threads == 0  # the cores, <= 4
    with pytest.raises(ConfigError, match="--cpu-copy-threads"):
        MPConfig(cpu_copy_threads=-1)
