"""KV-cache quantization kernels (`cuda/kv_quant.cu`): the GPU twins of `kv_quant.quantize_kv` / `dequantize_kv`.

Checked against the torch functions by the GPU tests
(`tests/test_kernels_gpu.py::test_kv_quant_kernels_match_torch`); `cache.QuantizedStore` uses them on a
kernel-enabled GPU when the cache groups are 32 wide (the default).
"""

from __future__ import annotations

import torch

from exlq.runtime.kernels import ACTIVATION_TAGS
from exlq.runtime.kernels.launch import kernel, launch

SOURCE = "kv_quant.cu"
BITS = (2, 3, 4, 5, 6, 7, 8)
INSTANCES = tuple(f"{name}<{b}>" for name in ("kv_quantize", "kv_dequantize") for b in BITS) + tuple(
    f"{name}<{tag}, {b}>" for name in ("kv_dequantize_into", "kv_quantize_at") for tag in ACTIVATION_TAGS.values() for b in BITS
)
GROUP = 32
WARPS = 8  # groups per block


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (D a multiple of 32) -> (uint8 codes [..., D·bits/8], fp16 scales [..., D/32]), as quantize_kv."""
    *lead, dim = x.shape
    flat = x.float().contiguous().view(-1)
    groups = flat.numel() // GROUP
    codes = torch.empty(*lead, dim * bits // 8, dtype=torch.uint8, device=x.device)
    scales = torch.empty(*lead, dim // GROUP, dtype=torch.float16, device=x.device)
    if groups:
        function = kernel(SOURCE, INSTANCES, f"kv_quantize<{bits}>", x.device)
        launch(function, (-(-groups // WARPS), 1, 1), (32 * WARPS, 1, 1), (flat, codes, scales, groups), x.device)
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `quantize`, as dequantize_kv: values [..., D] in `dtype`."""
    *lead, width = codes.shape
    dim = width * 8 // bits
    out = torch.empty(*lead, dim, dtype=torch.float32, device=codes.device)
    groups = out.numel() // GROUP
    if groups:
        function = kernel(SOURCE, INSTANCES, f"kv_dequantize<{bits}>", codes.device)
        launch(function, (-(-groups // WARPS), 1, 1), (32 * WARPS, 1, 1),
               (codes.contiguous(), scales.contiguous(), out, groups), codes.device)
    return out.to(dtype)


def dequantize_into(
    out: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    offset: torch.Tensor,
    divisor: torch.Tensor | None,
    bits: int,
    rows: int,
    start: int,
    end: int,
    dense: torch.Tensor | None = None,
) -> None:
    """Positions start..end-1 of the first `rows` batch rows, dequantized into `out` in its dtype (fp16/bf16).

    out [B, H, S, D], codes [B, H, S, D·bits/8] and scales [B, H, S, D/32] are one layer's whole
    buffers (contiguous); offset and divisor (the keys' channel scales, or None) are float32 [B, H, 1, D]:
    out = dequantize(codes, scales) / divisor + offset, as the torch path (cache.QuantizedStore.read) computes it.
    `dense` [B, H, P, D] (contiguous, out's dtype): the store's dense prefix, copied for positions below P.
    """
    _, heads, s_max, dim = out.shape
    length = end - start
    groups = rows * heads * length * (dim // GROUP)
    if groups <= 0:
        return
    tag = ACTIVATION_TAGS[out.dtype]
    function = kernel(SOURCE, INSTANCES, f"kv_dequantize_into<{tag}, {bits}>", out.device)
    prefix = 0 if dense is None else dense.shape[2]
    arguments = (codes, scales, offset.contiguous(), None if divisor is None else divisor.contiguous(), dense, out,
                 groups, dim // GROUP, length, start, s_max, prefix)  # fmt: skip
    launch(function, (-(-groups // WARPS), 1, 1), (32 * WARPS, 1, 1), arguments, out.device)


def quantize_at(
    x: torch.Tensor,
    offset: torch.Tensor,
    multiplier: torch.Tensor | None,
    positions: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
) -> None:
    """Quantize x [rows, H, T, D] (fp16/bf16) into one layer's cache buffers at `positions` [T] (int64, on the device).

    codes [B, H, S, D·bits/8] and scales [B, H, S, D/32] are the layer's whole buffers (contiguous); offset and
    multiplier (the keys' channel scales, or None) float32 [B, H, 1, D]. One kernel for what the torch steps
    `quantize((x - offset) · multiplier)` and two index_copy_ do, with bit-identical codes and scales.
    """
    rows, heads, tokens, dim = x.shape
    if x.stride(3) != 1:
        x = x.contiguous()
    groups = rows * heads * tokens * (dim // GROUP)
    if groups == 0:
        return
    function = kernel(SOURCE, INSTANCES, f"kv_quantize_at<{ACTIVATION_TAGS[x.dtype]}, {bits}>", x.device)
    arguments = (x, offset.contiguous(), None if multiplier is None else multiplier.contiguous(), positions, codes,
                 scales, groups, dim // GROUP, tokens, heads, x.stride(0), x.stride(1), x.stride(2), codes.shape[2])  # fmt: skip
    launch(function, (-(-groups // WARPS), 1, 1), (32 * WARPS, 1, 1), arguments, x.device)
