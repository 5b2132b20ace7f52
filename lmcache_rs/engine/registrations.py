"""Registrations: which workers the server serves (spec C.3, D.3).

Registers and unregisters workers of both transfer modes, drops the ones that go away (their
staged writes and prepared reads end with them), reaps the silent ones, and counts
`report_block_allocation`. Worker liveness itself lives in the control plane
(`ContextRegistry` mirrors it into rust/control/workers.rs).
"""

from __future__ import annotations

import logging
from typing import Any

from lmcache_rs import InvalidKeyError, KeyScope, mp_kv_rank
from lmcache_rs.engine.contexts import (
    EngineDrivenContext,
    RegistrationError,
    build_context,
    build_engine_driven,
)
from lmcache_rs.engine.shared import Shared
from lmcache_rs.protocol.codec import ProtocolError
from lmcache_rs.protocol.messages import (
    BlockAllocationRecord,
    EngineDrivenRegistered,
    EngineDrivenRegistration,
    EngineGroupInfo,
)

log = logging.getLogger(__name__)


class Registrations:
    def __init__(self, sh: Shared) -> None:
        self.sh = sh

    def register_kv_cache(
        self,
        instance_id: int,
        kv_cache: list[Any],
        model_name: str,
        world_size: int,
        engine_type: str,
        layout_hints: dict[str, Any],
        engine_group_infos: list[EngineGroupInfo],
    ) -> None:
        if self.sh.contexts.touch(instance_id, pinged=False):
            return  # already registered: a re-registration only refreshes liveness (spec C.3)
        try:
            ctx = build_context(
                instance_id,
                kv_cache,
                model_name,
                world_size,
                engine_type,
                layout_hints,
                engine_group_infos,
                self.sh.chunk_size,
            )
            KeyScope(model_name, mp_kv_rank(world_size, 0))  # the keys it will store are valid
            self._check_fits(ctx.chunk_bytes)
            self.sh.contexts.add(ctx)
        except RegistrationError as e:
            raise ProtocolError("bad_registration", str(e)) from None
        except InvalidKeyError as e:
            raise ProtocolError("invalid_key", str(e)) from None
        log.info(
            "registered instance %d: %s world %d, %d layers, %d blocks, %d bytes per chunk",
            instance_id,
            model_name,
            world_size,
            len(ctx.layer_tensors),
            ctx.num_blocks,
            ctx.chunk_bytes,
        )

    def _check_fits(self, chunk_bytes: int) -> None:
        capacity = self.sh.index.capacity_bytes
        if chunk_bytes > capacity:
            raise RegistrationError(
                f"one chunk would take {chunk_bytes} bytes and L1 holds {capacity}: "
                "raise --l1-size-gb or lower --chunk-size"
            )

    def register_engine_driven(self, reg: EngineDrivenRegistration) -> EngineDrivenRegistered:
        l1 = self.sh.l1
        if not l1.shm_name:
            why = l1.pool_error or "it runs with --shm-name ''"
            raise ProtocolError(
                "no_shm_pool",
                f"engine-driven workers copy KV through the shared-memory L1 pool, and this server has "
                f"none ({why}); pickled KV is refused",
                fallback=EngineDrivenRegistered(),
            )
        pool = EngineDrivenRegistered(shm_name=l1.shm_name, pool_size=self.sh.index.capacity_bytes)
        old = self.sh.contexts.get(reg.instance_id)
        if old is not None:  # a re-registration (heartbeat recovery) only refreshes liveness
            if not isinstance(old, EngineDrivenContext):
                raise ProtocolError(
                    "bad_registration", f"instance {reg.instance_id} is registered lmcache-driven"
                )
            return pool
        try:
            ctx = build_engine_driven(reg, self.sh.chunk_size)
            KeyScope(reg.model_name, mp_kv_rank(reg.world_size, 0))  # the keys it will store are valid
            self._check_fits(ctx.chunk_bytes)
            self.sh.contexts.add(ctx)
        except RegistrationError as e:
            raise ProtocolError("bad_registration", str(e), fallback=EngineDrivenRegistered()) from None
        except InvalidKeyError as e:
            raise ProtocolError("invalid_key", str(e), fallback=EngineDrivenRegistered()) from None
        log.info(
            "registered engine-driven instance %d: %s world %d, chunk %s %s (%d bytes)",
            reg.instance_id,
            reg.model_name,
            reg.world_size,
            ctx.chunk_shape,
            ctx.dtype_str,
            ctx.chunk_bytes,
        )
        return pool

    def unregister_kv_cache(self, instance_id: int) -> None:
        self.drop_instance(instance_id, "unregistered")

    def drop_instance(self, instance_id: int, why: str) -> bool:
        ctx = self.sh.contexts.remove(instance_id)
        if ctx is None:
            return False
        aborted = 0
        if isinstance(ctx, EngineDrivenContext):
            # The worker copies into its prepared slots itself: its leases end with it. An
            # lmcache-driven worker's stores are copied by our own threads, which end their
            # write leases themselves (finish or abort) when the copy is done.
            aborted = self.sh.index.abort_writer(instance_id)
            for r in ctx.take_all():
                self.sh.index.release(r.lease)
        log.info("instance %d %s (%d staged writes dropped)", instance_id, why, aborted)
        return True

    def reap_workers(self) -> tuple[str, dict[str, Any]]:
        mp = self.sh.cfg.mp
        if mp.worker_reap_timeout_seconds <= 0:
            return "disabled", {}
        silent = self.sh.contexts.silent(mp.worker_reap_timeout_seconds, mp.worker_registration_grace_seconds)
        reaped = [i for i in silent if self.drop_instance(i, "reaped after silence")]
        return f"Reaped {len(reaped)} workers", {"reaped_instances": reaped}

    def report_block_allocation(
        self, instance_id: int, model_name: str, records: list[BlockAllocationRecord]
    ) -> None:
        self.sh.stats.add("block_allocation_records", model_name, n=len(records))
