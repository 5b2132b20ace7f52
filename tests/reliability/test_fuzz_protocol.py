"""Protocol fuzzing against a real server: thousands of malformed, truncated and random
multipart messages. Every message gets a reply, the server never dies, and a well-formed
client keeps working throughout."""

from __future__ import annotations

import os

import msgspec
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvsim import Worker, lookup, tokens

from lmcache_rs.client import MPClient
from lmcache_rs.protocol import ops

C = 256
EXAMPLES = int(os.environ.get("LMCACHE_RS_FUZZ_EXAMPLES", "2000"))

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=40)
    | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=20,
)
# wait_prefetch_status blocks by design (up to 5 s): it is fuzzed with tiny timeouts below.
op_ids = st.sampled_from([o.legacy_id for o in ops.OPS if o.legacy_id not in (None, 10)])
op_frames = st.one_of(
    op_ids.map(msgspec.msgpack.encode),
    st.sampled_from([o.name for o in ops.OPS if o.name != "wait_prefetch_status"]).map(
        msgspec.msgpack.encode
    ),
    msgpack_values.map(msgspec.msgpack.encode),
    st.binary(max_size=16),
)
arg_frames = st.lists(
    st.one_of(msgpack_values.map(msgspec.msgpack.encode), st.binary(max_size=128)), max_size=8
)


@st.composite
def messages(draw: st.DrawFn) -> list[bytes]:
    kind = draw(st.integers(0, 3))
    if kind == 0:  # anything at all
        return draw(st.lists(st.binary(max_size=64), min_size=1, max_size=6))
    uid = msgspec.msgpack.encode(draw(st.integers(0, 2**32)))
    if kind == 1:  # truncated: uid only, or uid + op
        return [uid] if draw(st.booleans()) else [uid, draw(op_frames)]
    if kind == 2:  # a known op with random arguments
        return [uid, draw(op_frames), *draw(arg_frames)]
    # wait_prefetch_status with a small timeout, or a real op with a wrong argument count
    if draw(st.booleans()):
        return [uid, msgspec.msgpack.encode(10), msgspec.msgpack.encode("r"), msgspec.msgpack.encode(0.001)]
    return [uid, msgspec.msgpack.encode(8)]


@pytest.fixture
def fuzz_target(server_factory):
    s = server_factory("--max-message-bytes", str(1 << 20))
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(s.url)
    yield s, sock
    sock.close()


def test_every_malformed_message_is_answered(fuzz_target) -> None:
    server, sock = fuzz_target
    good = MPClient(server.url, timeout=10)
    w = Worker(good)
    t = tokens(2 * C, seed=42)
    assert w.store(t, list(range(1, 33)))
    sent = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(messages())
    def one(frames: list[bytes]) -> None:
        nonlocal sent
        sock.send_multipart(frames)
        sent += 1
        assert sock.poll(10_000), f"no reply to {frames!r}"
        reply = sock.recv_multipart()
        assert len(reply) >= 2
        assert reply[0] == frames[0], "the reply carries the request's uid (its first frame)"
        assert server.proc.poll() is None
        if sent % 200 == 0:
            assert good.noop() == "OK"

    one()
    assert sent >= EXAMPLES
    # The data stored before the storm is still there and exact; the server still serves.
    assert lookup(good, t, "after") == 2
    assert w.retrieve(t, list(range(40, 72)), "after")
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            w.kv.blocks_view(list(range(1, 33))), w.kv.blocks_view(list(range(40, 72))), strict=True
        )
    )
    good.end_session("after")
    w.close()
    good.close()


def test_oversized_message_is_dropped_and_the_server_goes_on(fuzz_target) -> None:
    server, sock = fuzz_target
    sock.send_multipart([msgspec.msgpack.encode(1), msgspec.msgpack.encode(24), b"x" * (2 << 20)])
    assert not sock.poll(1000), "a message over --max-message-bytes gets no reply (ZMQ drops the peer)"
    with MPClient(server.url, timeout=10) as c:
        assert c.noop() == "OK"
    assert server.proc.poll() is None


def test_invalid_utf8_in_op_and_args_is_a_bad_request(fuzz_target) -> None:
    """Found by the fuzzer: a msgpack str with invalid UTF-8 raised UnicodeDecodeError, which
    killed the I/O thread and hung the server."""
    server, sock = fuzz_target
    for frames in (
        [b"\x01", b"\xa2\xbe\xef"],  # op: str with invalid UTF-8
        [b"\x02", msgspec.msgpack.encode(13), b"\xa2\xbe\xef"],  # end_session(request_id=invalid)
    ):
        sock.send_multipart(frames)
        assert sock.poll(10_000)
        reply = sock.recv_multipart()
        err = msgspec.msgpack.decode(reply[-1])
        assert err["error"]["code"] in ("bad_frame", "bad_request")
    with MPClient(server.url, timeout=10) as c:
        assert c.noop() == "OK"
