"""Frame codec (spec B.2): `[uid, op, payload...]` in, `[uid, op, response?]` out.

Error replies (ours, LMCache sends none): `[uid, op, fallback, {"error": {...}}]`. The third
frame is the op's natural failure value, so an LMCache client that reads three frames sees a
failed store (`[b"", false]`), a zero hit, or None; lmcache-rs clients read the fourth frame
and raise. See docs/protocol.md.
"""

from __future__ import annotations

from typing import Any

import msgspec

from lmcache_rs.protocol import ops
from lmcache_rs.protocol.messages import ErrorFrame, ErrorInfo

_encoder = msgspec.msgpack.Encoder()
_op_decoder = msgspec.msgpack.Decoder(int | str)


#: "Use the op's fallback" (distinct from a fallback of None).
DEFAULT: Any = object()


class ProtocolError(Exception):
    """A request that cannot be decoded or served; `code` goes into the error frame and
    `fallback`, when given, replaces the op's failure value in the payload frame."""

    def __init__(self, code: str, message: str, fallback: Any = DEFAULT) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fallback = fallback


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


def decode_op(frame: bytes) -> ops.OpSpec:
    """The operation of a request frame; raises ProtocolError for anything unknown. Whether
    this server serves it is the engine's to say (`Engine.refusal`)."""
    try:
        op = _op_decoder.decode(frame)
    except (msgspec.DecodeError, ValueError) as e:  # ValueError: invalid UTF-8 in a str
        raise ProtocolError("bad_frame", f"operation frame is not a msgpack int or str: {e}") from None
    spec = ops.find(op)
    if spec is None:
        raise ProtocolError("unknown_op", f"unknown operation {op!r}")
    return spec


def decode_args(
    spec: ops.OpSpec, frames: list[bytes], hashing: ops.KeyHashing | None = None
) -> tuple[Any, ...]:
    """Decodes the payload frames with the op's types (the count must match exactly); keys
    come with their chunk hashes when `hashing` is given (`ops.KeyDecoder`)."""
    if len(frames) != len(spec.decoders):
        raise ProtocolError(
            "bad_request",
            f"{spec.name} takes {len(spec.decoders)} argument frame(s), got {len(frames)}",
        )
    out = []
    for i, (dec, frame) in enumerate(zip(spec.decoders, frames, strict=True)):
        try:
            out.append(dec.decode(frame, hashing) if isinstance(dec, ops.KeyDecoder) else dec.decode(frame))
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            raise ProtocolError("bad_request", f"{spec.name} argument {i}: {e}") from None
    return tuple(out)


def reply_frames(uid: bytes, op: bytes, result: Any, has_payload: bool) -> list[bytes]:
    """A success reply; `has_payload` False (handler returned None) sends two frames."""
    if not has_payload:
        return [uid, op]
    return [uid, op, encode(result)]


def error_frames(
    uid: bytes, op: bytes, spec: ops.OpSpec | None, code: str, message: str, fallback: Any = DEFAULT
) -> list[bytes]:
    if fallback is DEFAULT:
        fallback = spec.fallback if spec is not None else None
    err = ErrorFrame(error=ErrorInfo(code=code, message=message, op=spec.name if spec else ""))
    return [uid, op, encode(fallback), encode(err)]
