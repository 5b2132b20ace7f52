"""How LMCache 0.5.6's client reads each reply (spec J.7), for tests.

`read(op, frames)` applies J.7's decoding rules to the frames a DEALER receives; `J7Worker` and
`J7Scheduler` act as vLLM's worker and scheduler adapters do on top of that reading, and every
operation returns an `Outcome`: what LMCache's client concludes, and whether it got there only
after waiting out a timeout. Tests assert on outcomes, never on our error frames (LMCache never
reads a frame after the third).

The worker runs in its own process too (`tests/j7worker.py`, `WorkerProcess`), with a heartbeat
that re-registers on the unhealthy -> healthy edge as LMCache's `HeartbeatThread` does.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch

from lmcache_rs.client import MPClient, ShmKVCache
from lmcache_rs.client.client import make_key
from lmcache_rs.client.engine_driven import PoolMapping
from lmcache_rs.client.shm_kv import paged_shape, select_blocks
from lmcache_rs.protocol import ops
from lmcache_rs.protocol.codec import encode
from lmcache_rs.protocol.messages import EngineDrivenRegistration, IPCCacheServerKey, ShmSlot, to_ext
from lmcache_rs.storage.shm_pool import SHM_DIR
from lmcache_rs.transfer.gather import GroupLayout, ObjectCopy, gather, scatter

C = 256
BS = 16
BPC = C // BS
MODEL = "test-model"  # kvsim.Worker's model and geometry (2 layers, 2 heads x 32, float16)

# ---- decoding (J.7 "Decoding rules") ------------------------------------------------------------


class _Coerce(enum.Enum):
    BOOL = "bool"
    INT = "int"


class _EngineDrivenRegistered(msgspec.Struct):
    shm_name: str = ""
    pool_size: int = 0


class _PrepareStore(msgspec.Struct):
    context: dict[str, Any]


class _PrepareRetrieve(msgspec.Struct):
    success: bool
    context: dict[str, Any]
    data: bytes = b""


#: The reply type LMCache 0.5.6 declares per operation (None: only nil decodes).
DECLARED: dict[str, Any] = {
    "register_kv_cache": None,
    "unregister_kv_cache": None,
    "store": tuple[bytes, bool],
    "retrieve": tuple[bytes, bool],
    "lookup": None,
    "query_prefetch_status": int | None,
    "wait_prefetch_status": int | None,
    "free_lookup_locks": None,
    "end_session": None,
    "register_kv_cache_engine_driven_context": _EngineDrivenRegistered,
    "unregister_kv_cache_engine_driven_context": None,
    "prepare_store": _PrepareStore,
    "commit_store": _Coerce.BOOL,
    "prepare_retrieve": _PrepareRetrieve,
    "commit_retrieve": _Coerce.BOOL,
    "clear": None,
    "get_chunk_size": _Coerce.INT,
    "ping": _Coerce.BOOL,
    "report_block_allocation": None,
    "get_experimental": list[str],
    "noop": str,
}


@dataclass(frozen=True)
class Reply:
    """What the client's future gets. `value`: frame 3 decoded (None for a 2-frame reply, with
    no type check). `dropped`: frame 3 did not decode; the future never resolves (as no reply).
    `timed_out`: no reply at all. `raises`: the future raises (echoed op mismatch)."""

    value: Any = None
    dropped: bool = False
    timed_out: bool = False
    raises: str = ""

    @property
    def resolved(self) -> bool:
        return not (self.dropped or self.timed_out or self.raises)


def read(op: str, frames: list[bytes] | None) -> Reply:
    """J.7's decoding of a reply `[uid, op, frame3?, ...]` to `op` (None: no reply came)."""
    if frames is None:
        return Reply(timed_out=True)
    try:
        echoed = ops.find(msgspec.msgpack.decode(frames[1]))
    except (msgspec.DecodeError, IndexError):
        echoed = None
    if echoed is None or echoed.name != op:
        return Reply(raises="ValueError: unexpected operation in reply")
    if len(frames) == 2:
        return Reply(None)
    frame3 = frames[2]  # frames 4+ (our error frame) are never read
    if not frame3:
        return Reply(dropped=True)
    want = DECLARED[op]
    try:
        if isinstance(want, _Coerce):
            raw = msgspec.msgpack.decode(frame3)
            return Reply(bool(raw) if want is _Coerce.BOOL else int(raw))
        return Reply(msgspec.msgpack.decode(frame3, type=want))
    except (msgspec.DecodeError, msgspec.ValidationError, TypeError, ValueError):
        return Reply(dropped=True)


# ---- conclusions ---------------------------------------------------------------------------------


class Conclusion(enum.StrEnum):
    STORED = "stored"
    NOT_STORED = "not stored"
    RETRIEVED = "retrieved"
    NOT_RETRIEVED = "not retrieved"
    #: The trap: fewer slots than chunks, only those written, reported ok.
    PARTLY_RETRIEVED_REPORTED_OK = "partly retrieved, reported ok"
    PENDING = "pending until a ping fails"
    RAISES = "raises inside vLLM"
    REGISTERED = "registered"
    REGISTERED_SHM = "registered (shared-memory client)"
    REGISTERED_PICKLE = "registered (pickle client)"
    REGISTRATION_FAILED = "registration failed"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    HIT = "hit"
    STILL_RUNNING = "still running"
    CLEARED = "cleared"
    NOT_CLEARED = "not cleared"


@dataclass
class Outcome:
    conclusion: Conclusion
    #: True when the client reached it only by waiting out a timeout (mq_timeout, heartbeat).
    waited: bool = False
    value: Any = None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "conclusion": self.conclusion.value,
            "waited": self.waited,
            "value": self.value,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Outcome:
        return cls(Conclusion(d["conclusion"]), d["waited"], d["value"], d["detail"])


class J7Connection:
    """One DEALER, used as LMCache's message queue client is: a request, then its future."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.client = MPClient(url, timeout=timeout)
        self.timeout = timeout
        self.lock = threading.Lock()
        self._raw_uids = itertools.count()

    def request(self, op: str, *args: Any, timeout: float | None = None) -> Reply:
        with self.lock:
            uid = self.client.send(op, *args)
            return self._wait(op, uid, timeout)

    def raw(self, op: str, arg_frames: list[bytes], timeout: float | None = None) -> Reply:
        """A request with hand-made argument frames (malformed or oversized ones)."""
        spec = ops.find(op)
        assert spec is not None
        with self.lock:
            uid = encode(f"raw-{next(self._raw_uids)}")
            self.client.send_frames([uid, encode(spec.legacy_id or op), *arg_frames])
            return self._wait(op, uid, timeout)

    def _wait(self, op: str, uid: bytes, timeout: float | None) -> Reply:
        try:
            frames = self.client.recv_frames(uid, self.timeout if timeout is None else timeout)
        except TimeoutError:
            return read(op, None)
        return read(op, frames)

    def close(self) -> None:
        self.client.close()


def tokens(n: int, seed: int = 0) -> list[int]:
    import random  # noqa: PLC0415

    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n)]


def blocks(first: int, chunks: int) -> list[int]:
    return list(range(first, first + chunks * BPC))


# ---- the worker adapter -------------------------------------------------------------------------


@dataclass
class J7Worker:
    """A vLLM worker (J.4) in one transfer mode, reading replies as J.7 says; KV geometry of
    kvsim.Worker (chunks shared with it). `healthy` is the adapter's one health flag."""

    url: str
    mode: str  # "lmcache_driven" or "engine_driven"
    instance_id: int
    seed: int = 0
    num_blocks: int = 256
    timeout: float = 10.0
    healthy: bool = True
    beats: int = 0
    registrations: int = 0
    #: Engine-driven: "shm" or "pickle", fixed until the next registration (J.7).
    client_kind: str = ""
    pool: PoolMapping | None = None
    #: Lmcache-driven: the hints every registration sends (a re-registration repeats them).
    layout_hints: dict[str, Any] = field(default_factory=lambda: {"kv_layout": "NHD"})
    beat_log: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.conn = J7Connection(self.url, self.timeout)
        self.hb_conn = J7Connection(self.url, self.timeout)
        self.group = GroupLayout((0, 1), "NHD", 2, BS, 2, 32, torch.float16)
        self.kv: ShmKVCache | None = None
        if self.mode == "lmcache_driven":
            self.kv = ShmKVCache(2, self.num_blocks, BS, 2, 32, torch.float16, "NHD")
            self.kv.fill_random(self.seed)
            self.layers = self.kv.layers
        else:
            g = torch.Generator().manual_seed(self.seed)
            shape = paged_shape("NHD", self.num_blocks, BS, 2, 32)
            self.layers = [torch.randn(shape, generator=g).to(torch.float16) for _ in range(2)]
        self._hb_stop = threading.Event()
        self._hb_thread: threading.Thread | None = None

    @property
    def chunk_bytes(self) -> int:
        return self.group.chunk_bytes(C)

    def key(self, t: list[int], rid: str, start: int = 0, end: int | None = None) -> IPCCacheServerKey:
        return make_key(t, rid, model_name=MODEL, worker_id=0, start=start, end=end)

    # ---- registration --------------------------------------------------------------------------

    def register(self) -> Outcome:
        """The full registration (a new transfer context, same instance id)."""
        self.registrations += 1
        if self.mode == "lmcache_driven":
            assert self.kv is not None
            r = self.conn.request(
                "register_kv_cache",
                self.instance_id,
                [to_ext(h) for h in self.kv.handles()],
                MODEL,
                1,
                "vllm",
                self.layout_hints,
                [],
            )
            if not r.resolved:  # a nil or absent reply is success; nothing else decodes
                return Outcome(Conclusion.REGISTRATION_FAILED, waited=True)
            return Outcome(Conclusion.REGISTERED)
        reg = EngineDrivenRegistration(
            instance_id=self.instance_id,
            model_name=MODEL,
            world_size=1,
            block_size=BS,
            num_layers=2,
            hidden_dim_size=64,
            dtype_str="float16",
            use_mla=False,
        )
        r = self.conn.request("register_kv_cache_engine_driven_context", reg)
        if not r.resolved:
            return Outcome(Conclusion.REGISTRATION_FAILED, waited=True)
        self.pool = None
        self.client_kind = "pickle"
        v = r.value
        if v is not None and v.shm_name and v.pool_size > 0:
            try:
                self.pool = PoolMapping(v.shm_name.lstrip("/"), v.pool_size)
                self.client_kind = "shm"
            except OSError:
                pass  # the segment will not open: a warning, then pickle
        return Outcome(
            Conclusion.REGISTERED_SHM if self.client_kind == "shm" else Conclusion.REGISTERED_PICKLE
        )

    # ---- heartbeat -----------------------------------------------------------------------------

    def beat(self, garbled: bool = False) -> Outcome:
        """One heartbeat: ping(instance_id) with the heartbeat interval as its timeout; falsy or
        no answer clears the health flag, truthy sets it, and on the unhealthy -> healthy edge
        the full registration runs again (if it fails, the worker stays unhealthy). `garbled`:
        the instance id arrives as a string."""
        r = self.hb_conn.raw("ping", [encode("x" if garbled else self.instance_id)])
        truthy = r.resolved and bool(r.value)
        reregistered = ""
        if not truthy:
            self.healthy = False
        elif not self.healthy:
            reg = self.register()
            reregistered = reg.conclusion.value
            self.healthy = reg.conclusion is not Conclusion.REGISTRATION_FAILED
        self.beats += 1
        self.beat_log.append(
            {
                "beat": self.beats,
                "ping": r.value if r.resolved else None,
                "healthy": self.healthy,
                "rereg": reregistered,
            }
        )
        return Outcome(Conclusion.HEALTHY if self.healthy else Conclusion.UNHEALTHY, waited=not r.resolved)

    def start_heartbeat(self, interval: float) -> None:
        """LMCache's HeartbeatThread: a beat every `interval` seconds, ping timeout = interval."""
        self.hb_conn.timeout = interval

        def run() -> None:
            while not self._hb_stop.wait(interval):
                self.beat()

        self._hb_stop.clear()
        self._hb_thread = threading.Thread(target=run, name="lmcache-heartbeat", daemon=True)
        self._hb_thread.start()

    def stop_heartbeat(self) -> None:
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join()

    # ---- store / retrieve ----------------------------------------------------------------------

    def _copy(self, block_ids: list[int], i: int, obj: torch.Tensor, skip: int = 0) -> ObjectCopy:
        """Chunk `i` of the range (its blocks) and the bytes of its object."""
        ids = torch.tensor(block_ids[i * BPC : (i + 1) * BPC], dtype=torch.int64)
        return ObjectCopy([self.group], [ids], obj, [BPC], skip)

    def store(self, key: IPCCacheServerKey, block_ids: list[int], garbled: bool = False) -> Outcome:
        """One store as J.4 does it. `garbled`: the request's key frame arrives undecodable
        (the commit that may follow carries the key intact)."""
        key_frame = b"\xc1" if garbled else encode(key)  # 0xc1: never valid msgpack
        if self.mode == "lmcache_driven":
            r = self.conn.raw(
                "store", [key_frame, encode(self.instance_id), encode([block_ids]), encode(b"")]
            )
            return self._transfer_outcome(r, Conclusion.STORED, Conclusion.NOT_STORED)
        n_chunks = -(-(key.end - key.start) // C)
        r = self.conn.raw("prepare_store", [key_frame, encode(self.instance_id)])
        if self.client_kind == "pickle":  # the reply is ignored: gather and pickle everything
            data = pickle.dumps([self._gather_private(block_ids, i) for i in range(n_chunks)])
            return self._commit_store(key, data)
        if not r.resolved:
            return Outcome(Conclusion.RAISES, waited=True, detail="LMCacheTimeoutError from wait_for_save")
        if r.value is None:
            return Outcome(Conclusion.RAISES, detail="AttributeError: None has no context")
        ctx = r.value.context
        slots = ctx.get("slots")
        if isinstance(slots, list):
            if not slots:
                return Outcome(Conclusion.STORED, detail="all chunks cached: no commit_store")
            if "chunk_indices" not in ctx:
                return Outcome(Conclusion.RAISES, detail="KeyError: chunk_indices")
            assert self.pool is not None
            for s, i in zip(slots, ctx["chunk_indices"], strict=True):
                slot = msgspec.convert(s, ShmSlot)
                gather(self._copy(block_ids, i, self.pool.raw(slot)), self.layers)
            return self._commit_store(key, b"")
        for i in range(n_chunks):  # no slots list: private buffers, discarded
            self._gather_private(block_ids, i)
        return self._commit_store(key, b"")

    def oversized(self, key: IPCCacheServerKey, nbytes: int, timeout: float) -> Outcome:
        """A request with one frame of `nbytes` (over --max-message-bytes): a store with that
        many bytes of block ids, or a commit_store carrying that much (pickled) data."""
        if self.mode == "lmcache_driven":
            ids = [1] * nbytes  # one byte per small int
            r = self.conn.request("store", key, self.instance_id, [ids], b"", timeout=timeout)
            return self._transfer_outcome(r, Conclusion.STORED, Conclusion.NOT_STORED)
        r = self.conn.request("commit_store", key, self.instance_id, b"\0" * nbytes, timeout=timeout)
        if not r.resolved:
            return Outcome(Conclusion.NOT_STORED, waited=True)
        return Outcome(Conclusion.STORED if r.value else Conclusion.NOT_STORED)

    def _gather_private(self, block_ids: list[int], i: int) -> bytes:
        buf = torch.empty(self.chunk_bytes, dtype=torch.uint8)
        gather(self._copy(block_ids, i, buf), self.layers)
        return buf.numpy().tobytes()

    def _commit_store(self, key: IPCCacheServerKey, data: bytes) -> Outcome:
        r = self.conn.request("commit_store", key, self.instance_id, data)
        if not r.resolved:
            return Outcome(Conclusion.NOT_STORED, waited=True)
        return Outcome(Conclusion.STORED if r.value else Conclusion.NOT_STORED)

    def retrieve(self, key: IPCCacheServerKey, block_ids: list[int], skip: int = 0) -> Outcome:
        if self.mode == "lmcache_driven":
            r = self.conn.request("retrieve", key, self.instance_id, [block_ids], b"", skip)
            return self._transfer_outcome(r, Conclusion.RETRIEVED, Conclusion.NOT_RETRIEVED)
        n_chunks = len(block_ids) // BPC
        r = self.conn.request("prepare_retrieve", key, self.instance_id)
        try:
            if not r.resolved:
                return Outcome(Conclusion.NOT_RETRIEVED, waited=True)
            if r.value is None:
                return Outcome(Conclusion.RAISES, detail="AttributeError: None has no success")
            v = r.value
            if self.client_kind == "pickle":
                return Outcome(
                    Conclusion.NOT_RETRIEVED if not (v.success and v.data) else Conclusion.RETRIEVED
                )
            slots = v.context.get("slots") or []
            if not v.success or not slots:
                return Outcome(Conclusion.NOT_RETRIEVED)
            if len(slots) > n_chunks:
                return Outcome(Conclusion.NOT_RETRIEVED, detail="ValueError: more slots than blocks")
            assert self.pool is not None
            for i, s in enumerate(slots):
                local = min(max(skip - i * C, 0), C)
                slot = msgspec.convert(s, ShmSlot)
                scatter(self._copy(block_ids, i, self.pool.raw(slot), local), self.layers, C, -1)
            if len(slots) < n_chunks:
                return Outcome(Conclusion.PARTLY_RETRIEVED_REPORTED_OK, value=len(slots))
            return Outcome(Conclusion.RETRIEVED)
        finally:
            self.conn.request("commit_retrieve", key, self.instance_id)  # sent even on a miss

    @staticmethod
    def _transfer_outcome(r: Reply, ok: Conclusion, failed: Conclusion) -> Outcome:
        if not r.resolved:  # polled each step with no timeout: released only by a failed ping
            return Outcome(Conclusion.PENDING, waited=True)
        if r.value is None:
            return Outcome(Conclusion.RAISES, detail="TypeError: None is not [event, ok]")
        return Outcome(ok if r.value[1] else failed)

    # ---- byte checks ---------------------------------------------------------------------------

    def same_blocks(self, a: list[int], b: list[int]) -> bool:
        return all(
            torch.equal(x, y)
            for x, y in zip(
                select_blocks(self.layers, "NHD", a), select_blocks(self.layers, "NHD", b), strict=True
            )
        )

    def clear_blocks(self, block_ids: list[int], value: float = 0.0) -> None:
        for t in self.layers:
            t[:, block_ids] = value

    def close(self) -> None:
        self.stop_heartbeat()
        self.conn.close()
        self.hb_conn.close()
        if self.kv is not None:
            self.kv.close()


# ---- the scheduler adapter ------------------------------------------------------------------------


class J7Scheduler:
    """vLLM's scheduler adapter (J.3): lookup, then query_prefetch_status until it answers."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.conn = J7Connection(url, timeout)

    def lookup(self, t: list[int], rid: str, max_steps: int = 2000) -> Outcome:
        """The hit in chunks (`value`), as the scheduler reads it: a nil status means "still
        running" and is asked again next step (10 ms here), with no limit in vLLM: after
        `max_steps` this gives STILL_RUNNING (a request stalled for good)."""
        key = make_key(t, rid, model_name=MODEL, end=len(t) // C * C)
        r = self.conn.request("lookup", key, 1)
        if not r.resolved:  # never acked: unhealthy after mq_timeout, 0 hit tokens
            return Outcome(Conclusion.UNHEALTHY, waited=True, value=0)
        for _ in range(max_steps):
            q = self.conn.request("query_prefetch_status", rid)
            if not q.resolved:
                return Outcome(Conclusion.UNHEALTHY, waited=True, value=0)
            if q.value is not None:  # not clamped by the client: the test checks the range
                return Outcome(Conclusion.HIT, value=int(q.value))
            time.sleep(0.01)
        return Outcome(Conclusion.STILL_RUNNING, detail=f"nil for {max_steps} scheduler steps")

    def ping(self) -> Outcome:
        r = self.conn.request("ping", None)
        return Outcome(
            Conclusion.HEALTHY if r.resolved and r.value else Conclusion.UNHEALTHY, waited=not r.resolved
        )

    def free(self, t: list[int], rid: str) -> None:
        self.conn.request("free_lookup_locks", make_key(t, rid, model_name=MODEL, end=len(t) // C * C), 1)

    def end_session(self, rid: str) -> None:
        self.conn.request("end_session", rid)

    def clear(self, force: bool = False) -> Outcome:
        r = self.conn.request("clear", force)
        return Outcome(Conclusion.CLEARED if r.resolved else Conclusion.NOT_CLEARED, waited=not r.resolved)

    def close(self) -> None:
        self.conn.close()


# ---- the worker in its own process ----------------------------------------------------------------


class WorkerProcess:
    """A `J7Worker` in a child process (`tests/j7worker.py`), driven by JSON lines."""

    def __init__(self, url: str, mode: str, instance_id: int, seed: int = 0, timeout: float = 10.0) -> None:
        here = os.path.dirname(os.path.abspath(__file__))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                os.path.join(here, "j7worker.py"),
                url,
                mode,
                str(instance_id),
                str(seed),
                str(timeout),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.mode = mode
        self.instance_id = instance_id
        assert self._read()["ready"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker process exited ({self.proc.wait(10)})")
        return json.loads(line)

    def call(self, cmd: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if "error" in out:
            raise RuntimeError(f"worker: {out['error']}")
        return out

    def outcome(self, cmd: str, **kw: Any) -> Outcome:
        return Outcome.from_json(self.call(cmd, **kw))

    def register(self, **kw: Any) -> Outcome:
        return self.outcome("register", **kw)

    def beat(self, garbled: bool = False) -> Outcome:
        return self.outcome("beat", garbled=garbled)

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def store(
        self,
        t: list[int],
        first_block: int,
        rid: str,
        start: int = 0,
        end: int | None = None,
        garbled: bool = False,
    ) -> Outcome:
        return self.outcome(
            "store", tokens=t, first=first_block, rid=rid, start=start, end=end, garbled=garbled
        )

    def oversized(self, t: list[int], rid: str, nbytes: int, timeout: float) -> Outcome:
        return self.outcome("oversized", tokens=t, rid=rid, nbytes=nbytes, timeout=timeout)

    def retrieve(
        self,
        t: list[int],
        first_block: int,
        rid: str,
        start: int = 0,
        end: int | None = None,
        src: int | None = None,
    ) -> Outcome:
        """Retrieves into blocks from `first_block` (zeroed first); with `src`, `value` says
        whether they now equal the blocks from `src` byte for byte."""
        return self.outcome("retrieve", tokens=t, first=first_block, rid=rid, start=start, end=end, src=src)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(RuntimeError, BrokenPipeError, OSError):
                self.call("exit")
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def shm_path(name: str) -> str:
    return os.path.join(SHM_DIR, name.lstrip("/"))
