"""The request path's Python side (DESIGN §4): data workers fed by the Rust I/O thread.

The ZMQ ROUTER socket, frame decoding, the op table and every control operation (noop, ping,
lookup, query/wait_prefetch_status, end_session, free_lookup_locks, clear, error replies) run
in Rust (`_core.NativeServer`, rust/control/server.rs) on a thread that never takes the GIL:
a lookup never waits behind a store, an L2 adapter or HTTP. Data operations (registration,
store, retrieve, engine-driven prepare/commit, hybrid lookups, block allocation reports) reach
the Python workers here through lanes they wait on with the GIL released:

* one thread per affinity lane (`--max-gpu-workers` lanes): a client's requests always go to
  the same lane, so its transfers keep FIFO order;
* `--max-cpu-workers` threads on the shared normal lane.

A worker decodes the arguments with the op's types, runs the engine's handler and hands the
reply frames back; every request is answered (errors included), and a request a worker drops
is answered `internal` by the core. The I/O thread's log lines (error replies, clears) reach
Python's logging through one pump thread.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from lmcache_rs._core import ManualClock, NativeServer, Request
from lmcache_rs.config import MPConfig
from lmcache_rs.engine.engine import Engine
from lmcache_rs.observability.health import IoLoopStatus
from lmcache_rs.observability.timing import OpTiming
from lmcache_rs.protocol import codec, ops
from lmcache_rs.protocol.codec import ProtocolError

log = logging.getLogger(__name__)
native_log = logging.getLogger("lmcache_rs.transport.io_thread")

#: How long a worker waits for a request before it checks whether the server stopped.
NEXT_TIMEOUT_S = 0.5


def bind_url(host: str, port: int) -> str:
    if host in ("localhost", ""):
        host = "127.0.0.1"
    elif host not in ("*", "0.0.0.0", "::") and not host.replace(".", "").isdigit() and ":" not in host:
        host = socket.gethostbyname(host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def op_table(engine: Engine) -> list[tuple[str, int | None, int, str, bytes, bool, str | None]]:
    """The rows of `protocol.ops.OPS` as the native server takes them."""
    return [
        (
            spec.name,
            spec.legacy_id,
            len(spec.args),
            "affinity" if spec.pool is ops.Pool.AFFINITY else "normal",
            codec.encode(spec.fallback),
            spec.sheddable,
            engine.refusal(spec.name),
        )
        for spec in ops.OPS
    ]


class ZmqServer:
    def __init__(self, cfg: MPConfig, engine: Engine, clock: ManualClock | None = None) -> None:
        """`clock`: the I/O loop's heartbeat clock (tests pass a manual one)."""
        assert cfg.max_cpu_workers is not None
        assert cfg.max_gpu_workers is not None
        self.cfg = cfg
        self.engine = engine
        # Data ops' keys come with their chunk hashes from the engine's memo: a prompt seen
        # before is neither parsed nor hashed again (`ChainMemo` byte-keyed table).
        self._hashing = ops.KeyHashing(engine.chain_memo, engine.chunk_size)
        self._native = NativeServer(
            engine.control,
            bind_url(cfg.host, cfg.port),
            ops=op_table(engine),
            ipv6=":" in cfg.host,
            max_message_bytes=cfg.max_message_bytes,
            max_pending=cfg.max_pending_requests,
            affinity_lanes=cfg.max_gpu_workers,
            clock=clock,
        )
        self.url: str = self._native.url
        lanes = [*range(self._native.lanes - 1)] + [self._native.normal_lane] * cfg.max_cpu_workers
        self._threads = [
            threading.Thread(target=self._work, args=(lane,), name=f"data-worker-{i}", daemon=True)
            for i, lane in enumerate(lanes)
        ]
        self._threads.append(threading.Thread(target=self._pump_logs, name="io-log-pump", daemon=True))
        self._stopping = threading.Event()

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._native.start()
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops intake (new requests get `shutting_down`), lets queued and running requests
        finish and answers them, then closes the socket; the workers end."""
        self._native.stop(timeout)
        self._stopping.set()
        for t in self._threads:
            t.join(timeout)

    @property
    def native(self) -> NativeServer:
        """The Rust server (tests inject I/O loop faults through it)."""
        return self._native

    def io_status(self) -> IoLoopStatus:
        """The I/O loop's heartbeat (observability.health.IoLoop)."""
        s = self._native.io_status()
        return IoLoopStatus(
            alive=s.alive,
            stopping=s.stopping,
            last_tick_ago=s.last_tick_ago,
            requests_received=s.requests_received,
            replies_sent=s.replies_sent,
            pending_requests=s.pending_requests,
            error=s.error,
        )

    @property
    def requests_total(self) -> int:
        return self._native.io_status().requests_received

    @property
    def pending(self) -> int:
        return self._native.io_status().pending_requests

    @property
    def errors(self) -> dict[str, int]:
        """Error replies by code (the stats registry's `request_errors` counters)."""
        return {k[1]: v for k, v in self.engine.control.counters().items() if k[0] == "request_errors"}

    def timing_snapshot(self) -> dict[str, OpTiming]:
        return {
            t.op: OpTiming(t.count, t.handler_seconds, t.queue_seconds, list(t.buckets))
            for t in self._native.timings()
        }

    # ---- workers -----------------------------------------------------------------------------

    def _work(self, lane: int) -> None:
        native = self._native
        while True:
            req = native.next(lane, NEXT_TIMEOUT_S)
            if req is None:
                if native.stopped:
                    return
                continue
            try:
                frames, error = self._handle(req)
            except BaseException as e:  # never leave a request unanswered, whatever escaped
                log.exception("worker of lane %d: %s failed", lane, req.op)
                spec = ops.BY_NAME[req.op]
                err = ProtocolError("internal", f"{type(e).__name__}: {e}")
                frames = codec.error_frames(req.uid, req.op_frame, spec, err.code, err.message, err.fallback)
                error = (err.code, err.message)
            native.reply(req, frames, error)

    def _handle(self, req: Request) -> tuple[list[bytes], tuple[str, str] | None]:
        spec = ops.BY_NAME[req.op]
        uid, op = req.uid, req.op_frame
        try:
            args = codec.decode_args(spec, req.args, self._hashing)
            result: Any = self.engine.handlers[spec.name](*args)
            return codec.reply_frames(uid, op, result, result is not None), None
        except ProtocolError as e:
            return codec.error_frames(uid, op, spec, e.code, e.message, e.fallback), (e.code, e.message)
        except Exception as e:
            log.exception("handler %s failed", spec.name)
            msg = f"{type(e).__name__}: {e}"
            return codec.error_frames(uid, op, spec, "internal", msg), ("internal", msg)

    def _pump_logs(self) -> None:
        while not self._stopping.is_set() or self._native.io_status().alive:
            line = self._native.next_log(NEXT_TIMEOUT_S)
            if line is not None:
                native_log.log(line.level, "%s", line.message)
            elif self._stopping.is_set():
                return
