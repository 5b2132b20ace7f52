#!/usr/bin/env bash
# The GPU checks (issue #5) in one command, for a machine with CUDA and PyTorch but none of this
# project's other dependencies and no network (the device machine). Prepare here with
# `./dev.sh gpu-bundle`, then run from the repository root there, carrying `.whl` and
# `lmcache_rs/_core.abi3.so`:
#     bash benches/gpu_check.sh
# It runs the `gpu`-marked tests and benches/bench_gpu.py; logs and JSON go to $OUT (or
# /tmp/gpu-check).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
        exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch, lmcache_rs; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0))" 2>&1 |
    tee -a "$OUT/gpu.txt" || exit 1
rc=0
"$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rA 2>&1 | tee "$OUT/gpu-tests.log" || rc=1
"$PY" benches/bench_gpu.py --chunks 32 --out "$OUT/bench-gpu.json" 2>&1 | tee "$OUT/bench-gpu.log" || rc=1
exit $rc
