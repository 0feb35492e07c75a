#!/usr/bin/env bash
# Variant trees for one GPU A/B call, made here (no GPU): each NAME=PATCH[,PATCH...] becomes .gpu1/NAME, this commit
# (git archive HEAD) with the patches applied; then every tree's kernel modules are compiled for sm_90 into
# .gpu1/kcache (with each prepared variant of catalog.VARIANTS), packed at the end as .gpu1/kcache.txz (NVRTC 13.0 here and on the device: the device finds them cached
# and compiles nothing).
#   bench/ab_trees.sh prefetch=bench/patches/gemv-l2-prefetch.patch adj=bench/patches/mma-adjacent-columns.patch
# then, on the device (carry .gpu1; gpu_ab.sh unpacks the cache into /tmp/gpu/kcache and reads it there):
#   rm -rf /tmp/gpu && cp -r .gpu1 /tmp/gpu && NO_SMOL=1 TREES="$PWD /tmp/gpu/prefetch /tmp/gpu/adj" STAGE=speed bash bench/gpu_ab.sh
# .gpu1 keeps what else is there (shared/, smol-files/, whl/ for the model stages); each tree is ~3 MB, each
# kernel cache entry (one instance) up to ~1 MB, so the cache travels packed as .gpu1/kcache.txz (xz: ~150 MB of cubins
# for eight trees in 18 MB; gpu_ab.sh unpacks it): mind the 64 MiB carry limit (KCACHE_DTYPES=fp16 compiles only the
# fp16 modules). KCACHE_ARCHES (default sm_90) adds others: "sm_90 compute_80 compute_89" also builds the PTX that
# bench/older_arch.sh's EXLQ_ARCH=sm_80 / sm_89 runs load (their default builds only; ~3 min and ~4 MB packed each).
set -euo pipefail
ROOT=$(git rev-parse --show-toplevel); cd "$ROOT"
PY=${PY:-python3}; [ -x .venv/bin/python ] && PY=.venv/bin/python
if [ -f .gpu1/kcache.txz ] && [ ! -d .gpu1/kcache ]; then tar -xJf .gpu1/kcache.txz -C .gpu1 && rm .gpu1/kcache.txz; fi
mkdir -p .gpu1/kcache
trees=("$ROOT")
for spec in "$@"; do
  name=${spec%%=*}; patches=${spec#*=}
  rm -rf ".gpu1/$name" && mkdir -p ".gpu1/$name"
  git archive HEAD | tar -x -C ".gpu1/$name"
  for patch in ${patches//,/ }; do patch -s -p1 --no-backup-if-mismatch -d ".gpu1/$name" < "$patch"; done
  trees+=("$ROOT/.gpu1/$name"); echo "tree .gpu1/$name: HEAD + $patches"
done
for tree in "${trees[@]}"; do
  (cd "$tree" && EXLQ_CACHE_DIR="$ROOT/.gpu1/kcache" KCACHE_DTYPES="${KCACHE_DTYPES:-fp16 bf16}" "$ROOT/$PY" -c "
import os, torch
from exlq.runtime.kernels import catalog, compiler, exl2_ops
wanted = {'fp16': torch.float16, 'bf16': torch.bfloat16}
skip = {exl2_ops.INSTANCE_SETS[d] for n, d in wanted.items() if n not in os.environ['KCACHE_DTYPES'].split()}
# the default builds of every source, then each prepared variant (EXLQ_NVRTC_DEFINES) of the sources it touches
builds = [('', catalog.SOURCES)] + list(catalog.VARIANTS.items())
for arch in os.environ.get('KCACHE_ARCHES', 'sm_90').split():
    for defines, sources in builds if arch == 'sm_90' else builds[:1]:
        os.environ['EXLQ_NVRTC_DEFINES'] = defines
        for source in sources:
            for instances in catalog.SOURCES[source]:
                if instances not in skip:
                    for instance in instances:  # one at a time, as the runtime compiles and caches them (launch.kernel)
                        compiler.compile_source(source, arch, [instance])
print('compiled', os.getcwd())
") &
done
wait
tar -cJf .gpu1/kcache.txz -C .gpu1 kcache && rm -rf .gpu1/kcache
du -sh .gpu1 .gpu1/kcache.txz
