"""Shared helpers of the Python benchmark scripts (server process, percentiles, output)."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmcache_rs.client.client import wait_for_server

# The servers benchmarks start are throwaway: no warm-restart state. With the default state dir
# a stopped server keeps its L1 pool in /dev/shm for the next start (docs/operations.md), and
# benchmark servers use a new port each time, so every run would leave its pools behind.
# bench_restart.py passes --state-dir itself.
os.environ.setdefault("LMCACHE_RS_STATE_DIR", "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`lmcache-rs server` in a subprocess on free ports; stopped with SIGTERM."""

    def __init__(self, *flags: str) -> None:
        self.port, self.http_port = free_port(), free_port()
        self.url = f"tcp://127.0.0.1:{self.port}"
        self.http = f"http://127.0.0.1:{self.http_port}"
        cmd = [
            sys.executable,
            "-m",
            "lmcache_rs",
            "server",
            "--port",
            str(self.port),
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(self.http_port),
            "--log-level",
            "WARNING",
            *flags,
        ]
        self.proc = subprocess.Popen(cmd)
        wait_for_server(self.url, 60, alive=lambda: self.proc.poll() is None)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def pct(samples: Sequence[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def emit(name: str, rows: list[tuple[str, str]], data: dict[str, Any], out: str | None) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{name}")
    print("-" * (width + 30))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    data["machine"] = machine()
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(data, indent=2))
        print(f"\nJSON written to {out}")
