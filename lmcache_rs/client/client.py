"""`MPClient`: speaks the LMCache MP protocol over a ZMQ DEALER socket (spec B).

Sends integer legacy op ids where they exist (as LMCache's client does), one frame per
argument. Replies are matched by uid; a reply with an error frame raises `ServerError`
(whose `fallback` is what an LMCache client would have decoded); no reply within the timeout
raises `TimeoutError`. One client is used by one thread at a time.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from lmcache_rs.protocol import ops
from lmcache_rs.protocol.codec import encode
from lmcache_rs.protocol.messages import (
    EngineDrivenRegistered,
    EngineDrivenRegistration,
    ErrorFrame,
    IPCCacheServerKey,
    PrepareRetrieveReply,
    PrepareStoreReply,
    StoreSlots,
    encode_tokens,
    ext_hook,
    to_ext,
)

_decoder = msgspec.msgpack.Decoder(ext_hook=ext_hook)
_error_decoder = msgspec.msgpack.Decoder(ErrorFrame)


class ServerError(RuntimeError):
    def __init__(self, op: str, code: str, message: str, fallback: Any) -> None:
        super().__init__(f"{op}: {code}: {message}")
        self.op = op
        self.code = code
        self.message = message
        self.fallback = fallback


#: Frames up to this size are copied into libzmq rather than sent zero-copy.
COPY_THRESHOLD = 1 << 20


class MPClient:
    def __init__(self, url: str = "tcp://127.0.0.1:5555", timeout: float = 30.0) -> None:
        if "://" not in url:
            url = f"tcp://{url}"
        self.url = url
        self.timeout = timeout
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # pyzmq sends frames over 64 KiB zero-copy, and frees each through its garbage-collector
        # thread: a 32k-token key (130 KB) cost ~600 us of client CPU that way against a 10 us
        # copy (benches/bench_control.py, 2-core VM). Keys of up to ~250k tokens are copied.
        self._sock.copy_threshold = COPY_THRESHOLD
        self._sock.connect(url)
        self._uids = itertools.count()
        self._early: dict[bytes, list[bytes]] = {}

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> MPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- raw frames ----------------------------------------------------------------------

    def send(self, op: str | int, *args: Any) -> bytes:
        """Sends a request; returns its uid frame (pass it to `recv`)."""
        spec = ops.find(op)
        op_value: int | str = op
        if spec is not None and spec.legacy_id is not None:
            op_value = spec.legacy_id
        uid = encode(next(self._uids))
        self._sock.send_multipart([uid, encode(op_value), *(encode(a) for a in args)])
        return uid

    def send_frames(self, frames: list[bytes]) -> None:
        """Sends arbitrary frames (tests of malformed input)."""
        self._sock.send_multipart(frames)

    def recv_frames(self, uid: bytes | None = None, timeout: float | None = None) -> list[bytes]:
        """The next reply (or the one for `uid`), as raw frames."""
        if uid is not None and uid in self._early:
            return self._early.pop(uid)
        deadline_ms = int(1000 * (self.timeout if timeout is None else timeout))
        while True:
            if not self._sock.poll(deadline_ms):
                raise TimeoutError(f"no reply from {self.url} within {deadline_ms / 1000:.1f}s")
            frames: list[bytes] = self._sock.recv_multipart()
            if uid is None or frames[0] == uid:
                return frames
            self._early[frames[0]] = frames

    def recv(self, uid: bytes, timeout: float | None = None) -> Any:
        frames = self.recv_frames(uid, timeout)
        op = _decoder.decode(frames[1]) if frames[1] else ""
        spec = ops.find(op)
        name = spec.name if spec else str(op)
        payload = _decoder.decode(frames[2]) if len(frames) > 2 else None
        if len(frames) > 3:
            err = _error_decoder.decode(frames[3]).error
            raise ServerError(name, err.code, err.message, payload)
        return payload

    def call(self, op: str, *args: Any, timeout: float | None = None) -> Any:
        return self.recv(self.send(op, *args), timeout)

    # ---- typed operations ------------------------------------------------------------------

    def get_chunk_size(self) -> int:
        return int(self.call("get_chunk_size"))

    def ping(self, instance_id: int | None = None) -> bool:
        return bool(self.call("ping", instance_id))

    def noop(self) -> str:
        return str(self.call("noop"))

    def get_experimental(self) -> list[str]:
        return list(self.call("get_experimental"))

    def register_kv_cache(
        self,
        instance_id: int,
        handles: list[Any],
        model_name: str,
        world_size: int,
        layout_hints: dict[str, Any] | None = None,
        engine_group_infos: list[Any] | None = None,
        engine_type: str = "vllm",
    ) -> None:
        self.call(
            "register_kv_cache",
            instance_id,
            [to_ext(h) for h in handles],
            model_name,
            world_size,
            engine_type,
            layout_hints if layout_hints is not None else {"kv_layout": "NHD"},
            engine_group_infos or [],
        )

    def unregister_kv_cache(self, instance_id: int) -> None:
        self.call("unregister_kv_cache", instance_id)

    def store(
        self, key: IPCCacheServerKey, instance_id: int, block_ids: list[list[int]], event: bytes = b""
    ) -> tuple[bytes, bool]:
        event_out, ok = self.call("store", key, instance_id, block_ids, event)
        return event_out, ok

    def retrieve(
        self,
        key: IPCCacheServerKey,
        instance_id: int,
        block_ids: list[list[int]],
        skip_first_n_tokens: int = 0,
        event: bytes = b"",
    ) -> tuple[bytes, bool]:
        event_out, ok = self.call("retrieve", key, instance_id, block_ids, event, skip_first_n_tokens)
        return event_out, ok

    def lookup(self, key: IPCCacheServerKey, tp_size: int = 1, timeout: float = 30.0) -> int:
        """lookup, then query_prefetch_status until the result is ready (an L2 prefetch answers
        nil while it loads), as the vLLM scheduler does: the hit in chunks."""
        self.call("lookup", key, tp_size)
        result = self.call("query_prefetch_status", key.request_id)
        deadline = time.monotonic() + timeout
        while result is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"lookup {key.request_id!r}: no result within {timeout} s")
            result = self.call("wait_prefetch_status", key.request_id, 1.0)
        return int(result)

    def free_lookup_locks(self, key: IPCCacheServerKey, tp_size: int = 1) -> None:
        self.call("free_lookup_locks", key, tp_size)

    def end_session(self, request_id: str) -> None:
        self.call("end_session", request_id)

    def clear(self, force: bool = False) -> None:
        self.call("clear", force)

    # ---- engine-driven (spec D.3) ----------------------------------------------------------

    def register_engine_driven(self, reg: EngineDrivenRegistration) -> EngineDrivenRegistered:
        return msgspec.convert(
            self.call("register_kv_cache_engine_driven_context", reg), EngineDrivenRegistered
        )

    def unregister_engine_driven(self, instance_id: int) -> None:
        self.call("unregister_kv_cache_engine_driven_context", instance_id)

    def prepare_store(self, key: IPCCacheServerKey, instance_id: int) -> StoreSlots:
        return msgspec.convert(self.call("prepare_store", key, instance_id), PrepareStoreReply).context

    def commit_store(self, key: IPCCacheServerKey, instance_id: int, data: bytes = b"") -> bool:
        return bool(self.call("commit_store", key, instance_id, data))

    def prepare_retrieve(self, key: IPCCacheServerKey, instance_id: int) -> PrepareRetrieveReply:
        return msgspec.convert(self.call("prepare_retrieve", key, instance_id), PrepareRetrieveReply)

    def commit_retrieve(self, key: IPCCacheServerKey, instance_id: int) -> bool:
        return bool(self.call("commit_retrieve", key, instance_id))


def wait_for_server(url: str, timeout: float = 60.0, alive: Callable[[], bool] = lambda: True) -> None:
    """Blocks until the server at `url` answers `noop`; raises TimeoutError after `timeout`
    seconds, or RuntimeError as soon as `alive()` says the server process is gone."""
    deadline = time.monotonic() + timeout
    with MPClient(url, timeout=1.0) as c:
        while True:
            if not alive():
                raise RuntimeError(f"the server for {url} exited before answering")
            try:
                c.noop()
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s") from None


def make_key(
    token_ids: list[int],
    request_id: str,
    *,
    model_name: str = "test-model",
    world_size: int = 1,
    worker_id: int | None = None,
    start: int = 0,
    end: int | None = None,
    cache_salt: str = "",
    num_kv_readers: int = 1,
) -> IPCCacheServerKey:
    return IPCCacheServerKey(
        model_name=model_name,
        world_size=world_size,
        worker_id=worker_id,
        token_ids=encode_tokens(list(token_ids)),
        start=start,
        end=len(token_ids) if end is None else end,
        request_id=request_id,
        cache_salt=cache_salt,
        num_kv_readers=num_kv_readers,
    )
