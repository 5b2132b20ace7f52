"""Process behaviour: CLI, bad configuration, SIGTERM, worker reaping after a crash."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
from kvsim import MODEL, tokens

from lmcache_rs.client import ServerError
from lmcache_rs.client.client import make_key


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmcache_rs", *args], check=False, capture_output=True, text=True, timeout=60
    )


def test_help_explains_every_flag() -> None:
    out = run_cli("server", "--help")
    assert out.returncode == 0
    for flag in (
        "--port",
        "--l1-size-gb",
        "--eviction-policy",
        "--quota",
        "--http-port",
        "--worker-reap-timeout-seconds",
        "--session-ttl-seconds",
        "--chunk-size",
    ):
        assert flag in out.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--port", "0"], "--port"),
        (["--eviction-trigger-watermark", "1.5"], "--eviction-trigger-watermark"),
        (["--l1-align-bytes", "1000"], "--l1-align-bytes"),
        (["--hash-algorithm", "sha256"], "blake3"),
        (["--quota", "a/b=1"], "--quota"),
        (["--quota", "nope"], "SALT=GIB"),
        (["--worker-reap-timeout-seconds", "0.5"], "--worker-reap-timeout-seconds"),
        (["--io-stall-timeout-seconds", "0.5"], "--io-stall-timeout-seconds"),
    ],
)
def test_bad_configuration_fails_at_startup(args: list[str], needle: str) -> None:
    out = run_cli("server", *args)
    assert out.returncode == 2
    assert "invalid configuration" in out.stderr
    assert needle in out.stderr


def test_sigterm_answers_in_flight_requests_and_exits_zero(server) -> None:
    with server.client() as c:
        uids = [c.send("ping", None) for _ in range(50)]
        server.proc.send_signal(signal.SIGTERM)
        codes = []
        for u in uids:
            try:
                c.recv(u, timeout=10)
                codes.append("ok")
            except ServerError as e:
                codes.append(e.code)
            except TimeoutError:
                break
        assert server.proc.wait(30) == 0
    # Every request sent before the signal was answered: served, or refused as shutting down.
    assert len(codes) == len(uids)
    assert set(codes) <= {"ok", "shutting_down"}
    assert "stopped" in server.log()


WORKER = textwrap.dedent(
    """
    import sys, time
    from lmcache_rs.client import MPClient, ShmKVCache
    c = MPClient(sys.argv[1])
    kv = ShmKVCache(2, 64, 16, 2, 32)
    c.register_kv_cache(int(sys.argv[2]), kv.handles(), sys.argv[3], 1)
    print("registered", flush=True)
    time.sleep(600)
    """
)


def test_killed_worker_is_reaped(server_factory) -> None:
    server = server_factory("--worker-reap-timeout-seconds", "1", "--worker-registration-grace-seconds", "1")
    iid = 987654321
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, server.url, str(iid), MODEL], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "registered"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 30
        while "reaped after silence" not in server.log():
            assert time.monotonic() < deadline, "dead worker was not reaped"
            time.sleep(0.2)
        with server.client() as c:
            key = make_key(tokens(256), "k", model_name=MODEL, worker_id=0)
            with pytest.raises(ServerError) as e:
                c.call("store", key, iid, [list(range(16))], b"")
            assert e.value.code == "unknown_instance"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_worker_reregisters_after_a_server_restart(server_factory) -> None:
    """What the vLLM heartbeat does on an unhealthy->healthy edge: register again, same id."""
    from kvsim import Worker  # noqa: PLC0415

    first = server_factory()
    port = int(first.url.rsplit(":", 1)[1])
    with first.client() as c:
        w = Worker(c)
        t = tokens(512)
        assert w.store(t, list(range(1, 33)))
        assert first.stop() == 0
        second = server_factory(port=port)
        with pytest.raises(ServerError) as e:  # the new server has never seen this worker
            w.store(t, list(range(1, 33)))
        assert e.value.code == "unknown_instance"
        assert c.ping(w.instance_id) is False  # told once that it is unknown...
        assert c.ping(w.instance_id) is True  # ...and this edge is where vLLM re-registers
        c.register_kv_cache(w.instance_id, w.kv.handles(), w.model, 1)
        assert w.store(t, list(range(1, 33)))
        w.close()
    assert second.proc.poll() is None
