#!/usr/bin/env bash
# The GPU tests as an older GPU runs them, on the Hopper device machine: with EXLQ_ARCH (exlq/runtime/kernels/target.py)
# every kernel is built as that architecture's PTX (compiled for the GPU present by the driver) and the runtime takes
# that architecture's paths: no programmatic launch, clusters or streamed GEMV, its shared memory. The Ampere and Ada
# code (the consumer cards most users have) is tested nowhere else.
#   bash bench/older_arch.sh                       # from the repo root on the device; ARCHES="sm_80 sm_89" for both
#   PYTEST_ARGS="tests/test_gpu.py" bash bench/older_arch.sh   # narrower; LIMIT_S: each run's time limit (s)
set -uo pipefail
export PYTHONUNBUFFERED=1
for arch in ${ARCHES:-sm_80}; do
  echo "== GPU tests with EXLQ_ARCH=$arch"; SECONDS=0
  EXLQ_ARCH=$arch timeout "${LIMIT_S:-540}" python3 -m pytest -q -p no:cacheprovider -m gpu --tb=line ${PYTEST_ARGS:-tests/} 2>&1 |
    grep -v "%\]$" | tail -30
  echo "EXLQ_ARCH=$arch: ${SECONDS}s"
done
