"""The tensor-core GEMV's data layout, on CPU: its gather table and its code-pair decode agree on every row.

`cuda/exl2_mma.cu` decodes, per lane t of a 32-row block, four fp16 code pairs (1024 + 2^s q) from the packed words,
and multiplies them with activations that the gather put in "slot" order (x / 2^s at slot 8t + 2·pair + half, as
`exl2_ops.mma_gather_table` says). This test replays that arithmetic in numpy, bit for bit as the .cu writes it
(word choice, masks, byte permutes, the 64-bit window of 3/5/6 bits, the offset sums, the per-group fold), and
checks the result against the dense dequantized product: a wrong slot, shift or word would show. The GPU tests
(tests/test_kernels_gpu.py) then check the kernel itself against the same reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exlq.runtime.exl2 import dequantize, scale_multipliers
from exlq.runtime.kernels import exl2_ops
from test_kernels_gpu import random_exl2  # the GPU tests' random layers (importable without a GPU)

H1024 = np.uint32(0x64006400)


def first_word(bits: int, t: int) -> int:
    return {2: t >> 1, 4: t, 8: 2 * t}.get(bits, (8 * t * bits) >> 5)


def decode_pairs(bits: int, w0: np.ndarray, w1: np.ndarray, t: int) -> list[np.ndarray]:
    """exl2_mma.cu's decode_step for both steps (pairs 0, 1 then 2, 3) over a vector of columns: four fp16 pairs."""
    if bits == 4:
        hi = w0 >> 8
        masks = [(w0, 0x000F000F), (w0, 0x00F000F0), (hi, 0x000F000F), (hi, 0x00F000F0)]
    elif bits == 8:
        masks = [(w0, 0x00FF00FF), (w0 >> 8, 0x00FF00FF), (w1, 0x00FF00FF), (w1 >> 8, 0x00FF00FF)]
    elif bits == 2:
        half = (w0 >> 16) if t & 1 else (w0 & 0xFFFF)  # __byte_perm(w0, 0, 0x4342 or 0x4140): bytes b0, 0, b1, 0
        spread = (half & 0xFF) | ((half >> 8) & 0xFF) << 16
        masks = [(spread, 0x00030003), (spread, 0x000C000C), (spread, 0x00300030), (spread, 0x00C000C0)]
    else:
        s = (8 * t * bits) & 31
        v = ((w1.astype(np.uint64) << np.uint64(32)) | w0.astype(np.uint64)) >> np.uint64(s)
        mask = np.uint64((1 << bits) - 1)
        return [
            ((v >> np.uint64(i * bits)) & mask).astype(np.uint32) | (((v >> np.uint64((i + 4) * bits)) & mask).astype(np.uint32) << 16) | H1024
            for i in range(4)
        ]
    return [(w & np.uint32(m)) | H1024 for w, m in masks]


def halves(pair: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (pair & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64), (pair >> 16).astype(np.uint16).view(np.float16).astype(np.float64)


def emulate(tensors, layout, x: torch.Tensor) -> np.ndarray:
    """y [M, N_pad] as exl2_mma.cu computes it (fp32 accumulation replaced by float64)."""
    table = exl2_ops.chunk_table(layout)
    perm = exl2_ops.perm_from_invperm(tensors.q_invperm)
    gather = exl2_ops.mma_gather_table(layout, perm).numpy().astype(np.int64)
    words = tensors.q_weight.numpy().view(np.uint32)
    n_pad = words.shape[1]
    scale_codes = ((tensors.q_scale.numpy().view(np.uint32)[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & 15).reshape(len(layout), n_pad)
    multipliers = scale_multipliers(tensors.q_scale_max).float().numpy()
    xs = x.half().float().numpy()
    rows_m = xs.shape[0]
    k = xs.shape[1]
    # gather: slot order and offset sums per 32-row block (over the whole K: splits only cut it in pieces)
    xh = np.zeros((rows_m, k), dtype=np.float64)
    off = np.zeros((rows_m, k // 32))
    for r in range(k):
        e = int(gather[r])
        channel, slot, s, bits = e & 0xFFFFF, (e >> 20) & 31, (e >> 25) & 7, ((e >> 28) & 7) + 1
        b = (xs[:, channel] / 2**s).astype(np.float16).astype(np.float64)
        xh[:, 32 * (r // 32) + slot] = b
        off[:, r // 32] += b * (1024.0 + (1 << s) * (1 << (bits - 1)))
    total = np.zeros((rows_m, n_pad))
    for bits, rows, word0, row0, group0, shift in table:
        acc = np.zeros((rows_m, n_pad))
        offsum = np.zeros((rows_m, 1))
        for blk in range(rows // 32):
            gb = row0 // 32 + blk
            for t in range(4):
                fw = first_word(bits, t)
                w0 = words[word0 + blk * bits + fw]
                w1 = words[word0 + blk * bits + fw + 1] if bits not in (2, 4) and fw + 1 < bits else np.zeros(n_pad, np.uint32)
                for p, pair in enumerate(decode_pairs(bits, w0, w0 if bits in (2, 4) else w1, t)):
                    for h, value in enumerate(halves(pair)):
                        acc += xh[:, 32 * gb + 8 * t + 2 * p + h][:, None] * value[None, :]
            offsum += off[:, gb][:, None]
            if (blk + 1) % (1 << shift) == 0 or blk + 1 == rows // 32:
                group = group0 + (blk >> shift)
                scale = (scale_codes[group] + 1.0) ** 2 * multipliers[group]
                total += scale[None, :] * (acc - offsum)
                acc[:] = 0
                offsum[:] = 0
    return total


@pytest.mark.parametrize(
    "k, bits, props, group",
    [(64, [8], [1.0], 32), (96, [6], [1.0], 32), (160, [5], [1.0], 32), (256, [4], [1.0], 128), (288, [3], [1.0], 32),
     (256, [2], [1.0], 64), (576, [8, 4, 3], [0.1, 0.4, 0.5], [32, 64, 64]),
     (960, [6, 5, 4, 3, 2], [0.05, 0.1, 0.25, 0.3, 0.3], [32, 32, 64, 64, 64])],
)
def test_mma_layout_reproduces_the_product(k, bits, props, group):
    tensors, layout = random_exl2(k, 64, bits, props, group, seed=k)
    x = torch.randn(3, k)
    got = emulate(tensors, layout, x)
    weight = dequantize(tensors.q_weight, tensors.q_scale, tensors.q_scale_max, tensors.q_groups, tensors.q_invperm)
    expected = (x.half().double() @ weight.double()).numpy()
    assert np.abs(got - expected).max() / np.abs(expected).max() < 2e-3


def test_mma_gather_table_refuses_partial_blocks():
    tensors, layout = random_exl2(592, 32, [2], [1.0], 64, seed=1)  # 9 groups of 64 and a 16-row tail
    assert exl2_ops.mma_gather_table(layout, exl2_ops.perm_from_invperm(tensors.q_invperm)) is None
