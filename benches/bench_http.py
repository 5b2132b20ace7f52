"""ZMQ latency with and without HTTP load, and HTTP latency while the data path is loaded.

    python benches/bench_http.py [--out bench-results/http.json]

Measures, against a fresh server process: noop round trips from one client while idle, then
while another process hammers /metrics and /threads; and /healthcheck and /metrics latency
while a third process streams lookups.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from typing import Any

import httpx
import zmq
from _common import ServerProcess, emit, free_port, pct

from lmcache_rs.client import MPClient
from lmcache_rs.client.client import make_key


def noop_rtts(url: str, n: int) -> list[float]:
    out = []
    with MPClient(url) as c:
        for _ in range(200):
            c.noop()
        for _ in range(n):
            t = time.perf_counter()
            c.noop()
            out.append(time.perf_counter() - t)
    return out


def echo_server(port: int) -> None:
    """The transport floor: a bare pyzmq ROUTER that echoes, in its own process."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(f"tcp://127.0.0.1:{port}")
    while True:
        frames = sock.recv_multipart()
        if frames[-1] == b"stop":
            return
        sock.send_multipart(frames)


def echo_rtts(port: int, n: int) -> list[float]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{port}")
    out = []
    for i in range(n + 200):
        t = time.perf_counter()
        sock.send_multipart([b"\x00", b"\x18"])
        sock.recv_multipart()
        if i >= 200:
            out.append(time.perf_counter() - t)
    sock.send_multipart([b"stop"])
    sock.close()
    return out


def hammer_http(base: str, stop: Any, paths: list[str]) -> None:
    with httpx.Client(base_url=base, timeout=30) as h:
        while not stop.is_set():
            for p in paths:
                h.get(p)


def stream_lookups(url: str, stop: Any) -> None:
    with MPClient(url) as c:
        i = 0
        while not stop.is_set():
            c.lookup(make_key(list(range(i, i + 8192)), f"r{i}"))
            c.end_session(f"r{i}")
            i += 1


def http_latency(base: str, path: str, n: int) -> list[float]:
    out = []
    with httpx.Client(base_url=base, timeout=30) as h:
        for _ in range(20):
            h.get(path)
        for _ in range(n):
            t = time.perf_counter()
            h.get(path)
            out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="samples per measurement")
    ap.add_argument("--out", default="bench-results/http.json")
    args = ap.parse_args()
    srv = ServerProcess("--l1-size-gb", "0.25")
    ctx = mp.get_context("spawn")
    data: dict[str, Any] = {}
    rows = []
    try:
        port = free_port()
        echo = ctx.Process(target=echo_server, args=(port,))
        echo.start()
        floor = echo_rtts(port, args.n)
        echo.join()
        idle = noop_rtts(srv.url, args.n)
        stop = ctx.Event()
        p = ctx.Process(target=hammer_http, args=(srv.http, stop, ["/metrics", "/threads"]))
        p.start()
        time.sleep(1.0)
        loaded = noop_rtts(srv.url, args.n)
        stop.set()
        p.join()
        stop = ctx.Event()
        q = ctx.Process(target=stream_lookups, args=(srv.url, stop))
        q.start()
        time.sleep(1.0)
        health = http_latency(srv.http, "/healthcheck", args.n // 3)
        metrics = http_latency(srv.http, "/metrics", args.n // 3)
        stop.set()
        q.join()
    finally:
        srv.stop()
    for name, s in (
        ("raw_pyzmq_echo_floor", floor),
        ("zmq_noop_idle", idle),
        ("zmq_noop_while_metrics_threads", loaded),
        ("http_healthcheck_while_lookups", health),
        ("http_metrics_while_lookups", metrics),
    ):
        data[name] = {"p50_us": pct(s, 0.5) * 1e6, "p99_us": pct(s, 0.99) * 1e6, "n": len(s)}
        rows.append((name, f"p50 {pct(s, 0.5) * 1e6:8.1f} us   p99 {pct(s, 0.99) * 1e6:8.1f} us"))
    data["noop_p50_ratio_over_raw_echo"] = pct(idle, 0.5) / pct(floor, 0.5)
    rows.append(("noop p50 / raw echo p50", f"{data['noop_p50_ratio_over_raw_echo']:.2f}x"))
    ratio = pct(loaded, 0.5) / pct(idle, 0.5)
    data["noop_p50_ratio_loaded_over_idle"] = ratio
    rows.append(("noop p50 loaded / idle", f"{ratio:.2f}x"))
    emit("HTTP vs data path", rows, data, args.out)


if __name__ == "__main__":
    main()
