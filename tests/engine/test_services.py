"""The data services cross into the Rust core once where a store or retrieve starts and once
where it ends (engine/shared.py, rust/control/data.rs); everything between is torch copies.
Recorded on a runtime in this process: the control plane and index calls the services make on
the transport's data workers (the background sealer is not a request)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from kvsim import Worker, lookup, tokens

from lmcache_rs.client import MPClient, ServerError
from lmcache_rs.config import StorageConfig

C = 256


class Recorder:
    """Stands in for a core object and records which of its methods a data worker calls."""

    def __init__(self, target: Any, name: str, calls: list[str]) -> None:
        self._target, self._name, self._calls = target, name, calls

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._target, attr)
        if callable(value) and threading.current_thread().name.startswith("data-worker"):
            self._calls.append(f"{self._name}.{attr}")
        return value


def test_a_store_and_a_retrieve_call_the_core_where_they_start_and_end(runtime_factory) -> None:
    rt = runtime_factory(StorageConfig(l1_size_gb=0.05))
    calls: list[str] = []
    with MPClient(rt.server.url, timeout=20) as c:
        w = Worker(c)
        sh = rt.engine.shared
        sh.control = Recorder(sh.control, "control", calls)
        sh.index = Recorder(sh.index, "index", calls)
        sh.contexts._control = Recorder(sh.contexts._control, "control", calls)
        sh.stats._control = Recorder(sh.stats._control, "control", calls)
        t = tokens(4 * C, seed=5)  # block 0 is the null block: never stored
        assert w.store(t, list(range(1, 65)))
        assert calls == ["control.store_start", "control.store_finish"]
        calls.clear()
        assert lookup(c, t, "r") == 4
        assert w.retrieve(t, list(range(65, 129)), "r")
        assert calls == ["control.read_start", "control.read_finish"]
        assert w.kv.blocks_view(list(range(1, 65)))[0].equal(w.kv.blocks_view(list(range(65, 129)))[0])
        calls.clear()
        # A retrieve that finds nothing still ends in one call.
        with pytest.raises(ServerError, match="not_found"):
            w.retrieve(tokens(4 * C, seed=6), list(range(65, 129)), "r2")
        assert calls == ["control.read_start", "control.read_finish"]
        w.close()
    assert rt.l1.index.stats()["read_leases"] == 0
