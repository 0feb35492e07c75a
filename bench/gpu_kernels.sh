#!/usr/bin/env bash
# GPU session for the kernels (issue 4): GPU tests, kernel and model benchmarks, in one call.
# Before it, copy the parts of a converted model to /tmp/models/parts-exl2 (see docs/benchmarks.md, "moving a
# model to the GPU machine"); EXL2_SHA is its sha256. Results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 EXLQ_SHARED_DIR=$PWD/.gpu/shared EXLQ_TEST_MODELS=/tmp/models
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
E=/tmp/models/smollm2-exl2
if [ -d /tmp/models/parts-exl2 ]; then
  mkdir -p $E && cp .gpu/exl2-files/* $E/
  [ -f $E/model.safetensors ] || cat /tmp/models/parts-exl2/part.??? > $E/model.safetensors
  echo "${EXL2_SHA}  $E/model.safetensors" | sha256sum -c || exit 1
  export EXLQ_TEST_EXL2_MODEL=$E
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)"
echo "== first compile (cold cache)"; rm -rf ~/.cache/exlq/kernels
python3 - <<'PY'
import time, torch
from exlq.runtime.kernels.catalog import SOURCES
from exlq.runtime.kernels.compiler import compile_source
from exlq.runtime.kernels.launch import arch_of
arch = arch_of(torch.device("cuda"))
for source, sets in SOURCES.items():
  for instances in sets:
    t = time.perf_counter(); compile_source(source, arch, list(instances)); cold = time.perf_counter() - t
    t = time.perf_counter(); compile_source(source, arch, list(instances)); warm = time.perf_counter() - t
    print(f"{source} {arch} ({instances[0]}...): cold {cold:.2f} s, cached {warm * 1e3:.1f} ms")
PY
if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== tests"; python3 -m pytest -q -p no:cacheprovider -rs -x ${PYTEST_ARGS:--m gpu} 2>&1 | tee $OUT/pytest.log | tail -30
fi
[ -n "${TESTS_ONLY:-}" ] && exit 0
echo "== gemv"; python3 bench/gemv.py --rows 1 4 8 --json-out $OUT/gemv.json 2>&1 | tail -20
echo "== bench synthetic llama3-8b 4.0 (8192-token cache)"; python3 -m exlq.cli.app bench --synthetic llama3-8b --bpw 4.0 --max-seq-len 8192 --json > $OUT/bench_8b_4.0.json 2>$OUT/bench.err; cat $OUT/bench_8b_4.0.json
echo "== bench synthetic llama3-8b fp16"; python3 -m exlq.cli.app bench --synthetic llama3-8b --bpw 16 --max-seq-len 2048 --new-tokens 64 --json > $OUT/bench_8b_fp16.json 2>>$OUT/bench.err; cat $OUT/bench_8b_fp16.json
for shape in llama3.2-1b qwen2.5-0.5b; do
  echo "== bench synthetic $shape 4.0"; python3 -m exlq.cli.app bench --synthetic $shape --bpw 4.0 --json > $OUT/bench_${shape}.json 2>>$OUT/bench.err; grep -E "tokens_per_second|roofline|peak" -A2 $OUT/bench_${shape}.json | head -12
done
if [ -n "${EXLQ_TEST_EXL2_MODEL:-}" ]; then
  for mode in "graphs+kernels:" "no-graphs:EXLQ_CUDA_GRAPHS=0" "torch-path:EXLQ_KERNELS=0"; do
    echo "== bench smollm2-135m EXL2 4.0 (${mode%%:*})"; env ${mode#*:} python3 -m exlq.cli.app bench $E --json > $OUT/bench_smollm2_${mode%%:*}.json 2>>$OUT/bench.err; grep -E "decode_tokens|roofline|peak" $OUT/bench_smollm2_${mode%%:*}.json
  done
fi
if [ -n "${EXLQ_TEST_EXL2_MODEL:-}" ]; then
  echo "== host profile of eager decode"; EXLQ_CUDA_GRAPHS=0 python3 bench/profile_eager.py $E 2>&1 | head -45 | tail -30
fi
tail -5 $OUT/bench.err
