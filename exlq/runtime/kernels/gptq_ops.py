"""The quantizer's sequential loops on the GPU (`cuda/gptq.cu`): one launch per 32-row block.

GPTQ's column loop and coordinate descent's row loop run ~20 small torch kernels a row, which bound a conversion's
time on a GPU (session 16's profile: ~60 % of it). The kernels do a block's rows in one launch with the torch path's
arithmetic, rounding for rounding; `exlq.quant.gptq` calls them where `enabled(device)` holds and keeps its torch
loops as the reference (the GPU tests compare both bit for bit).
"""

from __future__ import annotations

import torch

from exlq.runtime.kernels.launch import kernel, launch

SOURCE = "gptq.cu"
INSTANCES = ("gptq_block", "refine_block")
BLOCK_ROWS = 32  # BLOCK_ROWS in the .cu: the widest block a launch takes
THREADS = 128


def gptq_block(block: torch.Tensor, hinv: torch.Tensor, scales: torch.Tensor, zero: torch.Tensor,
               maxq: torch.Tensor, codes: torch.Tensor, b0: int) -> torch.Tensor:
    """Quantize stored rows b0.. of block [P, N, width] (float32, contiguous) with hinv [K, K] (float32), scales
    [P, N], zero/maxq [P]: writes codes [P, K, N] (int32) rows b0..b0+width, returns the errors [P, N, width]."""
    options, n_out, width = block.shape
    k_in = hinv.shape[0]
    if width > BLOCK_ROWS or not block.is_contiguous() or not hinv.is_contiguous() or not codes.is_contiguous():
        raise ValueError("gptq_block takes contiguous blocks of at most 32 rows")
    errors = torch.empty_like(block)
    function = kernel(SOURCE, INSTANCES, "gptq_block", block.device)
    args = (block, hinv, scales.float().contiguous(), zero.float().contiguous(), maxq.float().contiguous(), codes,
            errors, options, n_out, k_in, b0, width)
    launch(function, (-(-options * n_out // THREADS), 1, 1), (THREADS, 1, 1), args, block.device)
    return errors


def refine_block(values: torch.Tensor, codes: torch.Tensor, gradient: torch.Tensor, hessian: torch.Tensor,
                 diagonal: torch.Tensor, row_scales: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor,
                 b0: int, width: int) -> torch.Tensor:
    """One block of coordinate descent (gptq.refine_codes) over stored rows b0..b0+width: updates values and codes
    [K, N], gradient [N, K] in place (all float32, contiguous); returns the changes [N, width]."""
    k_in, n_out = values.shape
    if width > BLOCK_ROWS or not all(t.is_contiguous() for t in (values, codes, gradient, hessian, row_scales)):
        raise ValueError("refine_block takes contiguous tensors and blocks of at most 32 rows")
    changes = torch.empty(n_out, width, device=values.device)
    function = kernel(SOURCE, INSTANCES, "refine_block", values.device)
    args = (values, codes, gradient, hessian, diagonal.contiguous(), row_scales, zero.reshape(-1).contiguous(),
            maxq.reshape(-1).contiguous(), changes, n_out, k_in, b0, width)
    launch(function, (-(-n_out // THREADS), 1, 1), (THREADS, 1, 1), args, values.device)
    return changes
