"""A vLLM-like worker process reading replies as LMCache 0.5.6 does (tests/j7.py `J7Worker`).

    python tests/j7worker.py URL MODE INSTANCE_ID SEED TIMEOUT

Reads one JSON command per line on stdin and answers one JSON line on stdout (`WorkerProcess`
drives it). It never re-registers on command: only its heartbeat does, on the unhealthy ->
healthy edge, as LMCache's HeartbeatThread does ("register" is the worker's start-up).
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

from j7 import J7Worker, blocks


def handle(w: J7Worker, cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd["cmd"]
    if op == "register":
        if cmd.get("layout_hints") is not None:
            w.layout_hints = cmd["layout_hints"]
        return w.register().to_json()
    if op == "beat":
        return w.beat(garbled=cmd.get("garbled", False)).to_json()
    if op == "oversized":
        key = w.key(cmd["tokens"], cmd["rid"])
        return w.oversized(key, int(cmd["nbytes"]), float(cmd["timeout"])).to_json()
    if op == "start_heartbeat":
        w.start_heartbeat(float(cmd["interval"]))
        return {"ok": True}
    if op == "stop_heartbeat":
        w.stop_heartbeat()
        return {"ok": True}
    if op == "status":
        return {
            "beats": w.beats,
            "healthy": w.healthy,
            "registrations": w.registrations,
            "beat_log": w.beat_log,
        }
    if op in ("store", "retrieve"):
        t = cmd["tokens"]
        end = cmd.get("end")
        key = w.key(t, cmd["rid"], cmd.get("start", 0), end)
        n = -(-(key.end - key.start) // 256)
        dst = blocks(cmd["first"], n)
        if op == "store":
            if not w.healthy:  # the worker skips transfers while its server is unhealthy
                return {"conclusion": "not stored", "waited": False, "value": None, "detail": "unhealthy"}
            return w.store(key, dst, garbled=cmd.get("garbled", False)).to_json()
        if not w.healthy:
            return {"conclusion": "not retrieved", "waited": False, "value": None, "detail": "unhealthy"}
        w.clear_blocks(dst)
        out = w.retrieve(key, dst).to_json()
        if cmd.get("src") is not None:
            out["value"] = w.same_blocks(blocks(cmd["src"], n), dst)
        return out
    raise ValueError(f"unknown command {op!r}")


def main() -> None:
    url, mode, iid, seed, timeout = sys.argv[1:6]
    w = J7Worker(url, mode, int(iid), seed=int(seed), timeout=float(timeout))
    print(json.dumps({"ready": True}), flush=True)
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "exit":
                print(json.dumps({"ok": True}), flush=True)
                break
            try:
                out = handle(w, cmd)
            except Exception as e:
                out = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            print(json.dumps(out), flush=True)
    finally:
        w.close()


if __name__ == "__main__":
    main()
