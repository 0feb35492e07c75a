#!/usr/bin/env bash
# The streamed one-row GEMV (cuda/exl2_stream.cu) on the GPU: its tests, then the GEMV alone and the synthetic models'
# decode with it off (EXLQ_GEMV_STREAM=0: the register kernel) and on, interleaved; then its tuning knobs.
#   STAGE=tests:  the streamed kernel's GPU tests (and every GEMV test with PYTEST_K=...); a hang ends at 300 s.
#   STAGE=ab:     bench/gemv.py at one row over the 8B's shapes, then decode of AB_MODELS (default llama3-8b
#                 qwen2.5-0.5b) for AB_ROUNDS rounds (default 2), for each of AB_SETTINGS in turn (default
#                 "EXLQ_GEMV_STREAM=0 EXLQ_GEMV_STREAM=1"; a setting of several variables joins them with commas; a
#                 setting "DIR:VARS" runs in the tree DIR, e.g. "$PWD: /tmp/gpu/early: /tmp/gpu/early:EXLQ_PDL=0", so
#                 trees made by bench/ab_trees.sh interleave too; AB_GEMV=0 skips the GEMV part).
#   STAGE=cross:  where the streamed kernel stops paying: bench/gemv.py at one row over CROSS_SHAPES (default: 12.6 to
#                 29.4 MB at 4.0 bpw) with the register kernel (EXLQ_STREAM_MAX_MB=8) and the streamed one (=64), then
#                 4096x6144 and smollm2's head at 5.0 and 6.0 bpw (docs/benchmarks.md, session 31).
#   STAGE=stages: decode of AB_MODELS (default: the four synthetic shapes) with each stage count of STAGE_COUNTS
#                 (default "3 4 5"; EXLQ_STREAM_STAGES fixes it for every launch) and the default (stages by K,
#                 exl2_stream_ops.STAGES_BY_K), interleaved, AB_ROUNDS rounds: the table behind STAGES_BY_K.
#   STAGE=tune:   bench/gemv.py at one row for each setting in TUNE_SETTINGS (space-separated settings, each a
#                 comma-separated list of variables, e.g. "EXLQ_STREAM_STAGES=2 EXLQ_STREAM_COLUMNS=1,EXLQ_STREAM_BLOCKS=3").
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SHAPES="4096x14336 14336x4096 4096x4096 4096x1024 4096x6144 4096x28672"
rate() {  # $1: settings ([DIR:]VAR=V,VAR=V or empty); the rest: `exlq bench` arguments. Its decode tokens/s.
  local setting=$1 dir=.; shift
  [[ $setting == *:* ]] && { dir=${setting%%:*}; setting=${setting#*:}; }
  (cd "$dir" && env ${setting//,/ } timeout 300 python3 -m exlq.cli.app bench "$@" --json 2>>$OUT/err.log \
    | grep -E '"decode_tokens_per_second"' | tr -d ' ,')
}
for stage in ${STAGE:-tests ab}; do case $stage in
tests)
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_gpu.py -x \
    -k "${PYTEST_K:-stream}" 2>&1 | tail -15 ;;
ab)
  [ "${AB_GEMV:-1}" = 0 ] || for s in 0 1; do echo "== GEMV EXLQ_GEMV_STREAM=$s"
    EXLQ_GEMV_STREAM=$s timeout 300 python3 bench/gemv.py --rows 1 --shapes $SHAPES --json-out $OUT/gemv_stream$s.json 2>&1 | tail -7
  done
  for round in $(seq ${AB_ROUNDS:-2}); do for model in ${AB_MODELS:-llama3-8b qwen2.5-0.5b}; do
    for setting in ${AB_SETTINGS:-EXLQ_GEMV_STREAM=0 EXLQ_GEMV_STREAM=1}; do
      echo "round $round $model $setting $(rate "$setting" --synthetic $model --bpw 4.0 --prefill 512)"
  done; done; done ;;
stages)
  settings="EXLQ_DEFAULT=1"; for n in ${STAGE_COUNTS:-3 4 5}; do settings="$settings EXLQ_STREAM_STAGES=$n"; done
  STAGE=ab AB_GEMV=0 AB_MODELS="${AB_MODELS:-llama3-8b llama3.2-1b qwen2.5-0.5b smollm2-135m}" AB_SETTINGS="$settings" \
    bash "$0" ;;
cross)
  for s in 8 64; do echo "== 4.0 bpw, EXLQ_STREAM_MAX_MB=$s"
    EXLQ_STREAM_MAX_MB=$s timeout 200 python3 bench/gemv.py --rows 1 \
      --shapes ${CROSS_SHAPES:-4096x6144 4096x8192 4096x10240 4096x12288 4096x14336 14336x4096} 2>&1 | grep "K="
  done
  for bpw in 5.0 6.0; do for s in 8 64; do echo "== $bpw bpw, EXLQ_STREAM_MAX_MB=$s"
    EXLQ_STREAM_MAX_MB=$s timeout 200 python3 bench/gemv.py --bpw $bpw --rows 1 --shapes 4096x6144 576x49152 2>&1 | grep "K="
  done; done ;;
tune)
  for setting in ${TUNE_SETTINGS:-}; do echo "== $setting"
    env ${setting//,/ } timeout 300 python3 bench/gemv.py --rows 1 --shapes 4096x14336 14336x4096 4096x4096 2>&1 | tail -3
  done ;;
esac; done
tail -5 $OUT/err.log 2>/dev/null
