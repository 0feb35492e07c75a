"""Blocks an SM the driver grants kernel instances, with their registers and shared memory, on this GPU.

    python3 bench/occupancy.py exl2_matmul.cu "exl2_gemv<fp16_t, 1, 2>" "exl2_gemv_group<fp16_t, 1, 2>" [--threads 128]

Why: a kernel change that adds shared memory or registers can push a one-wave GEMV into a second wave; the cubin's
numbers (bench/kernel_resources.py, no GPU) give the inputs, this gives the driver's answer
(cuOccupancyMaxActiveBlocksPerMultiprocessor, as the runtime asks it for one-wave grids: launch.blocks_per_sm), for
the build EXLQ_NVRTC_DEFINES selects and the carveout EXLQ_CARVEOUT asks for.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from exlq.runtime.kernels.launch import blocks_per_sm, kernel  # noqa: E402

CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES = 1
CU_FUNC_ATTRIBUTE_NUM_REGS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a file of cuda/, e.g. exl2_matmul.cu")
    parser.add_argument("instances", nargs="+", help='template instances, e.g. "exl2_gemv<fp16_t, 1, 2>"')
    parser.add_argument("--threads", type=int, default=128, help="threads a block")
    args = parser.parse_args()
    from cupy_backends.cuda.api import driver

    device = torch.device("cuda")
    properties = torch.cuda.get_device_properties(device)
    print(f"{properties.name}: {properties.multi_processor_count} SMs")
    for instance in args.instances:
        function = kernel(args.source, tuple(args.instances), instance, device)
        registers = driver.funcGetAttribute(CU_FUNC_ATTRIBUTE_NUM_REGS, function)
        shared = driver.funcGetAttribute(CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, function)
        blocks = blocks_per_sm(function, args.threads)
        print(f"{instance}: {registers} registers, {shared} B static shared memory, {blocks} blocks an SM "
              f"({blocks * properties.multi_processor_count} a wave)")


if __name__ == "__main__":
    main()
