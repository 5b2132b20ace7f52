"""Shared pytest configuration and fixtures: real server subprocesses."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from lmcache_rs.client import MPClient
from lmcache_rs.client.client import wait_for_server

# Servers started by tests keep no state across restarts (no journal, no pool left in /dev/shm
# at exit) unless a test passes --state-dir / StorageConfig(state_dir=...) itself.
os.environ["LMCACHE_RS_STATE_DIR"] = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(1000):
        port = random.randrange(20000, 55000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a Redis Cluster node")


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: str
    http: str

    killed: bool = False

    def kill(self) -> None:
        """SIGKILL (a crash: no drain), on purpose."""
        self.killed = True
        self.proc.kill()
        self.proc.wait(10)

    def client(self, timeout: float = 20.0) -> MPClient:
        return MPClient(self.url, timeout=timeout)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


def start_server(tmp_path: os.PathLike[str], *flags: str, port: int | None = None) -> Server:
    port = port or free_port()
    http_port = free_port()
    log_path = os.path.join(tmp_path, f"server-{port}.log")
    cmd = [
        sys.executable,
        "-m",
        "lmcache_rs",
        "server",
        "--port",
        str(port),
        "--http-port",
        str(http_port),
        "--http-host",
        "127.0.0.1",
        "--l1-size-gb",
        "0.0625",
        "--log-level",
        "INFO",
        *flags,
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    server = Server(proc, f"tcp://127.0.0.1:{port}", log_path, f"http://127.0.0.1:{http_port}")
    try:
        wait_for_server(server.url, 60, alive=lambda: proc.poll() is None)
    except (RuntimeError, TimeoutError) as e:
        server.stop()
        raise RuntimeError(f"{e}:\n{server.log()}") from None
    return server


@pytest.fixture
def server_factory(tmp_path: os.PathLike[str]) -> Iterator[object]:
    started: list[Server] = []

    def make(*flags: str, port: int | None = None) -> Server:
        s = start_server(tmp_path, *flags, port=port)
        started.append(s)
        return s

    yield make
    for s in started:
        rc = s.stop()
        assert rc == 0 or s.killed, f"server exited with {rc}:\n{s.log()}"


@pytest.fixture
def runtime_factory() -> Iterator[object]:
    """A server running in this process (no HTTP), for tests that reach into its state;
    `clock`: the request I/O loop's heartbeat clock."""
    from lmcache_rs.config import HttpConfig, MPConfig, ServerConfig  # noqa: PLC0415
    from lmcache_rs.runtime import Runtime  # noqa: PLC0415

    started: list[Runtime] = []

    def make(storage: object, clock: object = None) -> Runtime:
        cfg = ServerConfig(
            mp=MPConfig(port=free_port()), storage_manager=storage, http=HttpConfig(enabled=False)
        )
        rt = Runtime(cfg, clock=clock)
        rt.start()
        started.append(rt)
        return rt

    yield make
    for rt in started:
        rt.stop()


@pytest.fixture
def server(server_factory) -> Server:
    return server_factory()


class RedisServer:
    """A real redis-server on a free loopback port (no persistence), restartable on that port."""

    def __init__(self, exe: str, workdir: str, port: int | None = None) -> None:
        self.exe = exe
        self.workdir = workdir
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, extra: list[str] | None = None) -> None:
        import redis  # noqa: PLC0415

        self.proc = subprocess.Popen(
            [
                self.exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.workdir,
                *(extra or []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        with redis.Redis(port=self.port, socket_timeout=1) as r:
            while True:
                try:
                    r.ping()
                    return
                except redis.ConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.kill()
                        raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                    time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def redis_server(tmp_path: os.PathLike[str]) -> Iterator[RedisServer]:
    """redis-server is part of the test environment (./dev.sh setup installs it): a missing
    binary fails the L2 tests instead of skipping them."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (./dev.sh setup installs it)")
    r = RedisServer(exe, str(tmp_path))
    r.start()
    yield r
    r.kill()


@pytest.fixture
def redis_cluster(tmp_path: os.PathLike[str]) -> Iterator[str]:
    """A real three-node Redis Cluster (no replicas) on free loopback ports; yields a node URL."""
    exe, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if exe is None or cli is None:
        pytest.fail("redis-server and redis-cli are not installed (./dev.sh setup installs them)")
    nodes: list[RedisServer] = []
    try:
        for i in range(3):
            d = os.path.join(tmp_path, f"node{i}")
            os.makedirs(d)
            nodes.append(RedisServer(exe, d, free_cluster_port()))
            nodes[-1].start(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *[f"127.0.0.1:{n.port}" for n in nodes],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        _wait_cluster_ok(cli, nodes[0].port)
        yield nodes[0].url
    finally:
        for n in nodes:
            n.kill()


def _wait_cluster_ok(cli: str, port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        out = subprocess.run(
            [cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True, check=False
        )
        if "cluster_state:ok" in out.stdout:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis cluster did not become ready: {out.stdout}")
        time.sleep(0.1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests where torch sees no CUDA device (never fake one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
