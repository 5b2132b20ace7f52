"""`GET /threads`: Python threads with their stacks, for live debugging of hangs."""

from __future__ import annotations

import sys
import threading
import traceback

from litestar import MediaType, Router, get
from litestar.params import FromQuery

from lmcache_rs.http.auth import ALWAYS, SENSITIVE


@get("/threads", media_type=MediaType.TEXT, sync_to_thread=True, opt={SENSITIVE: ALWAYS})
def threads(name: FromQuery[str | None] = None, thread_id: FromQuery[int | None] = None) -> str:
    """Stack of every thread; `name` keeps names containing it (case-insensitive),
    `thread_id` one ident."""
    frames = sys._current_frames()
    out = []
    count = 0
    for t in sorted(threading.enumerate(), key=lambda t: t.name):
        if name is not None and name.lower() not in t.name.lower():
            continue
        if thread_id is not None and t.ident != thread_id:
            continue
        count += 1
        out.append(f"Thread {t.name} (ident={t.ident}, daemon={t.daemon})")
        frame = frames.get(t.ident or -1)
        if frame is not None:
            out.extend(line.rstrip("\n") for line in traceback.format_stack(frame))
        out.append("")
    out.append(f"Total threads: {count}")
    return "\n".join(out) + "\n"


router = Router(path="/", route_handlers=[threads], tags=["debug"])
