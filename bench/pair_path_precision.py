"""CPU emulation of the EXL2 GEMV's fp16 pair path (cuda/exl2_matmul.cu, sub_half): its error against float64 by
code width and activation size, no GPU needed.

    python bench/pair_path_precision.py [--flush 16] [--rms 1 0.1 0.01 0.001]

The kernel stores the activations prescaled by 2^-half_shift(b) in fp16, multiplies them by the centred codes in half2
arithmetic and sums 16 terms a lane in fp16 (8 bits: 4) before the fp32 sum; the prescale keeps those fp16 sums below
max|x|, but pushes small activations toward fp16's subnormals. --flush N emulates summing N terms in fp16 before the
fp32 sum, with the prescale that bound then needs (2^(b-1)·N ≤ 2^shift): the trade-off behind a change of either.
"""

from __future__ import annotations

import argparse
import math

import torch


def pair_path_error(bits: int, rms: float, flush: int | None, k: int = 4096, n: int = 256, seed: int = 0) -> float:
    """Relative error (norm) of one GEMV's output against float64, for fp16 activations of the given rms."""
    gen = torch.Generator().manual_seed(seed)
    terms_in_fp16 = flush or (4 if bits == 8 else 16)
    shift = int(math.log2(2 ** (bits - 1) * terms_in_fp16))
    codes = torch.randint(0, 2**bits, (k, n), generator=gen).float() - 2 ** (bits - 1)  # q - z, exact in fp16
    block_scale = torch.rand(k // 32, n, generator=gen) * 0.02 + 0.01
    x = (rms * torch.randn(k, generator=gen)).half()
    prescaled = (x.float() * 2.0**-shift).half().float()
    # rows r and r + 16 of a block share a half2: each half sums the 16 terms of its rows in order, rounding each step
    terms = (codes * prescaled[:, None]).view(k // 32, 2, 16, n)
    block_sum = torch.zeros(k // 32, n)
    for half in range(2):
        acc = torch.zeros(k // 32, n).half()
        for i in range(16):
            acc = (acc.float() + terms[:, half, i]).half()  # one hfma2: exact product, one rounding of the sum
            if (i + 1) % terms_in_fp16 == 0:
                block_sum += acc.float()
                acc = torch.zeros_like(acc)
    y = (block_sum * 2.0**shift * block_scale).sum(0).double()
    reference = (codes.double().view(k // 32, 32, n) * x.double().view(k // 32, 32, 1)).sum(1)
    reference = (reference * block_scale.double()).sum(0)
    return ((y - reference).norm() / reference.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flush", type=int, default=None, help="terms summed in fp16 (default: the kernel's)")
    parser.add_argument("--rms", type=float, nargs="+", default=[1.0, 0.1, 0.01, 0.001])
    args = parser.parse_args()
    for bits in (2, 3, 4, 5, 6, 8):
        cells = "  ".join(f"rms {r:g}: {pair_path_error(bits, r, args.flush):.1e}" for r in args.rms)
        print(f"{bits} bits  {cells}")


if __name__ == "__main__":
    main()
