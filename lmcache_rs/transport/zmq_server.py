"""ZMQ ROUTER I/O thread and worker pools (spec B.1, DESIGN §4).

One I/O thread owns the socket: it receives, decodes the operation, and routes the request:
SYNC ops run inline, NORMAL ops (lookups, queries, pings...) on the control pool, AFFINITY
ops (store, retrieve, registration) on one single-thread executor per client identity slot,
so one client's transfers keep FIFO order and lookups never queue behind them. Workers hand
finished replies back through a queue and an eventfd; only the I/O thread sends.

Every request gets a reply: malformed frames, unknown operations, bad arguments, overload and
handler failures produce an error reply (codec.error_frames) and a log line.

The I/O loop ticks a heartbeat on every iteration (it polls with a POLL_MS timeout, so an idle
loop ticks too) and after every request it dispatches; `io_status()` reports it for
/healthcheck (observability.health). An exception that escapes the loop ends the thread; it is
logged and reported there instead of vanishing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from lmcache_rs.config import MPConfig
from lmcache_rs.engine.engine import Engine
from lmcache_rs.observability.health import IoLoopStatus
from lmcache_rs.observability.timing import OpTiming, RequestTimings
from lmcache_rs.protocol import codec, ops
from lmcache_rs.protocol.codec import ProtocolError

log = logging.getLogger(__name__)

_NIL_UID = codec.encode(None)

#: Longest the I/O loop waits in poll: the heartbeat's period when idle.
POLL_MS = 100


def bind_url(host: str, port: int) -> str:
    if host in ("localhost", ""):
        host = "127.0.0.1"
    elif host not in ("*", "0.0.0.0", "::") and not host.replace(".", "").isdigit() and ":" not in host:
        host = socket.gethostbyname(host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


class ZmqServer:
    def __init__(self, cfg: MPConfig, engine: Engine, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.engine = engine
        #: The heartbeat's clock (tests pass a manual one to make a stall without waiting).
        self._clock = clock
        self._last_tick: float | None = None
        self._loop_error: str | None = None
        self.replies_sent = 0
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        if ":" in cfg.host or cfg.host in ("::",):
            self._sock.setsockopt(zmq.IPV6, 1)
        self.url = bind_url(cfg.host, cfg.port)
        self._sock.bind(self.url)
        assert cfg.max_cpu_workers is not None
        assert cfg.max_gpu_workers is not None
        self._normal = ThreadPoolExecutor(cfg.max_cpu_workers, thread_name_prefix="normal-pool")
        self._affinity = [
            ThreadPoolExecutor(1, thread_name_prefix=f"affinity-pool-{i}") for i in range(cfg.max_gpu_workers)
        ]
        self._replies: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self._accepting = True
        self._thread = threading.Thread(target=self._run_loop, name="mq-server-thread", daemon=True)
        self.requests_total = 0
        self.errors: dict[str, int] = {}
        #: Per operation: requests, seconds in the handler and queued, latency histogram.
        self.timings = RequestTimings()

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._last_tick = self._clock()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops intake (new requests get an error reply), lets in-flight requests finish and
        answers them, then closes the socket."""
        self._accepting = False
        self._normal.shutdown(wait=True, cancel_futures=False)
        for ex in self._affinity:
            ex.shutdown(wait=True, cancel_futures=False)
        self._stop.set()
        os.eventfd_write(self._wake, 1)
        self._thread.join(timeout)
        self._sock.close(linger=0)
        os.close(self._wake)

    @property
    def pending(self) -> int:
        return self._pending

    def io_status(self) -> IoLoopStatus:
        """The I/O loop's heartbeat (observability.health.IoLoop)."""
        last = self._last_tick
        return IoLoopStatus(
            alive=self._thread.is_alive(),
            stopping=self._stop.is_set() or not self._accepting,
            last_tick_ago=None if last is None else max(0.0, self._clock() - last),
            requests_received=self.requests_total,
            replies_sent=self.replies_sent,
            pending_requests=self._pending,
            error=self._loop_error,
        )

    # ---- I/O thread ---------------------------------------------------------------------------

    def _run_loop(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # recorded for /healthcheck; the thread ends
            log.critical("request I/O thread died; no more requests are answered", exc_info=True)
            self._loop_error = f"{type(e).__name__}: {e}"

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake, zmq.POLLIN)
        while True:
            events = dict(poller.poll(POLL_MS))
            self._last_tick = self._clock()
            if self._wake in events:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake)
            self._send_replies()
            if self._stop.is_set():
                self._drain_on_stop(poller)
                return
            if self._sock in events:
                for _ in range(256):
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self._dispatch(frames)
                    except Exception as e:  # the I/O thread must never die: answer and go on
                        log.exception("dispatch failed")
                        uid = frames[1] if len(frames) > 1 else _NIL_UID
                        op = frames[2] if len(frames) > 2 else b""
                        err = ProtocolError("internal", f"{type(e).__name__}: {e}")
                        self._send(self._error(frames[0], uid, op, None, err))
                    self._last_tick = self._clock()

    def _drain_on_stop(self, poller: zmq.Poller) -> None:
        """Answers what is still arriving (with `shutting_down`) until the socket has been quiet
        for 100 ms, at most 2 s, so no request sent before the stop goes unanswered."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if self._sock not in dict(poller.poll(100)):
                break
            while True:
                try:
                    self._dispatch(self._sock.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
        self._send_replies()

    def _send_replies(self) -> None:
        while True:
            try:
                frames = self._replies.get_nowait()
            except queue.Empty:
                return
            self._send(frames)

    def _send(self, frames: list[bytes]) -> None:
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK)
            self.replies_sent += 1
        except zmq.ZMQError as e:
            # The peer disconnected (EHOSTUNREACH) or is not reading: drop the reply.
            log.debug("reply to a gone or stalled client dropped: %s", e)

    def _error(
        self, identity: bytes, uid: bytes, op: bytes, spec: ops.OpSpec | None, err: ProtocolError
    ) -> list[bytes]:
        self.errors[err.code] = self.errors.get(err.code, 0) + 1
        log.warning("request %s failed: %s: %s", spec.name if spec else "?", err.code, err.message)
        return [identity, *codec.error_frames(uid, op, spec, err.code, err.message, err.fallback)]

    def _dispatch(self, frames: list[bytes]) -> None:
        self.requests_total += 1
        identity = frames[0]
        uid = frames[1] if len(frames) > 1 else _NIL_UID
        op_frame = frames[2] if len(frames) > 2 else b""
        if len(frames) < 3 or not op_frame:
            what = (
                "missing operation frame"
                if len(frames) < 3
                else "control messages (streams) are not supported"
            )
            self._send(self._error(identity, uid, op_frame, None, ProtocolError("bad_frame", what)))
            return
        try:
            spec = codec.decode_op(op_frame)
        except ProtocolError as e:
            self._send(self._error(identity, uid, op_frame, None, e))
            return
        refusal = self.engine.refusal(spec.name)
        if refusal is not None:
            self._send(self._error(identity, uid, op_frame, spec, ProtocolError("unsupported_op", refusal)))
            return
        if not self._accepting:
            self._send(
                self._error(
                    identity, uid, op_frame, spec, ProtocolError("shutting_down", "server is stopping")
                )
            )
            return
        args = frames[3:]
        if spec.pool is ops.Pool.SYNC:
            self._send(self._run(identity, uid, op_frame, spec, args))
            return
        with self._pending_lock:
            if self._pending >= self.cfg.max_pending_requests and spec.sheddable:
                overloaded = True
            else:
                overloaded = False
                self._pending += 1
        if overloaded:
            err = ProtocolError("overloaded", f"{self._pending} requests pending; try again")
            self._send(self._error(identity, uid, op_frame, spec, err))
            return
        if spec.pool is ops.Pool.AFFINITY:
            ex = self._affinity[zlib.crc32(identity) % len(self._affinity)]
        else:
            ex = self._normal
        try:
            ex.submit(self._run_async, identity, uid, op_frame, spec, args, time.perf_counter())
        except RuntimeError:  # executor shut down under us
            with self._pending_lock:
                self._pending -= 1
            self._send(
                self._error(
                    identity, uid, op_frame, spec, ProtocolError("shutting_down", "server is stopping")
                )
            )

    # ---- workers -----------------------------------------------------------------------------

    def _run(
        self,
        identity: bytes,
        uid: bytes,
        op: bytes,
        spec: ops.OpSpec,
        arg_frames: list[bytes],
        queued_at: float | None = None,
    ) -> list[bytes]:
        t0 = time.perf_counter()
        try:
            return self._handle(identity, uid, op, spec, arg_frames)
        finally:
            queued = 0.0 if queued_at is None else t0 - queued_at
            self.timings.record(spec.name, time.perf_counter() - t0, queued)

    def timing_snapshot(self) -> dict[str, OpTiming]:
        return self.timings.snapshot()

    def _handle(
        self, identity: bytes, uid: bytes, op: bytes, spec: ops.OpSpec, arg_frames: list[bytes]
    ) -> list[bytes]:
        try:
            args = codec.decode_args(spec, arg_frames)
            result: Any = self.engine.handlers[spec.name](*args)
            return [identity, *codec.reply_frames(uid, op, result, result is not None)]
        except ProtocolError as e:
            return self._error(identity, uid, op, spec, e)
        except Exception as e:
            log.exception("handler %s failed", spec.name)
            return self._error(identity, uid, op, spec, ProtocolError("internal", f"{type(e).__name__}: {e}"))

    def _run_async(
        self, identity: bytes, uid: bytes, op: bytes, spec: ops.OpSpec, args: list[bytes], queued_at: float
    ) -> None:
        try:
            self._replies.put(self._run(identity, uid, op, spec, args, queued_at))
        finally:
            with self._pending_lock:
                self._pending -= 1
            os.eventfd_write(self._wake, 1)
