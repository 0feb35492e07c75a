#!/usr/bin/env bash
# The session's GPU work after the model transfer (see docs/benchmarks.md, "moving models to the GPU machine"):
# STAGE=A: assemble the models, GPU tests, kernel and model speed, speculative decoding.
# STAGE=B: HumanEval on the GPU (resumable: rerun while the machine is warm).
# Parts were copied to /tmp/models/parts-{q15,q05,exl2}; the small files and shared data to /tmp/gpu.
set -uo pipefail
export PYTHONUNBUFFERED=1 EXLQ_SHARED_DIR=/tmp/gpu/shared EXLQ_TEST_MODELS=/tmp/models
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q15=/tmp/models/qwen2.5-coder-1.5b Q05=/tmp/models/qwen2.5-coder-0.5b E=/tmp/models/smollm2-exl2
assemble() {  # dir parts files sha (skipped when no parts were copied)
  ls /tmp/models/$2/part.000 >/dev/null 2>&1 || { echo "no parts for $1"; return; }
  mkdir -p $1 && cp /tmp/gpu/$3/* $1/
  [ -f $1/model.safetensors ] || cat /tmp/models/$2/part.??? > $1/model.safetensors
  echo "$4  $1/model.safetensors" | sha256sum -c || exit 1
}
if [ "${STAGE:-A}" = A ]; then
  assemble $Q15 parts-q15 q15-files "$Q15_SHA"
  assemble $Q05 parts-q05 q05-files "$Q05_SHA"
  assemble $E parts-exl2 exl2-files "$EXL2_SHA"
  export EXLQ_TEST_EXL2_MODEL=$E
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "== kernels: cold compile"; rm -rf ~/.cache/exlq/kernels
  python3 -c "
import time, torch
from exlq.runtime.kernels.catalog import SOURCES
from exlq.runtime.kernels.compiler import compile_source
from exlq.runtime.kernels.launch import arch_of
arch = arch_of(torch.device('cuda')); total = 0
for source, sets in SOURCES.items():
    for instances in sets:
        t = time.perf_counter(); compile_source(source, arch, list(instances)); cold = time.perf_counter() - t; total += cold
        t = time.perf_counter(); compile_source(source, arch, list(instances)); warm = time.perf_counter() - t
        print(f'{source} {arch} ({instances[0]}): cold {cold:.1f} s, cached {warm * 1e3:.1f} ms')
print(f'all kernels cold: {total:.1f} s')"
  echo "== GPU tests"; python3 -m pytest -q -p no:cacheprovider -rs -m gpu tests/test_kernels_gpu.py tests/test_gpu.py tests/test_batch_generator.py 2>&1 | tee $OUT/pytest.log | tail -25
  echo "== gemv"; python3 bench/gemv.py --rows 1 4 8 --json-out $OUT/gemv.json 2>&1 | tail -14
  echo "== bench 8B 4.0 (8192 cache)"; python3 -m exlq.cli.app bench --synthetic llama3-8b --bpw 4.0 --max-seq-len 8192 --json > $OUT/bench_8b.json 2>>$OUT/err.log; cat $OUT/bench_8b.json
  for mode in "graphs:" "eager:EXLQ_CUDA_GRAPHS=0"; do
    echo "== bench smollm2 EXL2 ($mode)"; env ${mode#*:} python3 -m exlq.cli.app bench $E --json > $OUT/bench_smollm2_${mode%%:*}.json 2>>$OUT/err.log; grep -E "decode_tokens|prefill|\"512|\"2048" $OUT/bench_smollm2_${mode%%:*}.json
  done
  echo "== eager host profile"; EXLQ_CUDA_GRAPHS=0 python3 bench/profile_eager.py $E 2>&1 | head -40 | tail -26
  [ -f $Q15/model.safetensors ] && echo "== speculative (1.5B main, 0.5B draft, fp16)" && python3 bench/speculative.py $Q15 $Q05 --device cuda --prompts 8 --max-new-tokens 128 2>&1 | tee $OUT/speculative.txt | tail -15
  tail -3 $OUT/err.log
else
  echo "== HumanEval"; python3 bench/humaneval.py $Q05 ${HUMANEVAL_MODELS:-} --caches ${CACHES:-fp16 q4} --samples-per-task 10 --batch-size 164 --device cuda --out /tmp/humaneval 2>&1 | tail -20
  cp /tmp/humaneval/*.json $OUT/ 2>/dev/null
fi
