"""Restarts with a warm L1 (storage/warm.py): real server processes, a SIGTERM or SIGKILL, a new
server on the same pool and state directory, and workers that never restarted.

The journal replay is also tested directly on hand-written journals (what no process test can
time: a crash between a reserve and its seal)."""

from __future__ import annotations

import os
import time

import httpx
import pytest
import torch
from conftest import free_port, start_server
from kvsim import Worker, lookup, tokens

from lmcache_rs.client.client import make_key
from lmcache_rs.client.engine_driven import EngineDrivenWorker
from lmcache_rs.client.shm_kv import paged_shape
from lmcache_rs.storage import warm
from lmcache_rs.storage.shm_pool import POOL_PREFIX, SHM_DIR

C = 256
BPC = C // 16
OBJ = 131072  # kvsim.Worker's bytes per chunk: 2 layers x 2 (K, V) x 256 tokens x 2 x 32 x fp16


def blocks(first: int, chunks: int) -> list[int]:
    return list(range(first, first + chunks * BPC))


def same(w: Worker, src: list[int], dst: list[int]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(w.kv.blocks_view(src), w.kv.blocks_view(dst), strict=True))


class Node:
    """One server identity (port, pool, state directory) started again and again."""

    def __init__(self, tmp_path, *flags: str) -> None:
        self.tmp = tmp_path
        self.port = free_port()
        self.name = f"r18t{self.port}"
        self.state = os.path.join(tmp_path, "state")
        self.flags = ("--state-dir", self.state, "--shm-name", self.name, *flags)
        self.server = None

    @property
    def pool(self) -> str:
        return os.path.join(SHM_DIR, POOL_PREFIX + self.name)

    @property
    def journal(self) -> str:
        return warm.journal_path(self.state, POOL_PREFIX + self.name)

    def start(self, *extra: str):
        self.server = start_server(self.tmp, *self.flags, *extra, port=self.port)
        return self.server

    def sealed(self) -> None:
        """Waits until the background sealer has journaled every object stored so far (an
        object not yet sealed when the server dies is not re-adopted: storage/warm.py)."""
        deadline = time.monotonic() + 60
        while True:
            st = httpx.get(self.server.http + "/status").json()["storage_manager"]["l1_manager"]
            if st["journal_seals"] is None or st["journal_seals"]["pending"] == 0:
                return
            assert time.monotonic() < deadline, st["journal_seals"]
            time.sleep(0.02)

    def warm_status(self) -> dict:
        return httpx.get(self.server.http + "/status").json()["storage_manager"]["l1_manager"]["warm_start"]

    def cleanup(self) -> None:
        if self.server is not None and self.server.proc.poll() is None:
            self.server.kill()
        if os.path.exists(self.pool):
            os.unlink(self.pool)


@pytest.fixture
def node(tmp_path):
    made: list[Node] = []

    def make(*flags: str) -> Node:
        made.append(Node(tmp_path, *flags))
        return made[-1]

    yield make
    for n in made:
        n.cleanup()


def reregister(w: Worker, server) -> None:
    """What LMCache's worker does after its heartbeat's false ping: register again, same id."""
    w.client = server.client()
    hints = {"kv_layout": "NHD"}
    w.client.register_kv_cache(w.instance_id, w.kv.handles(), w.model, 1, hints)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_restarted_server_serves_the_old_prefix_byte_exact_from_l1(node, how: str) -> None:
    n = node()
    s = n.start()
    w = Worker(s.client())
    t = tokens(4 * C + 7, seed=1)
    assert w.store(t, blocks(1, 4))
    other = tokens(2 * C, seed=2)
    assert w.store(other, blocks(100, 2), request_id="o")
    if how == "sigterm":
        n.sealed()
        assert s.stop() == 0
    else:
        n.sealed()
        s.kill()
    assert os.path.exists(n.pool), "the pool outlives the server"
    s2 = n.start()
    st = n.warm_status()
    assert st["mode"] == "warm", st
    assert (st["listed_objects"], st["adopted_objects"], st["dropped_objects"]) == (6, 6, 0)
    assert st["adopted_bytes"] == 6 * OBJ
    assert "re-adopted 6 of 6 L1 objects" in s2.log()
    reregister(w, s2)
    c = w.client
    assert lookup(c, t, "r") == 4
    assert w.retrieve(t, blocks(180, 4), "r", end=4 * C)
    assert same(w, blocks(1, 4), blocks(180, 4))
    c.end_session("r")
    # The adopted objects are ordinary ones: stored again they are found, not duplicated.
    assert w.store(t, blocks(1, 4), request_id="again")
    stats = httpx.get(s2.http + "/status").json()["storage_manager"]["l1_manager"]
    assert stats["resident_object_count"] == 6
    w.close()


def test_cold_start_flag_and_state_dir_off(node) -> None:
    n = node()
    s = n.start()
    w = Worker(s.client())
    t = tokens(2 * C, seed=3)
    assert w.store(t, blocks(1, 2))
    n.sealed()
    assert s.stop() == 0
    s2 = n.start("--cold-start")
    st = n.warm_status()
    assert (st["mode"], st["reason"], st["adopted_objects"]) == ("cold", "--cold-start", 0)
    reregister(w, s2)
    assert lookup(w.client, t, "r") == 0
    w.client.end_session("r")
    # Journaling goes on: the next warm start has what this run stored.
    assert w.store(t, blocks(1, 2))
    assert s2.stop() == 0
    n.start()
    assert n.warm_status()["adopted_objects"] == 2
    w.close()
    # Without a state directory the pool is removed at exit.
    off = start_server(n.tmp, "--state-dir", "", "--shm-name", n.name + "x")
    path = os.path.join(SHM_DIR, POOL_PREFIX + n.name + "x")
    assert os.path.exists(path)
    assert off.stop() == 0
    assert not os.path.exists(path)


def test_a_corrupted_journal_gives_a_cold_start(node) -> None:
    n = node()
    s = n.start()
    w = Worker(s.client())
    t = tokens(3 * C, seed=4)
    assert w.store(t, blocks(1, 3))
    n.sealed()
    s.kill()
    with open(n.journal, "r+b") as f:
        data = bytearray(f.read())
        data[-5] ^= 0xFF  # inside the last record's payload
        f.seek(0)
        f.write(data)
    s2 = n.start()
    st = n.warm_status()
    assert st["mode"] == "cold", st
    assert "fails its CRC" in st["reason"]
    assert "unusable, starting cold" in s2.log()
    reregister(w, s2)
    assert lookup(w.client, t, "r") == 0
    w.client.end_session("r")
    w.close()


def test_objects_whose_bytes_changed_in_the_pool_are_dropped(node) -> None:
    n = node()
    s = n.start()
    w = Worker(s.client())
    t = tokens(3 * C, seed=5)
    assert w.store(t, blocks(1, 3))
    n.sealed()
    listed = warm.listed_objects(warm.read_records(n.journal), next(iter(warm.read_records(n.journal))))
    assert len(listed) == 3
    second = next(o for o in listed if o.offset == sorted(x.offset for x in listed)[1])
    s.kill()
    with open(n.pool, "r+b") as f:  # one bit of one object flips while no server runs
        f.seek(second.offset + 1000)
        b = f.read(1)
        f.seek(second.offset + 1000)
        f.write(bytes([b[0] ^ 1]))
    s2 = n.start()
    st = n.warm_status()
    assert (st["adopted_objects"], st["dropped_objects"], st["checksum_mismatches"]) == (2, 1, 1), st
    reregister(w, s2)
    hit = lookup(w.client, t, "r")
    assert hit < 3
    if hit:  # what is served is byte-exact
        assert w.retrieve(t, blocks(100, hit), "r", end=hit * C)
        assert same(w, blocks(1, hit), blocks(100, hit))
    w.client.end_session("r")
    w.close()


def test_a_write_cut_short_by_the_crash_is_never_served(node) -> None:
    """A full L1; an engine-driven worker gets a slot where an old object was (demand
    eviction), writes half of it, and the server is SIGKILLed before the commit. The new server
    adopts neither the half-written object nor the old one whose bytes it overwrote."""
    # 8 objects fill L1; the watermark never triggers, so only demand eviction frees space.
    n = node("--l1-size-gb", "0.001", "--eviction-trigger-watermark", "1.0")
    s = n.start()
    w = Worker(s.client())
    a = tokens(8 * C, seed=6)
    assert w.store(a, blocks(1, 8))
    n.sealed()  # A's objects are journaled before B's slot evicts one of them
    g = torch.Generator().manual_seed(7)
    layers = [torch.randn(paged_shape("NHD", 256, 16, 2, 32), generator=g).half() for _ in range(2)]
    ed = EngineDrivenWorker(s.client(), layers, instance_id=77, model_name=w.model)
    ed.register()
    b = tokens(C, seed=8)
    key_b = make_key(b, "b", model_name=w.model, worker_id=0)
    slots = ed.client.prepare_store(key_b, 77)
    assert len(slots.slots) == 1
    slot = slots.slots[0]
    ed.pool.raw(slot)[: slot.length // 2].fill_(0x5A)  # half of the copy, then the crash
    s.kill()
    s2 = n.start()
    st = n.warm_status()
    # A's last chunk was evicted for B's slot (objects of a call are evicted last chunk first).
    assert (st["listed_objects"], st["adopted_objects"]) == (7, 7), st
    reregister(w, s2)
    assert lookup(w.client, a, "ra") == 7
    assert w.retrieve(a, blocks(130, 7), "ra", end=7 * C)
    assert same(w, blocks(1, 7), blocks(130, 7))
    w.client.end_session("ra")
    assert lookup(w.client, b, "rb") == 0
    w.client.end_session("rb")
    w.close()


# ---- the journal replay, on hand-written journals --------------------------------------------

HEADER = warm.Header(warm.VERSION, "pool", 64 * 4096, 4096)


def write(path: str, *records: warm.Record, tail: bytes = b"") -> None:
    with open(path, "wb") as f:
        for r in (HEADER, *records):
            f.write(warm._frame(r))
        f.write(tail)


def seal(*objs: tuple[int, int]) -> warm.Seal:
    """Objects `(hash byte, slot)` of 4096 bytes in one scope."""
    return warm.Seal("m", 0, 0, "", [(bytes([h]) * 32, s * 4096, 4096, 4096, b"d" * 32) for h, s in objs])


def listed(path: str) -> list[tuple[int, int]]:
    return [(o.hash[0], o.offset // 4096) for o in warm.listed_objects(warm.read_records(path), HEADER)]


def test_replay_adopts_only_what_nothing_newer_claimed(tmp_path) -> None:
    p = str(tmp_path / "j")
    # 1 at slot 0, 2 at slot 1; then slot 1 handed to a writer that never sealed: 2 is gone.
    write(p, seal((1, 0), (2, 1)), warm.Reserve([(4096, 4096)]))
    assert listed(p) == [(1, 0)]
    # ... and sealed by it: its object (3) replaces 2.
    write(p, seal((1, 0), (2, 1)), warm.Reserve([(4096, 4096)]), seal((3, 1)))
    assert listed(p) == [(1, 0), (3, 1)]
    # A range reserved across two objects (mixed sizes) drops both.
    write(p, seal((1, 0), (2, 1), (4, 2)), warm.Reserve([(4096, 8192)]))
    assert listed(p) == [(1, 0)]
    # A key sealed twice: the newest copy is the one adopted.
    write(p, seal((1, 0)), seal((1, 5)))
    assert listed(p) == [(1, 5)]
    # Clear drops everything before it; forget drops a key.
    write(p, seal((1, 0)), warm.Clear(), seal((2, 1), (3, 2)), warm.Forget("m", 0, 0, "", [bytes([3]) * 32]))
    assert listed(p) == [(2, 1)]


def test_replay_of_a_damaged_journal(tmp_path) -> None:
    p = str(tmp_path / "j")
    # A record cut short at the end (the crash interrupted its write): the log ends before it.
    frame = warm._frame(seal((2, 1)))
    write(p, seal((1, 0)), tail=frame[:-3])
    assert listed(p) == [(1, 0)]
    # A whole record with a bad CRC: nothing is trusted.
    write(p, seal((1, 0)), tail=frame[:-1] + bytes([frame[-1] ^ 1]))
    with pytest.raises(warm.JournalError, match="CRC"):
        listed(p)
    # Another pool size or alignment.
    write(p, seal((1, 0)))
    other = warm.Header(warm.VERSION, "pool", 32 * 4096, 4096)
    with pytest.raises(warm.JournalError, match="l1-size-gb"):
        warm.listed_objects(warm.read_records(p), other)


def test_ranges_union() -> None:
    r = warm._Ranges()
    r.add(10, 20)
    r.add(30, 40)
    assert not r.overlaps(20, 30)
    assert all(r.overlaps(a, b) for a, b in [(19, 21), (0, 11), (39, 50), (12, 13)])
    r.add(15, 35)
    assert (r.starts, r.ends) == ([10], [40])
    r.add(40, 50)
    r.add(0, 5)
    assert (r.starts, r.ends) == ([0, 10], [5, 50])
    assert not r.overlaps(5, 10)


# ---- registrations survive the restart (engine/statefile.py) ---------------------------------


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_worker_that_never_registers_again_keeps_working(node, how: str) -> None:
    """The same client, the same socket: after the restart the worker just goes on."""
    n = node()
    s = n.start()
    w = Worker(s.client())
    c = w.client
    t = tokens(3 * C, seed=11)
    assert w.store(t, blocks(1, 3))
    if how == "sigterm":
        n.sealed()
        assert s.stop() == 0
    else:
        n.sealed()
        s.kill()
    s2 = n.start()
    restored = httpx.get(s2.http + "/status").json()["restored_workers"]
    assert restored == {"restored": [w.instance_id], "dropped": {}}
    assert c.ping(w.instance_id)  # registered: LMCache's heartbeat sees nothing to recover
    assert lookup(c, t, "r") == 3
    assert w.retrieve(t, blocks(100, 3), "r", end=3 * C)
    assert same(w, blocks(1, 3), blocks(100, 3))
    c.end_session("r")
    t2 = tokens(2 * C, seed=12)
    assert w.store(t2, blocks(50, 2), request_id="new")
    assert lookup(c, t2, "r2") == 2
    c.end_session("r2")
    # Unregistered, it is not restored by the next restart.
    c.unregister_kv_cache(w.instance_id)
    n.sealed()
    s2.kill()
    s3 = n.start()
    assert httpx.get(s3.http + "/status").json()["restored_workers"]["restored"] == []
    w.close()


def test_an_engine_driven_worker_keeps_its_pool_mapping(node) -> None:
    n = node()
    s = n.start()
    g = torch.Generator().manual_seed(13)
    layers = [torch.randn(paged_shape("NHD", 256, 16, 2, 32), generator=g).half() for _ in range(2)]
    c = s.client()
    ed = EngineDrivenWorker(c, layers, instance_id=4242, model_name="ed-model")
    ed.register()
    t = tokens(2 * C, seed=14)
    assert ed.store(make_key(t, "s", model_name="ed-model", worker_id=0), blocks(1, 2))
    n.sealed()
    s.kill()
    s2 = n.start()
    assert httpx.get(s2.http + "/status").json()["restored_workers"]["restored"] == [4242]
    assert c.lookup(make_key(t, "r", model_name="ed-model")) == 2
    assert ed.retrieve(make_key(t, "r", model_name="ed-model", worker_id=0), blocks(100, 2))
    for layer in layers:
        assert torch.equal(layer[:, blocks(1, 2)], layer[:, blocks(100, 2)])
    c.end_session("r")


def test_a_worker_whose_memory_is_gone_is_dropped(node) -> None:
    n = node()
    s = n.start()
    w = Worker(s.client())
    keep = Worker(s.client(), seed=1)
    n.sealed()
    s.kill()
    w.close()  # the worker died with the server: its KV segments are unlinked
    s2 = n.start()
    restored = httpx.get(s2.http + "/status").json()["restored_workers"]
    assert restored["restored"] == [keep.instance_id]
    assert str(w.instance_id) in restored["dropped"]
    assert f"worker instance {w.instance_id} not restored after the restart" in s2.log()
    keep.close()
