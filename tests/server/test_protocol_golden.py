"""Byte-level golden tests from spec Appendix 2, against a real server."""

from __future__ import annotations

import msgspec

from lmcache_rs.client.client import make_key
from lmcache_rs.protocol.codec import encode


def test_appendix_2_frames(server) -> None:
    with server.client() as c:
        # get_chunk_size: [00, 15] -> [00, 15, cd0100]
        c.send_frames([b"\x00", b"\x15"])
        assert c.recv_frames() == [b"\x00", b"\x15", bytes.fromhex("cd0100")]
        # ping(nil): [02, 16, c0] -> [02, 16, c3]
        c.send_frames([b"\x02", b"\x16", b"\xc0"])
        assert c.recv_frames() == [b"\x02", b"\x16", b"\xc3"]
        # noop -> "OK"; a string operation name is echoed as sent
        c.send_frames([b"\x03", encode("noop")])
        assert c.recv_frames() == [b"\x03", encode("noop"), bytes.fromhex("a24f4b")]
        # lookup -> [uid, op] (None); a string uid is echoed verbatim
        key = make_key(list(range(300)), "golden")
        c.send_frames([encode("uid-x"), b"\x08", encode(key), b"\x01"])
        assert c.recv_frames() == [encode("uid-x"), b"\x08"]
        # end_session of an unknown id -> 2-frame reply
        c.send_frames([b"\x07", b"\x0d", encode("never-seen")])
        assert c.recv_frames() == [b"\x07", b"\x0d"]
        # store for an unregistered instance -> 92 c400 c2 (+ our error frame)
        wkey = make_key(list(range(512)), "golden", worker_id=0)
        c.send_frames([b"\x05", b"\x06", encode(wkey), encode(12345), encode([list(range(32))]), b"\xc4\x00"])
        frames = c.recv_frames()
        assert frames[:3] == [b"\x05", b"\x06", bytes.fromhex("92c400c2")]
        err = msgspec.msgpack.decode(frames[3])["error"]
        assert err["code"] == "unknown_instance"
        assert "12345" in err["message"]
        # prepare_store for an unregistered instance -> {"context": {}}: no slots list, so
        # LMCache's client commits empty data (answered false) instead of reading "all cached"
        c.send_frames([b"\x06", b"\x10", encode(wkey), encode(12345)])
        assert c.recv_frames()[:3] == [b"\x06", b"\x10", bytes.fromhex("81a7636f6e7465787480")]
        # clear -> [uid, op] (None): LMCache decodes nothing else for clear
        c.send_frames([b"\x08", b"\x14", b"\xc2"])
        assert c.recv_frames() == [b"\x08", b"\x14"]


def test_key_map_is_struct_as_map(server) -> None:
    """The key travels as a map keyed by field name; missing optional fields take defaults."""
    raw = {
        "model_name": "m",
        "world_size": 1,
        "worker_id": None,
        "token_ids": list(range(256)),
        "start": 0,
        "end": 256,
        "request_id": "r",
        "num_kv_readers": 1,
    }
    with server.client() as c:
        c.send_frames([b"\x01", b"\x08", msgspec.msgpack.encode(raw), b"\x01"])
        assert c.recv_frames() == [b"\x01", b"\x08"]
        assert c.call("query_prefetch_status", "r") == 0  # no registered layout: early exit
