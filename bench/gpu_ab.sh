#!/usr/bin/env bash
# GPU work of a session on smollm2-135m (carried in pieces to /tmp/parts; docs/benchmarks.md, "moving models to the
# GPU") and the synthetic 8B, for this tree or, A/B, for this tree and ALT (default /tmp/gpu/alt: e.g. this commit with
# a patch applied, made here with `git archive HEAD | tar -x -C .gpu/alt && patch -p1 -d .gpu/alt < PATCH`, or several
# at once with their kernels compiled in advance: bench/ab_trees.sh, then TREES="$PWD /tmp/gpu/NAME ..." STAGE=speed).
#   STAGE=assemble: only put smollm2 together (STAGE may list several stages, run in order).
#   LIMIT=S:       the whole run's seconds (e.g. a call's limit less a margin): a stage starts only while more than
#                  STAGE_MIN (default 30) are left, and `tests` stops its pytest when they run out (its log in $OUT), so
#                  one call can list more stages than may fit, the most wanted first.
#   STAGE=session: assemble and convert smollm2 (EXL2 4.0, quick calibration) beside this tree's full GPU test suite,
#                  the real-EXL2 test, then the speed of this tree (as STAGE=speed TREES=$PWD).
#   STAGE=prep:    the same preparation with ALT's GPU tests instead.
#   STAGE=speed:   per tree in TREES (default: this tree and ALT): GEMV alone, the synthetic 8B,
#                  smollm2 FP16 (fp16 and q4 cache) and EXL2 4.0 decode (NO_SMOL=1: no smollm2 runs); once per
#                  setting in SPEED_ENVS (e.g. SPEED_ENVS="EXLQ_MMA=1 EXLQ_MMA=0": each kernel in turn).
#   STAGE=quick:   per tree in TREES and setting in SPEED_ENVS, the short A/B: GEMV alone at 1, 2 and 4 rows (the 8B's
#                  four shapes) and the synthetic 8B's decode and prefill (512, 2048); QUICK_FP16=1 adds the FP16 8B's
#                  prefill first; QUICK_SMALL=1 adds the synthetic Qwen2.5-0.5B's decode twice (a small model: host and
#                  small kernels); QUICK_8B_REPEAT=N the 8B's decode N more times; QUICK_SMOL=1 smollm2 EXL2 4.0 twice;
#                  QUICK_GEMV=0 leaves bench/gemv.py out, QUICK_ROWS its rows, QUICK_GEMV_ARGS more of its options.
#   STAGE=attention: the one-token attention kernel against SDPA (bench/attention.py), then the synthetic models'
#                  decode with it off and on (ATT_ROUNDS rounds of ATT_MODELS).
#   STAGE=widths:  per tree in TREES, bench/gemv.py at one and two rows (4096x14336, 14336x4096) for each of WIDTH_BPWS
#                  (default 3.0 5.0 6.0), then the synthetic 8B's and Qwen2.5-0.5B's decode at each of DECODE_BPWS
#                  (default 3.0 4.0 5.0); WIDTH_ROUNDS=N (default 1) rounds, the trees interleaved within each.
#   STAGE=wide:    the wide GEMV instances against the narrow ones: bench/gemv.py at 1 and 2 rows over the 8B and small
#                  shapes with EXLQ_GEMV_WIDE=0 (narrow) and =1 (wide everywhere), then the synthetic 8B's and
#                  Qwen2.5-0.5B's decode, narrow and with the default rule (WIDE_MIN_COLUMNS).
#   STAGE=tests:   this tree's GPU tests alone (no model needed; the real-EXL2 test skips); PYTEST_ARGS narrows them
#                  (e.g. PYTEST_ARGS="-x -k warp tests/test_kernels_gpu.py").
#   STAGE=profile: this tree's decode step by kernel (bench/profile_decode.py: synthetic 8B, smollm2 EXL2).
#   STAGE=ncu:     Nsight Compute on the GEMV (4096x14336, M=1, eager) of each tree in NCU_TREES (default this one): the full set with source-level counters, its
#                  report in $OUT (open it with `ncu-ui`, or `ncu -i FILE --page source --csv`) and the details page.
#                  NCU_KERNEL (a regex, default exl2_gemv), NCU_ROWS (default 1), NCU_SHAPE and NCU_GEMV_ARGS pick
#                  another launch, e.g. NCU_KERNEL=exl2_stream_rows NCU_ROWS=16 (the multi-row streamed kernel).
#   STAGE=quality: start bench/quality.py in its own session (it outlives the call; at most QUALITY_PARALLEL at once,
#                  default 4, the rest queued; QUALITY_ARGS passes options,
#                  QUALITY_ROOT its out-root, /tmp/quality-NAME, e.g. one for `--grid dense` jobs beside the
#                  reference grid's);
#                  with QUALITY_BPWS="2.5 3.5 4.0:16 ...", one job per bitrate (BPW:HEAD: with those head bits), 10 s
#                  apart, sharing one out-root (start them once its measurement exists: STAGE=measured), each logging
#                  to /tmp/NAME-BPW.log (NAME: the out-root's name); QUALITY_TAG=T names a variant (quality.py --tag:
#                  its own output folders and log /tmp/NAME-BPW-T.log, the out-root's measurement shared).
#                  QUALITY_MODEL=DIR quantizes another model than smollm2 (e.g. the Qwen2.5-Coder-0.5B that
#                  bench/gpu_final.sh rebuilds from its GGUF in /tmp/models), in its own QUALITY_ROOT.
#   STAGE=pattern: read bandwidth by access pattern (bench/dram_pattern.py: the GEMV's tiles as stored, as contiguous
#                  tiles, streamed, chained by programmatic launch; the 8B's GEMV shapes), then the pure-read floor of
#                  the 8B's one-token step (--step llama3-8b) beside its GEMV launches as they run (bench/gemv.py
#                  --step); no model needed.
#   STAGE=ladder:  the wide GEMV with parts taken out (bench/patches/gemv-ladder.patch: -D switches through
#                  EXLQ_NVRTC_DEFINES; no epilogue, no gather, no math, no scales, an L2 prefetch of the first chunk):
#                  where its time goes against the pure read of STAGE=pattern (results are wrong; timing only).
#   STAGE=rows:    the multi-row streamed GEMV's settings: bench/gemv.py at ROWS_COUNTS rows (default 8 14 15 16) over
#                  the 8B's shapes as is and under each of ROWS_SETTINGS (default EXLQ_STREAM_ROWS_STAGES=3 and =2), then
#                  the synthetic 8B's decode at ROWS_BATCHES (default 16 15) as is and with ROWS_AB (default
#                  EXLQ_STREAM_ROWS_STAGES=3), ROWS_ROUNDS rounds (default 2) interleaved.
#   STAGE=variant: a kernel variant (VARIANT, a name of catalog.VARIANTS, through EXLQ_NVRTC_DEFINES): its GPU tests
#                  (VARIANT_TESTS, a -k expression; default the wide and grouped GEMVs'), then bench/gemv.py at
#                  VARIANT_ROWS rows (default 1) and --step llama3-8b, and the 8B's decode at VARIANT_BATCHES (default
#                  1), each without and with it (VARIANT_ENV adds settings to both, e.g. EXLQ_STREAM_ROWS_STAGES=3;
#                  VARIANT_EXTRA, a third setting with the variant, e.g. EXLQ_CARVEOUT=exl2_gemv=100),
#                  VARIANT_ROUNDS rounds (default 2) interleaved.
#   STAGE=spread:  the synthetic 8B's prefill call by call (bench/prefill_spread.py, 512 and 2048 tokens).
#   STAGE=cold:    per tree in TREES, the first run's kernel compile: `exlq bench --synthetic llama3.2-1b` with an empty
#                  kernel cache, then again with it filled (the difference is the compile).
#   STAGE=qwen:    rebuild Qwen2.5-Coder-0.5B in /tmp/models from its GGUF, carried in pieces /tmp/parts/q05.NN (one
#                  .models/qNN a call) with the gguf wheel and its small files in /tmp/gpu (whl/, q05-files/); every
#                  tensor checked against bench/model_manifests (then QUALITY_MODEL=/tmp/models/qwen2.5-coder-0.5b).
#   STAGE=convprof: where a conversion's time goes (bench/profile_convert.py: smollm2, or PROFILE_MODEL, measure and
#                  convert at 4.0 bpw with the built-in calibration, each step timed; the table to $OUT).
#   STAGE=measured: wait up to WAIT seconds for a quality job's log to say its measurement is done.
#   STAGE=wait:    wait up to WAIT seconds for the quality job, then print its log.
#   STAGE=stop:    end any quality job (e.g. STAGE="wait stop speed").
set -uo pipefail
export PYTHONUNBUFFERED=1 EXLQ_SHARED_DIR=/tmp/gpu/shared EXLQ_TEST_MODELS=/tmp/models
# Kernels compiled here (same NVRTC 13.0, sm_90) travel in .gpu1/kcache.txz (bench/ab_trees.sh): a cache hit saves the
# device ~15 s a module.
[ -f /tmp/gpu/kcache.txz ] && [ ! -d /tmp/gpu/kcache ] && tar -xJf /tmp/gpu/kcache.txz -C /tmp/gpu
[ -d /tmp/gpu/kcache ] && export EXLQ_CACHE_DIR=${EXLQ_CACHE_DIR:-/tmp/gpu/kcache}
OUT=${OUT:-/tmp/out}; ALT=${ALT:-/tmp/gpu/alt}; HERE=$PWD; mkdir -p "$OUT" /tmp/models
M=/tmp/models/smollm2-135m E=/tmp/models/smollm2-135m-exl2-4.0bpw

assemble() {  # smollm2 from its carried parts, checked
  [ -f $M/model.safetensors ] && return
  mkdir -p $M.tmp && cp /tmp/gpu/smol-files/* $M.tmp/ && cat /tmp/parts/part.??? > $M.tmp/model.safetensors
  echo "d8d8571b3af99053c8ad455ce009d8479eec5da515f80a417c075d0a7f317904  $M.tmp/model.safetensors" | sha256sum -c \
    && mv $M.tmp $M || exit 1
}

prepare() {  # $1: the tree whose GPU tests run while smollm2 converts
  assemble
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  [ -f $E/config.json ] || python3 -m exlq.cli.app convert $M $E --bpw 4.0 --rows 16 --length 1024 --device cuda --json \
    > $OUT/convert_smol.json 2> $OUT/convert_smol.err &
  echo "== GPU tests of $1"
  (cd $1 && python3 -m pytest -q -p no:cacheprovider -rs -m gpu 2>&1 | tee $OUT/pytest_gpu.log | tail -15)
  wait; grep -E '"decoder_bpw"|"seconds"' $OUT/convert_smol.json
  echo "== real EXL2 model (smollm2 4.0), kernels vs torch, $1"
  (cd $1 && EXLQ_TEST_EXL2_MODEL=$E python3 -m pytest -q -p no:cacheprovider -rs -m gpu tests/test_kernels_gpu.py \
    -k real_exl2 2>&1 | tail -3)
}

setenv() { for kv in "$@"; do export "$kv"; done; }  # each NAME=VALUE given (none: nothing; a bare `export` would list all)

decode_rate() {  # `exlq bench ARGS --json`, its decode tokens/s alone ("decode_tokens_per_second":N)
  python3 -m exlq.cli.app bench "$@" --json 2>>$OUT/err.log | grep -E '"decode_tokens_per_second"' | tr -d ' ,'
}

gemv_ab() {  # $1: row counts; then settings, each "" or "NAME=VALUE ...": bench/gemv.py at the 8B's shapes under each
  local rows=$1 setting; shift
  for setting in "$@"; do
    echo "== gemv, ${setting:-as is}"
    (setenv $setting; python3 bench/gemv.py --rows $rows --shapes 4096x14336 14336x4096 4096x4096 4096x1024 \
      --json-out $OUT/gemv_$(echo "${setting:-default}" | tr -c 'A-Za-z0-9\n' _).json 2>&1 | grep -E "^K=|copy")
  done
}

decode_ab() {  # $1: rounds; $2: batch sizes; then settings as gemv_ab's: the synthetic 8B's decode, interleaved
  local rounds=$1 batches=$2 round batch setting; shift 2
  for round in $(seq $rounds); do for batch in $batches; do for setting in "$@"; do
    echo "8b batch $batch ${setting:-as is} ($round): $(setenv $setting; decode_rate --synthetic llama3-8b --bpw 4.0 --batch $batch --prefill 512)"
  done; done; done
}

speed() {  # $1: tree; $2: environment settings for this run (e.g. EXLQ_MMA=0), also in the output names.
  # Run in a subshell (the stage does): the cd and the exported setting end with it.
  cd $1; tag=$(basename $1)$(echo "${2:-}" | tr -c 'A-Za-z0-9\n' _); [ -n "${2:-}" ] && export ${2}
  echo "=== $1 ${2:-}"
  python3 bench/gemv.py --rows 1 2 4 --json-out $OUT/gemv_$tag.json 2>&1 | tail -13
  python3 bench/gemv.py --rows 1 --group-size 32 --shapes 4096x14336 14336x4096 576x1536 1536x576 \
    --json-out $OUT/gemv_g32_$tag.json 2>&1 | tail -4
  python3 -m exlq.cli.app bench --synthetic llama3-8b --bpw 4.0 --group-size 32 --prefill 512 --json 2>/dev/null \
    | grep -E "decode_tokens|\"512" | sed "s/^/g32 /"
  python3 -m exlq.cli.app bench --synthetic llama3-8b --bpw 4.0 --max-seq-len 8192 --json > $OUT/bench_8b_$tag.json \
    2>>$OUT/err.log; grep -E "decode_tokens|\"512|\"2048|vram|gbps" $OUT/bench_8b_$tag.json | head -8
  [ -n "${NO_SMOL:-}" ] && { tail -3 $OUT/err.log 2>/dev/null; return; }
  [ -n "${NO_FP16:-}" ] || for cache in fp16 q4; do  # NO_FP16=1: skip (the EXL2 kernels do not touch them)
    echo "-- smollm2 fp16, $cache cache"; python3 -m exlq.cli.app bench $M --cache $cache --prefill 512 --json \
      > $OUT/bench_smol_${cache}_$tag.json 2>>$OUT/err.log; grep -E "decode_tokens" $OUT/bench_smol_${cache}_$tag.json
  done
  for run in 1 2; do
    echo "-- smollm2 EXL2 4.0 ($run)"; python3 -m exlq.cli.app bench $E --json > $OUT/bench_smol_exl2_$tag.json \
      2>>$OUT/err.log; grep -E "decode_tokens|\"512|\"2048" $OUT/bench_smol_exl2_$tag.json
  done
  tail -3 $OUT/err.log 2>/dev/null
}

END=$(( $(date +%s) + ${LIMIT:-1000000} ))
left() { echo $(( END - $(date +%s) )); }
for stage in ${STAGE:-session}; do  # several stages in order, e.g. STAGE="assemble quality prep"
[ $(left) -gt ${STAGE_MIN:-30} ] || { echo "== LIMIT: stage $stage not started ($(left) s left)"; continue; }
case $stage in
assemble) assemble ;;
session) prepare $HERE; (speed $HERE) ;;
tests) (timeout $(left) python3 -m pytest -q -p no:cacheprovider -rs -m gpu ${PYTEST_ARGS:-} 2>&1 | tee -a $OUT/pytest_gpu.log \
  | tail -15) ;;
prep) prepare $ALT ;;
speed) for tree in ${TREES:-$HERE $ALT}; do for env in ${SPEED_ENVS:-""}; do (speed $tree "$env"); done; done ;;
profile)
  python3 bench/profile_decode.py --synthetic llama3-8b 2>&1 | tail -28
  [ -f $E/config.json ] && python3 bench/profile_decode.py --model $E --top 15 2>&1 | tail -18 ;;
ncu)
  for tree in ${NCU_TREES:-$HERE}; do
    tag=$(basename $tree); echo "=== ncu $tree"
    (cd $tree && ncu --clock-control none --set full --import-source yes -k regex:${NCU_KERNEL:-exl2_gemv} --launch-skip 4 \
      --launch-count 1 -f -o $OUT/gemv_ncu_$tag python3 bench/gemv.py --once --shapes ${NCU_SHAPE:-4096x14336} \
      --rows ${NCU_ROWS:-1} ${NCU_GEMV_ARGS:-} 2>&1 | tail -3)
    ncu -i $OUT/gemv_ncu_$tag.ncu-rep --page details 2>&1 | grep -vE "^ +-+$" | head -120
    ncu -i $OUT/gemv_ncu_$tag.ncu-rep --page source --csv > $OUT/gemv_ncu_source_$tag.csv 2>&1
  done ;;
quality)  # QUALITY_TREE=$ALT runs the other tree's quantizer (A/B: one job per tree, each its own out-root)
  # The jobs start from a queue that outlives the call, at most QUALITY_PARALLEL (default 4) at once: nine jobs
  # sharing one GPU and 16 cores all ran past a 10-minute call without one finishing (session 12).
  export M=${QUALITY_MODEL:-$M} QUALITY_ARGS QUALITY_THREADS QUALITY_TAG
  export tree=${QUALITY_TREE:-$HERE} root=${QUALITY_ROOT:-/tmp/quality-$(basename ${QUALITY_TREE:-$HERE})}
  export bpws=${QUALITY_BPWS:-all} parallel=${QUALITY_PARALLEL:-4}
  setsid nohup bash -c 'name=$(basename $root)  # quality-queue
    for bpw in $bpws; do
      while [ $(pgrep -fc "[p]ython3 bench/quality\.py /") -ge $parallel ]; do sleep 5; done
      if [ $bpw = all ]; then args="${QUALITY_ARGS:-}" log=/tmp/$name.log
      else args="--bpw ${bpw%%:*} --head-bits $([ ${bpw#*:} = $bpw ] && echo 6 || echo ${bpw#*:}) --extra= ${QUALITY_ARGS:-}"
        log=/tmp/$name-$bpw${QUALITY_TAG:+-$QUALITY_TAG}.log; fi
      [ -n "${QUALITY_TAG:-}" ] && args="$args --tag $QUALITY_TAG"
      (cd $tree && OMP_NUM_THREADS=${QUALITY_THREADS:-4} setsid nohup python3 bench/quality.py $M --out-root $root \
        --device cuda $args > $log 2>&1 < /dev/null &)
      echo "$(date +%T) started in $tree: $args -> $root"
      [ $bpw = all ] || sleep 10
    done' >> /tmp/queue-quality.log 2>&1 < /dev/null &
  sleep 2; tail -n 4 /tmp/queue-quality.log ;;
quick)
  [ -n "${QUICK_FP16:-}" ] && python3 -m exlq.cli.app bench --synthetic llama3-8b --bpw 16 --prefill 512,2048 --json \
    2>>$OUT/err.log | tee $OUT/bench_8b_fp16.json | grep -E "decode_tokens|\"512|\"2048" | sed "s/^/fp16 /"
  for tree in ${TREES:-$HERE}; do for env in ${SPEED_ENVS:-""}; do (
    [ -n "$env" ] && export $env
    tag=$(basename $tree)$(echo "$env" | tr -c 'A-Za-z0-9\n' _); echo "=== quick $tree $env"
    cd $tree && [ "${QUICK_GEMV:-1}" = 1 ] && python3 bench/gemv.py --rows ${QUICK_ROWS:-1 2 4} \
      --shapes 4096x14336 14336x4096 4096x4096 4096x1024 ${QUICK_GEMV_ARGS:-} --json-out $OUT/gemv_$tag.json 2>&1 | tail -13
    python3 -m exlq.cli.app bench --synthetic llama3-8b --bpw 4.0 --prefill 512,2048 --json 2>>$OUT/err.log \
      | tee $OUT/bench_8b_$tag.json | grep -E "decode_tokens|\"512|\"2048|gbps"
    [ -n "${QUICK_SMALL:-}" ] && for run in 1 2; do
      echo "qwen2.5-0.5b $(decode_rate --synthetic qwen2.5-0.5b --bpw 4.0 --prefill 512)"
    done
    [ -n "${QUICK_8B_REPEAT:-}" ] && for run in $(seq $QUICK_8B_REPEAT); do
      echo "8b again $(decode_rate --synthetic llama3-8b --bpw 4.0 --prefill 512)"
    done
    [ -n "${QUICK_SMOL:-}" ] && [ -f $E/config.json ] && for run in 1 2; do
      echo "smollm2 exl2 $(decode_rate $E)"
    done
  ) done; done ;;
attention)  # the one-token attention kernel against SDPA alone (bench/attention.py, the token at ATT_AT of the span:
  # default 1.0, its end; several values run in turn), then synthetic decode with each of ATT_SETTINGS (default: the
  # kernel off and on; e.g. "EXLQ_ATTENTION_CHUNK=64 EXLQ_ATTENTION_CHUNK=" for 64-key blocks against the rule),
  # ATT_ROUNDS rounds (default 2) of ATT_MODELS, the settings interleaved
  for at in ${ATT_AT:-1.0}; do
    python3 bench/attention.py --at $at --json-out $OUT/attention_$at.json 2>&1 | tail -16
  done
  for run in $(seq ${ATT_ROUNDS:-2}); do for model in ${ATT_MODELS:-qwen2.5-0.5b smollm2-135m llama3-8b}; do
    for setting in ${ATT_SETTINGS:-EXLQ_DECODE_ATTENTION=0 EXLQ_DECODE_ATTENTION=1}; do
      echo "$model $setting $(export "$setting"; decode_rate --synthetic $model --bpw 4.0 --prefill 512)"
    done
  done; done ;;
widths)
  for round in $(seq ${WIDTH_ROUNDS:-1}); do for tree in ${TREES:-$HERE}; do (
    cd $tree; tag=$(basename $tree); echo "=== widths $tree, round $round"
    for bpw in ${WIDTH_BPWS:-3.0 5.0 6.0}; do
      python3 bench/gemv.py --bpw $bpw --rows 1 2 --shapes 4096x14336 14336x4096 \
        --json-out $OUT/gemv_${tag}_${bpw}_$round.json 2>&1 | grep -E "^K=" | sed "s/^/$bpw bpw /"
    done
    for model in llama3-8b qwen2.5-0.5b; do for bpw in ${DECODE_BPWS:-3.0 4.0 5.0}; do
      echo "$model $bpw $(decode_rate --synthetic $model --bpw $bpw --prefill 512)"
    done; done
  ) done; done ;;
wide)
  shapes="4096x14336 14336x4096 4096x4096 576x1536 1536x576 896x4864"
  for setting in 0 1; do  # EXLQ_GEMV_WIDE=0: narrow everywhere; 1: wide everywhere
    EXLQ_GEMV_WIDE=$setting python3 bench/gemv.py --rows 1 2 --shapes $shapes --json-out $OUT/gemv_wide_$setting.json \
      2>&1 | tail -12
  done
  for model in llama3-8b qwen2.5-0.5b; do
    for setting in 0 ""; do  # narrow, then the default rule (WIDE_MIN_COLUMNS)
      echo "-- $model EXLQ_GEMV_WIDE=$setting: $(EXLQ_GEMV_WIDE=$setting decode_rate --synthetic $model --bpw 4.0 --prefill 512)"
    done
  done ;;
ladder)  # in LADDER_TREE (default /tmp/gpu/ladder: this commit + bench/patches/gemv-ladder.patch), each rung's build
  IFS=';' read -ra rungs <<< "${LADDER_SETS:-;-DLADDER_NO_EPILOGUE;-DLADDER_NO_EPILOGUE -DLADDER_NO_GATHER;-DLADDER_NO_EPILOGUE -DLADDER_NO_GATHER -DLADDER_NO_MATH;-DLADDER_NO_EPILOGUE -DLADDER_NO_GATHER -DLADDER_NO_MATH -DLADDER_NO_SCALES;-DLADDER_NO_GATHER;-DLADDER_NO_MATH;-DLADDER_NO_EPILOGUE -DLADDER_NO_MATH;-DLADDER_PREFETCH_FIRST}"
  for rung in "${rungs[@]}"; do
    echo "== rung: ${rung:-full kernel}"
    (cd ${LADDER_TREE:-/tmp/gpu/ladder} && EXLQ_NVRTC_DEFINES="$rung" python3 bench/gemv.py --rows 1 \
      --shapes 4096x14336 14336x4096 4096x4096 2>&1 | grep -E "^K=")
  done ;;
qwen)
  Q=/tmp/models/qwen2.5-coder-0.5b
  if [ ! -f $Q/model.safetensors ]; then
    mkdir -p /tmp/gguf && cat /tmp/parts/q05.?? > /tmp/gguf/q05.gguf
    echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  /tmp/gguf/q05.gguf" | sha256sum -c || exit 1
    python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/gpu/whl/*.whl
    PYTHONPATH=/tmp/site python3 bench/models_from_gguf.py qwen2.5-coder-0.5b --gguf /tmp/gguf/q05.gguf $Q.tmp \
      --manifest bench/model_manifests/qwen2.5-coder-0.5b.json && cp /tmp/gpu/q05-files/* $Q.tmp/ && mv $Q.tmp $Q
  fi
  ls $Q ;;
convprof) assemble; python3 bench/profile_convert.py ${PROFILE_MODEL:-$M} --device cuda --json-out $OUT/profile_convert.json \
  2>&1 | tee $OUT/profile_convert.log | grep -vE "^ +(measure|quantize)" | tail -45 ;;
pattern)
  python3 bench/dram_pattern.py --shapes 4096x14336 14336x4096 --json-out $OUT/dram_pattern.json 2>&1 | tail -80
  python3 bench/dram_pattern.py --step llama3-8b --json-out $OUT/dram_step.json 2>&1 | tail -50
  python3 bench/gemv.py --step llama3-8b --floor $OUT/dram_step.json --json-out $OUT/gemv_step.json 2>&1 | tail -12 ;;
rows)
  settings=("" ${ROWS_SETTINGS:-EXLQ_STREAM_ROWS_STAGES=3 EXLQ_STREAM_ROWS_STAGES=2})
  gemv_ab "${ROWS_COUNTS:-8 14 15 16}" "${settings[@]}"
  decode_ab ${ROWS_ROUNDS:-2} "${ROWS_BATCHES:-16 15}" "" "${ROWS_AB:-EXLQ_STREAM_ROWS_STAGES=3}" ;;
variant)
  name=${VARIANT:?STAGE=variant needs VARIANT=NAME (catalog.VARIANTS)} base=${VARIANT_ENV:-}
  settings=("$base" "$base EXLQ_NVRTC_DEFINES=$name")
  [ -n "${VARIANT_EXTRA:-}" ] && settings+=("$base EXLQ_NVRTC_DEFINES=$name $VARIANT_EXTRA")
  (setenv $base EXLQ_NVRTC_DEFINES=$name; timeout $(left) python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_kernels_gpu.py -k "${VARIANT_TESTS:-wide or group or longer_splits or repeated or programmatic}" 2>&1 \
    | tail -3)
  gemv_ab "${VARIANT_ROWS:-1}" "${settings[@]}"
  for setting in "${settings[@]}"; do  # the 8B step's launches as the runtime groups them (gate/up in one)
    echo "== step, ${setting:-as is}"; (setenv $setting; python3 bench/gemv.py --step llama3-8b --after-norm 2>&1 | tail -9)
  done
  decode_ab ${VARIANT_ROUNDS:-2} "${VARIANT_BATCHES:-1}" "${settings[@]}" ;;
spread) python3 bench/prefill_spread.py --lengths 512 2048 --calls 12 2>&1 | tail -30 ;;
cold)
  for tree in ${TREES:-$HERE}; do
    cache=$(mktemp -d); echo "=== cold start, $tree"
    for run in cold cached; do
      start=$(date +%s.%N)
      (cd $tree && EXLQ_CACHE_DIR=$cache python3 -m exlq.cli.app bench --synthetic llama3.2-1b --bpw 4.0 --prefill 512 \
        --json > $OUT/cold_${run}_$(basename $tree).json 2>>$OUT/err.log)
      echo "$run: $(python3 -c "import time; print(f'{time.time() - $start:.1f}')") s"
    done
  done ;;
measured)
  for _ in $(seq ${WAIT:-540}); do grep -qs "measured in" /tmp/quality-*.log && break; sleep 1; done
  grep -hs "measured in" /tmp/quality-*.log ;;
wait)  # (the pattern is anchored: a `pkill -f bench/quality.py` in the run's own command line would kill that shell)
  for _ in $(seq ${WAIT:-540}); do pgrep -f "[p]ython3 bench/quality\.py|quality-queue" > /dev/null || break; sleep 1; done
  for log in /tmp/quality-*.log; do echo "== $log"; grep -v '^  measure' $log | tail -14; done
  for f in /tmp/quality-*/quality.jsonl; do [ -f "$f" ] && cp "$f" "$OUT/$(basename "$(dirname "$f")").jsonl"; done ;;
stop) pkill -f quality-queue; pkill -f "[p]ython3 bench/quality\.py"; sleep 2 ;;  # a job still running would skew `speed`
*) echo "unknown stage $stage"; exit 2 ;;
esac
done
