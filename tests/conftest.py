"""Shared pytest configuration and fixtures: real server subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from lmcache_rs.client import MPClient
from lmcache_rs.client.client import wait_for_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: str
    http: str

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
        assert rc == 0, f"server exited with {rc}:\n{s.log()}"


@pytest.fixture
def server(server_factory) -> Server:
    return server_factory()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests where torch sees no CUDA device (never fake one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
