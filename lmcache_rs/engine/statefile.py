"""Worker registrations that survive a server restart.

LMCache's worker registers its KV cache once, at start. A server that forgot it (a crash, an
upgrade) answers its stores and retrieves "unknown instance" until the worker re-registers
(the control plane's `ping` makes that happen within two heartbeats, and only with a client that
reacts to a false ping). With a state directory the server instead records what it needs to
serve each registered worker again: the registration's own arguments (model layout, world
size, transfer mode, and the handles of the worker's KV: shared-memory names for CPU workers,
CUDA IPC handles for GPU workers). A restarted server replays them through the ordinary
registration path, so a worker that never re-registers keeps working:

* a handle whose memory is gone (the worker died meanwhile: its shm segment was unlinked, its
  IPC handle cannot be opened) fails that registration, and the worker is dropped with a log
  line;
* engine-driven workers are restored only when the L1 pool was reopened (`ShmPool.reused`):
  they copy through their own mapping of it, which a recreated pool would not be.

The file (`workers.msgpack` beside the L1 journal) is rewritten whole, temp + rename, at each
registration, unregistration and reaper run that changed the set: registrations are rare,
and the file is a few hundred bytes per worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import msgspec

from lmcache_rs.engine.engine import Engine
from lmcache_rs.protocol.codec import ProtocolError
from lmcache_rs.protocol.messages import CpuShmHandle, CudaHandle, EngineDrivenRegistration, EngineGroupInfo

log = logging.getLogger(__name__)

VERSION = 1
WORKERS = "workers.msgpack"


class LmcacheDriven(msgspec.Struct, tag="lmcache_driven", kw_only=True):
    """register_kv_cache's arguments."""

    instance_id: int
    kv_cache: list[CpuShmHandle | CudaHandle]
    model_name: str
    world_size: int
    engine_type: str
    layout_hints: dict[str, Any]
    engine_group_infos: list[EngineGroupInfo]


class EngineDriven(msgspec.Struct, tag="engine_driven", kw_only=True):
    """register_kv_cache_engine_driven_context's argument."""

    registration: EngineDrivenRegistration

    @property
    def instance_id(self) -> int:
        return self.registration.instance_id


Registration = LmcacheDriven | EngineDriven


class WorkersFile(msgspec.Struct, kw_only=True):
    version: int
    workers: list[Registration]


class RestoreReport(msgspec.Struct, kw_only=True):
    """What a start did with the previous server's registrations (`/status`)."""

    restored: list[int] = msgspec.field(default_factory=list)
    #: instance id -> why it was dropped.
    dropped: dict[int, str] = msgspec.field(default_factory=dict)


class Registrations:
    """The recorded registrations of one server, kept equal to its registered workers."""

    def __init__(self, path: str, engine: Engine) -> None:
        self.path = path
        self.engine = engine
        self._lock = threading.Lock()
        self._records: dict[int, Registration] = {}

    # ---- start ------------------------------------------------------------------------------

    def restore(self, engine_driven: bool) -> RestoreReport:
        """Registers again every worker the file lists (`engine_driven`: those too), then
        rewrites the file to the ones that are registered now."""
        report = RestoreReport()
        try:
            with open(self.path, "rb") as f:
                saved = msgspec.msgpack.decode(f.read(), type=WorkersFile)
        except FileNotFoundError:
            saved = WorkersFile(version=VERSION, workers=[])
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
            log.error("worker registrations in %s unreadable, none restored: %s", self.path, e)
            saved = WorkersFile(version=VERSION, workers=[])
        for r in saved.workers:
            why = self._replay(r, engine_driven)
            if why is None:
                self._records[r.instance_id] = r
                report.restored.append(r.instance_id)
            else:
                report.dropped[r.instance_id] = why
                log.warning("worker instance %d not restored after the restart: %s", r.instance_id, why)
        if saved.workers:
            log.info(
                "restart: %d worker registration(s) restored, %d dropped",
                len(report.restored),
                len(report.dropped),
            )
        self._save()
        return report

    def _replay(self, r: Registration, engine_driven: bool) -> str | None:
        """Why `r` cannot be registered again (None: it is)."""
        try:
            if isinstance(r, EngineDriven):
                if not engine_driven:
                    return "engine-driven, and the L1 pool it copies through was not kept"
                if "register_kv_cache_engine_driven_context" not in self.engine.handlers:
                    return "engine-driven transfer is not served any more"
                self.engine.register_engine_driven(r.registration)
            else:
                if "register_kv_cache" not in self.engine.handlers:
                    return "lmcache-driven transfer is not served any more"
                self.engine.register_kv_cache(
                    r.instance_id,
                    list(r.kv_cache),
                    r.model_name,
                    r.world_size,
                    r.engine_type,
                    r.layout_hints,
                    r.engine_group_infos,
                )
        except ProtocolError as e:
            return f"{e.code}: {e}"
        return None

    # ---- keeping the file equal to the registrations ----------------------------------------

    def wrap(self, handlers: dict[str, Callable[..., Any]]) -> None:
        """Wraps the registration handlers so that each success is recorded."""

        def registered(make: Callable[..., Registration | None], op: str) -> None:
            inner = handlers.get(op)
            if inner is None:
                return

            def handler(*args: Any) -> Any:
                out = inner(*args)
                rec = make(*args)
                if rec is not None and self.engine.contexts.get(rec.instance_id) is not None:
                    with self._lock:
                        if rec.instance_id not in self._records:
                            self._records[rec.instance_id] = rec
                            self._save_locked()
                return out

            handlers[op] = handler

        def lmcache_driven(
            iid: int, kv: list[Any], model: str, world: int, et: str, hints: Any, g: Any
        ) -> Registration | None:
            if not all(isinstance(h, CpuShmHandle | CudaHandle) for h in kv):
                return None
            return LmcacheDriven(
                instance_id=iid,
                kv_cache=list(kv),
                model_name=model,
                world_size=world,
                engine_type=et,
                layout_hints=dict(hints),
                engine_group_infos=list(g),
            )

        registered(lmcache_driven, "register_kv_cache")
        registered(lambda reg: EngineDriven(registration=reg), "register_kv_cache_engine_driven_context")
        for op in ("unregister_kv_cache", "unregister_kv_cache_engine_driven_context"):
            inner = handlers.get(op)
            if inner is not None:
                handlers[op] = self._then_sync(inner)

    def _then_sync(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        def handler(*args: Any) -> Any:
            try:
                return inner(*args)
            finally:
                self.sync()

        return handler

    def sync(self) -> int:
        """Forgets the records of workers no longer registered (unregistered, reaped); returns
        how many."""
        live = {c.instance_id for c in self.engine.contexts.all()}
        with self._lock:
            gone = [i for i in self._records if i not in live]
            for i in gone:
                del self._records[i]
            if gone:
                self._save_locked()
        return len(gone)

    def _save(self) -> None:
        with self._lock:
            self._save_locked()

    def _save_locked(self) -> None:
        data = msgspec.msgpack.encode(WorkersFile(version=VERSION, workers=list(self._records.values())))
        tmp = f"{self.path}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        except OSError as e:
            log.error("worker registrations not saved to %s: %s", self.path, e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
