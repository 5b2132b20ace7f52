"""`lmcache_rs/_core.pyi` agrees with the compiled module (DESIGN.md §3: the stub is checked).

The stub is kept by hand beside the bindings, so this runs mypy's stubtest on the built
extension: every public name, class member, property and parameter (name, kind, default) of
the module must be in the stub and the reverse, with the exceptions (and why) listed in
`stubtest_allowlist.txt`. Like `cargo test`, it checks the extension `./dev.sh setup` built.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ALLOWLIST = Path(__file__).with_name("stubtest_allowlist.txt")


def test_stub_matches_module(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy.stubtest",
            "lmcache_rs._core",
            "--concise",
            "--allowlist",
            str(ALLOWLIST),
            "--mypy-config-file",
            str(ALLOWLIST.parents[2] / "pyproject.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # mypy's cache lands here, not in the checkout
        check=False,
    )
    assert out.returncode == 0, f"_core.pyi disagrees with the module:\n{out.stdout}{out.stderr}"
