#!/usr/bin/env bash
# One entry point for people and CI:
#   ./dev.sh serve [server flags]   install (once) and start the server with defaults
#   ./dev.sh test  [pytest args]    install (once), then cargo test + the whole pytest suite
#                                   (2 workers; PYTEST_WORKERS=N to change, 0 for one process)
#   ./dev.sh setup | lint | bench
#   ./dev.sh gpu-bundle             wheels + extension for benches/gpu_check.sh on a GPU machine
# The Python environment lives outside the checkout (torch is large: installed once, reused
# by every clone and CI run); override with LMCACHE_RS_VENV.
set -euo pipefail
# CI may run with a trimmed environment: derive HOME (cargo, the venv location) if it is unset.
export HOME="${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$ROOT"
VENV=${LMCACHE_RS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lmcache-rs/venv}
PYTHON=${PYTHON:-python3}

say() { printf '\033[1m[dev.sh]\033[0m %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

apt_install() {
    command -v apt-get >/dev/null || return 1
    say "installing Debian packages: $*"
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

need_rust() {
    [ -d "$HOME/.cargo/bin" ] && PATH="$HOME/.cargo/bin:$PATH"
    command -v cargo >/dev/null || die "Rust >= 1.88 with cargo is required (https://rustup.rs)"
    command -v cc >/dev/null || apt_install gcc libc6-dev || die "a C compiler (gcc) is required"
}

need_python() {
    command -v "$PYTHON" >/dev/null || apt_install python3 python3-venv || die "Python >= 3.11 is required"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "Python >= 3.11 is required, $PYTHON is $("$PYTHON" -V 2>&1)"
    "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv ||
        die "the Python venv module is required"
}

# Tools the test suite uses beyond Python packages: promtool checks the /metrics output and the
# alert rules, redis-server backs the L2 tests (each test starts its own on a free loopback
# port), headless Chromium with its chromedriver loads the /dashboard page.
need_test_tools() {
    command -v promtool >/dev/null || apt_install --no-install-recommends prometheus ||
        say "warning: promtool unavailable; the Prometheus format and alert rule tests will be skipped"
    { command -v chromium >/dev/null && command -v chromedriver >/dev/null; } ||
        apt_install --no-install-recommends chromium chromium-driver ||
        say "warning: chromium unavailable; the dashboard's browser test will be skipped"
    command -v redis-server >/dev/null || apt_install --no-install-recommends redis-server ||
        die "redis-server is required by the L2 tests (apt-get install redis-server)"
}

# Runtime + test dependencies, read from pyproject.toml (the single source).
python_deps() {
    "$VENV/bin/python" - <<'PY'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))
deps = p["project"]["dependencies"] + p["project"]["optional-dependencies"]["test"]
deps += p["build-system"]["requires"]
print("\n".join(deps))
PY
}

setup() {
    need_rust
    need_python
    need_test_tools
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV"
        mkdir -p "$(dirname "$VENV")"
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.lmcache-rs-deps" want
    want=$(sha256sum pyproject.toml | cut -c1-16)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        say "installing Python dependencies (first time: torch is large, a few minutes)"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        python_deps | xargs "$VENV/bin/python" -m pip install -q
        echo "$want" >"$stamp"
    fi
    say "building the Rust extension (release)"
    VIRTUAL_ENV="$VENV" "$VENV/bin/maturin" develop --release -q
}

lint() {
    need_rust
    cargo fmt --check
    cargo clippy --all-targets --locked -- -D warnings
    cargo clippy --all-targets --locked --features python -- -D warnings
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/python" -m mypy # [tool.mypy] in pyproject.toml: the package, strict
}

# What benches/gpu_check.sh needs on a machine with PyTorch and CUDA but no network (Python
# 3.12 there): this project's other runtime dependencies as wheels in .whl/ (git-excluded);
# the extension (abi3, built here by setup) travels as lmcache_rs/_core.abi3.so.
gpu_bundle() {
    setup
    rm -rf .whl
    "$VENV/bin/python" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl msgspec pyzmq litestar uvicorn redis
    if [ -d .git/info ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
        echo /.whl/ >>.git/info/exclude
    fi
    say "bundle: .whl/ ($(du -sh .whl | cut -f1)); on the GPU machine, carrying .whl and lmcache_rs/_core.abi3.so: bash benches/gpu_check.sh"
}

run_tests() {
    cargo test --locked
    # Two pytest workers (pytest-xdist): a test spends most of its time starting server
    # processes and waiting on them, so two halve the suite's time on 2 cores (1187 -> 590 s);
    # PYTEST_WORKERS=0 runs it in one process.
    "$VENV/bin/python" -m pytest -n "${PYTEST_WORKERS:-2}" "$@"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
setup) setup ;;
test) setup && run_tests "$@" ;;
lint) setup && lint ;;
bench) need_rust && cargo bench --bench core "$@" ;;
gpu-bundle) gpu_bundle ;;
serve) setup && exec "$VENV/bin/lmcache-rs" server "$@" ;;
*)
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
