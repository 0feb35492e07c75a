"""Registers and local memory (spills) of kernel instances, read from the cubin NVRTC makes: no GPU needed.

    python bench/kernel_resources.py exl2_matmul.cu "exl2_gemv<fp16_t, 1, 2>" "exl2_gemv<fp16_t, 1>" [--arch sm_90]

Occupancy follows from the registers (64 a thread: 8 blocks of 128 threads an SM on sm_80/sm_90), and a kernel with
local memory spills (or keeps an indexed array there): check both before spending a GPU call on a kernel change. Reads
EIATTR_REGCOUNT and EIATTR_FRAME_SIZE from the cubin's `.nv.info` section (compiler.cubin_resources).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exlq.runtime.kernels import compiler  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a file of cuda/, e.g. exl2_matmul.cu")
    parser.add_argument("instances", nargs="+", help='template instances, e.g. "exl2_gemv<fp16_t, 1, 2>"')
    parser.add_argument("--arch", default="sm_90", help="a real architecture, sm_XY (a cubin to read; not compute_XY PTX)")
    args = parser.parse_args()
    if not args.arch.startswith("sm_"):
        parser.error(f"--arch must name a real architecture (sm_80, sm_90, ...), not {args.arch!r}")
    module = compiler.compile_source(args.source, args.arch, list(args.instances))
    registers, local = compiler.cubin_resources(module.image)
    for instance in args.instances:
        mangled = module.names[instance]
        print(f"{instance}: {registers.get(mangled, '?')} registers, {local.get(mangled, 0)} bytes of local memory")


if __name__ == "__main__":
    main()
