#!/usr/bin/env bash
# All GPU work of a session in one call: rebuild the carried model, run the whole test suite
# (GPU tests included; PYTEST_ARGS narrows it) and the benchmarks. The device allows 10 minutes per
# command: split the quality benchmark over calls with QUALITY_ARGS (its measurement resumes). Run on the device machine from the repo root
# after the model parts were copied to /tmp/models/parts (see docs/benchmarks.md).
set -uo pipefail
export PYTHONUNBUFFERED=1 EXLQ_SHARED_DIR=$PWD/.gpu/shared EXLQ_TEST_MODELS=/tmp/models
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=/tmp/models/smollm2-135m
mkdir -p $M && cp .gpu/model-files/* $M/
[ -f $M/model.safetensors ] || cat /tmp/models/parts/part.??? > $M/model.safetensors
echo "d8d8571b3af99053c8ad455ce009d8479eec5da515f80a417c075d0a7f317904  $M/model.safetensors" | sha256sum -c || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, typer, transformers; print('torch', torch.__version__, 'typer', typer.__version__, 'transformers', transformers.__version__)"
if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== tests"; python3 -m pytest -q -p no:cacheprovider -rs ${PYTEST_ARGS:-} 2>&1 | tee $OUT/pytest.log | tail -25
fi
echo "== infer (GPU, fp16)"; python3 -m exlq.cli.app infer $M -p "What is the capital of France?" --greedy --max-new-tokens 48 --json > $OUT/infer_gpu.json 2>$OUT/infer_gpu.err; cat $OUT/infer_gpu.json
echo "== eval-ppl 5x1k (GPU, fp16)"; python3 -m exlq.cli.app eval-ppl $M --rows 5 --length 1024 --json > $OUT/ppl_gpu.json 2>$OUT/ppl_gpu.err; cat $OUT/ppl_gpu.json
if [ -n "${FOUNDATION:-}" ]; then
  echo "== benchmark"; python3 bench/foundation.py $M --device cuda --json-out $OUT/bench_gpu_smollm.json 2>$OUT/bench.err | tail -40
fi
echo "== quality (issue 3): smollm2-135m on the GPU"
python3 bench/quality.py $M --out-root ${QUALITY_ROOT:-/tmp/quality} --device cuda ${QUALITY_ARGS:-} 2>$OUT/quality.err | tee $OUT/quality.log | grep -v '^  measure'
cp ${QUALITY_ROOT:-/tmp/quality}/quality.jsonl $OUT/ 2>/dev/null
