"""A short soak through benches/soak.py (the same script runs for 10 minutes or longer by
hand): steady traffic, eviction and SIGKILLed workers; the server's resources stay flat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECONDS = os.environ.get("LMCACHE_RS_SOAK_SECONDS", "20")


def test_short_soak_stays_flat(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    r = subprocess.run(
        [
            sys.executable,
            "benches/soak.py",
            "--seconds",
            SECONDS,
            "--workers",
            "3",
            "--interval",
            "1",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.read_text())
    assert data["problems"] == []
    assert data["workers_killed"] >= 1
    assert data["requests"] > 1000
    final = data["final"]
    assert (
        final["read_locked"] == final["staging"] == final["sessions"] == final["server_mapped_segments"] == 0
    )
