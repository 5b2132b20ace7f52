"""Registered KV caches of workers (spec C.3) and the per-(model, world) layouts they share."""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lmcache_rs import ControlPlane
from lmcache_rs.engine.groups import FULL_ATTENTION, ObjectGroup, ObjectLayout, object_groups
from lmcache_rs.protocol.messages import (
    CpuShmHandle,
    CudaHandle,
    CudaRawHandle,
    EngineDrivenRegistration,
    EngineGroupInfo,
    Unsupported,
)
from lmcache_rs.transfer.cpu_shm import HandleError, MappedTensor, parse_dtype
from lmcache_rs.transfer.gather import GroupLayout

if TYPE_CHECKING:
    from lmcache_rs._core import ReadStart, StoreStart
    from lmcache_rs.transfer.cuda import CudaMover


class RegistrationError(ValueError):
    """A register_kv_cache request that cannot be served; the message says why."""


#: Per object group `(id, window, whole object bytes, tail object bytes)`: what every worker
#: of one (model, world) must agree on.
Signature = tuple[tuple[int, int, int, int], ...]


def _describe(sig: Signature) -> str:
    if len(sig) == 1 and sig[0][1] == FULL_ATTENTION:
        return f"{sig[0][2]} bytes per chunk"
    return ", ".join(f"object group {g} (window {w}: {b} bytes per object)" for g, w, b, _ in sig)


@dataclass
class KVContext:
    """One worker's registered KV cache."""

    instance_id: int
    model_name: str
    world_size: int
    engine_type: str
    layer_tensors: list[torch.Tensor]
    #: One layout per engine group, in registration order (the order of `block_ids`).
    groups: list[GroupLayout]
    num_blocks: int
    chunk_tokens: int
    chunk_bytes: int
    #: The object groups the engine groups are stored as (engine/groups.py).
    objects: ObjectLayout = ()
    mappings: list[Any] = field(repr=False, default_factory=list)
    registered_at: float = field(default_factory=time.monotonic)
    device: str = "cpu"
    #: The CUDA copier (stream, staging) of a GPU worker; None for CPU workers.
    mover: CudaMover | None = field(repr=False, default=None)

    @property
    def layout_key(self) -> tuple[str, int]:
        return (self.model_name, self.world_size)

    @property
    def object_layout(self) -> ObjectLayout:
        return self.objects

    @functools.cached_property
    def read_groups(self) -> list[tuple[int, int | None, int]]:
        """What `ControlPlane.read_start` plans a retrieve from (`control_layout`)."""
        return control_layout(self.objects)

    @property
    def layout_signature(self) -> Signature:
        """What every worker of one (model, world) must agree on: windows and object sizes."""
        return tuple(og.signature() for og in self.objects)

    def status(self) -> dict[str, Any]:
        g0 = self.groups[0]
        return {
            "model_name": self.model_name,
            "world_size": self.world_size,
            "kv_cache_layout": {
                "num_layers": len(self.layer_tensors),
                "block_size": g0.block_size,
                "hidden_dim_sizes": [g.hidden for g in self.groups],
                "dtype": str(g0.dtype),
                "is_mla": g0.fmt == "MLA",
                "num_blocks": self.num_blocks,
                "gpu_kv_format": g0.fmt,
                "gpu_kv_shape": {
                    "NHD": "NL x [2, NB, BS, NH, HS]",
                    "HND": "NL x [2, NB, NH, BS, HS]",
                    "MLA": "NL x [NB, BS, HS]",
                }[g0.fmt],
                "gpu_kv_concrete_shape": f"{len(self.layer_tensors)} x {list(self.layer_tensors[0].shape)}",
                "attention_backend": "MLA" if g0.fmt == "MLA" else f"paged attention ({g0.fmt})",
                "cache_size_per_token": self.chunk_bytes // max(1, self.chunk_tokens),
                "object_groups": [og.status() for og in self.objects],
            },
        }


@dataclass
class PreparedStore:
    """A prepare_store waiting for its commit: its started store (`ControlPlane.store_start`),
    the chunks staged for this worker to write (one batch, object group 0)."""

    start: StoreStart
    at: float = field(default_factory=time.monotonic)


@dataclass
class PreparedRetrieve:
    """A prepare_retrieve waiting for its commit: its started retrieve
    (`ControlPlane.read_start`), whose read lease holds the chunks the worker copies out of."""

    start: ReadStart
    at: float = field(default_factory=time.monotonic)

    @property
    def lease(self) -> int:
        return self.start.lease


#: (request_id, worker_id, start, end, cache_salt): what pairs a commit with its prepare.
PrepareKey = tuple[str, int | None, int, int, str]

#: Prepared and not yet committed operations one worker may hold; beyond, prepare fails (a
#: worker that never commits would otherwise pin L1 until the locks' TTLs).
MAX_PREPARED = 1024


def _drop_older(table: dict[PrepareKey, list[Any]], cutoff: float) -> list[Any]:
    """Removes and returns the entries of `table` prepared before `cutoff`."""
    gone: list[Any] = []
    for k, items in list(table.items()):
        gone += [p for p in items if p.at < cutoff]
        keep = [p for p in items if p.at >= cutoff]
        if keep:
            table[k] = keep
        else:
            del table[k]
    return gone


@dataclass
class EngineDrivenContext:
    """One engine-driven worker (spec D.3): it copies chunks itself, into and out of L1 slots
    of the shared-memory pool; the server only hands out slots and admits or unlocks them."""

    instance_id: int
    model_name: str
    world_size: int
    block_size: int
    num_layers: int
    hidden: int
    dtype: torch.dtype
    use_mla: bool
    chunk_tokens: int
    #: Tokens (physical slots) per chunk object: `num_physical_slots` or the chunk size.
    slots: int
    registered_at: float = field(default_factory=time.monotonic)
    device: str = "cpu"
    engine_type: str = "engine_driven"
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    stores: dict[PrepareKey, list[PreparedStore]] = field(default_factory=dict, repr=False)
    reads: dict[PrepareKey, list[PreparedRetrieve]] = field(default_factory=dict, repr=False)

    @property
    def layout_key(self) -> tuple[str, int]:
        return (self.model_name, self.world_size)

    @property
    def object_layout(self) -> ObjectLayout:
        """One full-attention group of `chunk_bytes` objects (hybrid models are refused)."""
        return (
            ObjectGroup(
                id=0,
                window=FULL_ATTENTION,
                tag=0,
                engine_groups=(),
                kernels=(),
                chunk_tokens=self.chunk_tokens,
                whole_rows=(),
            ),
        )

    @property
    def layout_signature(self) -> Signature:
        return ((0, FULL_ATTENTION, self.chunk_bytes, 0),)

    @property
    def chunk_shape(self) -> list[int]:
        if self.use_mla:
            return [self.num_layers, self.slots, self.hidden]
        return [2, self.num_layers, self.slots, self.hidden]

    @property
    def chunk_bytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.chunk_shape:
            n *= d
        return n

    @property
    def dtype_str(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def prepared(self) -> int:
        with self.lock:
            return sum(map(len, self.stores.values())) + sum(map(len, self.reads.values()))

    def push(self, table: dict[PrepareKey, list[Any]], key: PrepareKey, item: Any) -> None:
        with self.lock:
            table.setdefault(key, []).append(item)

    def pop(self, table: dict[PrepareKey, list[Any]], key: PrepareKey) -> Any:
        """The oldest prepared operation under `key`, removed (None if there is none)."""
        with self.lock:
            items = table.get(key)
            if not items:
                return None
            item = items.pop(0)
            if not items:
                del table[key]
            return item

    def take_key(self, table: dict[PrepareKey, list[Any]], key: PrepareKey) -> list[Any]:
        """Every prepared operation under `key`, removed."""
        with self.lock:
            return table.pop(key, [])

    def take_all(self) -> list[PreparedRetrieve]:
        """Forgets every prepared operation; returns the retrieves, whose leases the caller
        releases (staged writes go with the writer's `abort_writer`)."""
        with self.lock:
            reads = [p for v in self.reads.values() for p in v]
            self.stores.clear()
            self.reads.clear()
        return reads

    def take_older(
        self, store_cutoff: float, read_cutoff: float
    ) -> tuple[list[PreparedStore], list[PreparedRetrieve]]:
        """Drops prepared operations older than the cutoffs (their leases have expired in the
        index). Returns the stores, whose staging the caller aborts, and the retrieves."""
        with self.lock:
            return _drop_older(self.stores, store_cutoff), _drop_older(self.reads, read_cutoff)

    def status(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "world_size": self.world_size,
            "transfer_mode": "engine_driven",
            "kv_cache_layout": {
                "num_layers": self.num_layers,
                "block_size": self.block_size,
                "hidden_dim_sizes": [self.hidden],
                "dtype": str(self.dtype),
                "is_mla": self.use_mla,
                "num_blocks": 0,
                "gpu_kv_format": "engine_driven",
                "gpu_kv_shape": "worker-side (copies chunks itself)",
                "gpu_kv_concrete_shape": f"chunk {self.chunk_shape}",
                "attention_backend": "engine-driven shared-memory slots",
                "cache_size_per_token": self.chunk_bytes // max(1, self.chunk_tokens),
            },
            "prepared_operations": self.prepared(),
        }


def build_engine_driven(reg: EngineDrivenRegistration, chunk_size: int) -> EngineDrivenContext:
    if not 1 <= reg.world_size <= 255:
        raise RegistrationError(f"world_size must be in 1..255, got {reg.world_size}")
    if len(reg.engine_group_infos) > 1:
        raise RegistrationError(
            f"{len(reg.engine_group_infos)} engine groups (a hybrid model): engine-driven transfer "
            "serves one KV group; use the lmcache-driven path (register_kv_cache)"
        )
    for name, v in (
        ("block_size", reg.block_size),
        ("num_layers", reg.num_layers),
        ("hidden_dim_size", reg.hidden_dim_size),
    ):
        if v <= 0:
            raise RegistrationError(f"{name} must be > 0, got {v}")
    if chunk_size % reg.block_size:
        raise RegistrationError(
            f"chunk size {chunk_size} is not a multiple of the block size {reg.block_size}"
        )
    slots = chunk_size if reg.num_physical_slots is None else reg.num_physical_slots
    if slots <= 0:
        raise RegistrationError(f"num_physical_slots must be > 0, got {slots}")
    try:
        dtype = parse_dtype(reg.dtype_str)
    except HandleError as e:
        raise RegistrationError(str(e)) from None
    return EngineDrivenContext(
        instance_id=reg.instance_id,
        model_name=reg.model_name,
        world_size=reg.world_size,
        block_size=reg.block_size,
        num_layers=reg.num_layers,
        hidden=reg.hidden_dim_size,
        dtype=dtype,
        use_mla=reg.use_mla,
        chunk_tokens=chunk_size,
        slots=slots,
    )


def _layer_group(t: torch.Tensor, kv_layout: str | None, layers: tuple[int, ...]) -> GroupLayout:
    if t.dim() == 5:
        if kv_layout not in ("NHD", "HND"):
            raise RegistrationError(
                "layout_hints.kv_layout must be 'NHD' or 'HND' for 5-D KV tensors "
                f"(got {kv_layout!r}); guessing misreads NHD as HND (spec C.3)"
            )
        if t.shape[0] != 2:
            raise RegistrationError(f"5-D KV tensors must have K/V first ([2, ...]), got {list(t.shape)}")
        if kv_layout == "NHD":
            _, _, bs, h, d = t.shape
        else:
            _, _, h, bs, d = t.shape
        return GroupLayout(layers, kv_layout, 2, bs, h, d, t.dtype)
    if t.dim() == 3:
        _, bs, d = t.shape
        return GroupLayout(layers, "MLA", 1, bs, 1, d, t.dtype)
    raise RegistrationError(f"unsupported KV tensor shape {list(t.shape)} (expected 5-D or MLA 3-D)")


def build_context(
    instance_id: int,
    handles: list[Any],
    model_name: str,
    world_size: int,
    engine_type: str,
    layout_hints: dict[str, Any],
    group_infos: list[EngineGroupInfo],
    chunk_size: int,
) -> KVContext:
    if not handles:
        raise RegistrationError("kv_cache is empty")
    if not 1 <= world_size <= 255:
        raise RegistrationError(f"world_size must be in 1..255, got {world_size}")
    mappings: list[Any] = []
    tensors: list[torch.Tensor] = []
    for i, h in enumerate(handles):
        if isinstance(h, CpuShmHandle):
            try:
                m = MappedTensor(h)
            except HandleError as e:
                raise RegistrationError(f"kv_cache[{i}]: {e}") from None
            mappings.append(m)
            tensors.append(m.tensor)
        elif isinstance(h, CudaHandle):
            if not torch.cuda.is_available():
                raise RegistrationError(
                    f"kv_cache[{i}] is a cuda handle and this server has no CUDA device; run it on "
                    "the workers' node with their GPUs visible"
                )
            from lmcache_rs.transfer.cuda import open_cuda_tensor  # noqa: PLC0415

            try:
                tensors.append(open_cuda_tensor(h))
            except (HandleError, RuntimeError) as e:
                raise RegistrationError(f"kv_cache[{i}]: {e}") from None
        elif isinstance(h, CudaRawHandle):
            raise RegistrationError(
                f"kv_cache[{i}] is a cuda_raw handle (isolated IPC); this server maps torch "
                "shared-storage (cuda) handles: run the workers without isolated IPC"
            )
        elif isinstance(h, Unsupported):
            raise RegistrationError(f"kv_cache[{i}]: handle type {h.type!r} is not supported")
        else:
            raise RegistrationError(f"kv_cache[{i}] is not a KV tensor handle (ext type 1)")
    kv_layout = layout_hints.get("kv_layout")
    for gi in group_infos:
        if gi.recurrent_state:
            raise RegistrationError(
                f"engine group {gi.engine_group_id} holds recurrent state (a Mamba-style layer); "
                "only attention KV (full or sliding-window) can be stored"
            )
    if not group_infos:
        group_infos = [EngineGroupInfo(engine_group_id=0, layer_indices=list(range(len(tensors))))]
    seen: set[int] = set()
    groups: list[GroupLayout] = []
    for gi in group_infos:
        layers = tuple(gi.layer_indices)
        if not layers or any(not 0 <= li < len(tensors) for li in layers) or seen & set(layers):
            raise RegistrationError(f"engine group {gi.engine_group_id}: bad layer_indices {list(layers)}")
        seen |= set(layers)
        first = _layer_group(tensors[layers[0]], kv_layout, layers)
        for li in layers[1:]:
            t = tensors[li]
            if t.shape != tensors[layers[0]].shape or t.dtype != first.dtype:
                raise RegistrationError(f"layer {li} differs in shape or dtype from its group")
        if gi.tokens_per_block and gi.tokens_per_block != first.block_size:
            raise RegistrationError(
                f"engine group {gi.engine_group_id}: tokens_per_block {gi.tokens_per_block} != "
                f"tensor block size {first.block_size}"
            )
        if chunk_size % first.block_size:
            raise RegistrationError(
                f"chunk size {chunk_size} is not a multiple of the block size {first.block_size}"
            )
        groups.append(first)
    if len(seen) != len(tensors):
        raise RegistrationError("engine groups do not cover every KV layer")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise RegistrationError(f"KV tensors on several devices: {sorted(map(str, devices))}")
    num_blocks = int(tensors[0].shape[1] if tensors[0].dim() == 5 else tensors[0].shape[0])
    objects = object_groups(
        [gi.sw_size_tokens for gi in group_infos],
        [gi.extra_object_group_tag for gi in group_infos],
        groups,
        chunk_size,
        [gi.engine_group_id for gi in group_infos],
    )
    chunk_bytes = sum(g.chunk_bytes(chunk_size) for g in groups)
    mover = None
    if tensors[0].is_cuda:
        from lmcache_rs.transfer.cuda import CudaMover  # noqa: PLC0415

        mover = CudaMover(tensors[0].device, max(og.whole_bytes for og in objects))
    return KVContext(
        instance_id=instance_id,
        model_name=model_name,
        world_size=world_size,
        engine_type=engine_type,
        layer_tensors=tensors,
        groups=groups,
        num_blocks=num_blocks,
        chunk_tokens=chunk_size,
        chunk_bytes=chunk_bytes,
        objects=objects,
        mappings=mappings,
        device="cuda" if mover is not None else "cpu",
        mover=mover,
    )


AnyContext = KVContext | EngineDrivenContext


class ContextRegistry:
    """Contexts by instance id and a ref-counted layout per (model_name, world_size).

    Liveness (last heard from, pinged) lives in the control plane (`_core.ControlPlane`,
    rust/control/workers.rs), where the native `ping` updates it without Python; the registry
    tells it which workers and layouts exist."""

    def __init__(self, control: ControlPlane) -> None:
        self._lock = threading.Lock()
        self._control = control
        self._contexts: dict[int, AnyContext] = {}
        #: (model, world) -> (its object groups, their signature, registrations using it)
        self._layouts: dict[tuple[str, int], tuple[ObjectLayout, Signature, int]] = {}

    def add(self, ctx: AnyContext) -> bool:
        """Registers `ctx`; returns False when the instance was already registered (refresh)."""
        with self._lock:
            old = self._contexts.get(ctx.instance_id)
            if old is not None:
                self._control.worker_touch(ctx.instance_id, False)
                return False
            layout = self._layouts.get(ctx.layout_key)
            sig = ctx.layout_signature
            if layout is not None and layout[1] != sig:
                raise RegistrationError(
                    f"{ctx.model_name!r} world {ctx.world_size} is registered with "
                    f"{_describe(layout[1])}; this worker's KV cache gives {_describe(sig)}"
                )
            objects = layout[0] if layout is not None else ctx.object_layout
            self._layouts[ctx.layout_key] = (objects, sig, (layout[2] if layout else 0) + 1)
            self._contexts[ctx.instance_id] = ctx
            if layout is None:
                self._control.set_layout(ctx.model_name, ctx.world_size, control_layout(objects))
            self._control.worker_add(ctx.instance_id)
            return True

    def remove(self, instance_id: int) -> AnyContext | None:
        with self._lock:
            ctx = self._contexts.pop(instance_id, None)
            if ctx is not None:
                self._control.worker_remove(instance_id)
                objects, sig, refs = self._layouts[ctx.layout_key]
                if refs <= 1:
                    del self._layouts[ctx.layout_key]
                    self._control.drop_layout(ctx.model_name, ctx.world_size)
                else:
                    self._layouts[ctx.layout_key] = (objects, sig, refs - 1)
            return ctx

    def find(self, instance_id: int) -> AnyContext | None:
        """The context, without counting it as hearing from the worker (the data operations'
        start calls into the control plane do that)."""
        with self._lock:
            return self._contexts.get(instance_id)

    def get(self, instance_id: int) -> AnyContext | None:
        """The context; a request of the worker counts as hearing from it."""
        with self._lock:
            ctx = self._contexts.get(instance_id)
        if ctx is not None:
            self._control.worker_touch(instance_id, False)
        return ctx

    def touch(self, instance_id: int, pinged: bool) -> bool:
        return self._control.worker_touch(instance_id, pinged)

    def last_seen_ago(self, instance_id: int) -> float | None:
        return self._control.last_seen_ago(instance_id)

    def layout(self, model_name: str, world_size: int) -> ObjectLayout | None:
        """The object groups of a registered (model, world), or None."""
        with self._lock:
            layout = self._layouts.get((model_name, world_size))
            return None if layout is None else layout[0]

    def all(self) -> list[AnyContext]:
        with self._lock:
            return list(self._contexts.values())

    def silent(self, reap_timeout: float, grace: float) -> list[int]:
        """Instances silent past their budget: the reap timeout once they pinged, else grace."""
        return self._control.silent(reap_timeout, grace)


def control_layout(objects: ObjectLayout) -> list[tuple[int, int | None, int]]:
    """What the control plane's lookup needs of a layout (rust/control/groups.rs): each object
    group's id, its tail objects' id, and the chunks its window spans (0: full attention)."""
    return [(og.id, og.tail_id, og.span if og.windowed else 0) for og in objects]
