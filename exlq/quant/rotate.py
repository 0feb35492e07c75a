"""Incoherence processing folded into the weights: the same function, weights easier to quantize.

Pre-norm decoders are invariant to an orthogonal change of basis of the residual stream
(QuaRot/SliceGPT's observation). With every RMSNorm's gain folded into the linears that read it,
rotating the stream by an orthogonal Q gives a model that computes exactly the same outputs:

    embed ← E·Q        W_in ← W_in·diag(g)·Q  (q/k/v, gate/up, lm_head)      W_out ← Qᵀ·W_out  (o, down)

and, per attention head, values and the output projection may turn by one more orthogonal R
(attention mixes positions, never dimensions): W_v ← Rᵀ·W_v per head, W_o ← W_o·R per head.

Why it helps: the residual stream of an LLM carries a few huge outlier channels, so some input
channels of q/k/v/gate/up dominate their groups' scales and rows of o/down hold outliers. After a
random rotation every channel carries a mix of all of them, and the weights' rounding error is
spread evenly; the EXL2 format needs no change, since the rotation lives in the weights. The
norms become all-ones vectors and, for tied models, embedding and head are written separately.
"""

from __future__ import annotations

import torch

from exlq.errors import ExlqError
from exlq.quant.hessian import linear_modules
from exlq.runtime.model import DecoderOnlyLM

INPUT_SIDE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
READ_BY = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
OUTPUT_SIDE = ("self_attn.o_proj", "mlp.down_proj")
SEED = 0  # fixed, so a conversion is reproducible and a measurement matches its conversion


def rotation_for(rotate: bool) -> dict | None:
    """How a conversion rotates the model: rotate_model's keyword arguments, or None for no rotation."""
    return {"seed": SEED} if rotate else None


def apply_rotation(model: DecoderOnlyLM, rotation: dict | None) -> None:
    """Rotate `model` as `rotation` (from rotation_for) says; None leaves it as it is."""
    if rotation is not None:
        rotate_model(model, **rotation)


def check_rotation(measured: dict | None, wanted: dict | None) -> None:
    """A measurement's errors hold only for the model as rotated when it was measured."""
    if measured != wanted:
        made = "without rotation" if measured is None else f"with rotation {measured}"
        hint = "pass --no-rotate" if measured is None else "drop --no-rotate"
        raise ExlqError(f"the measurement was made {made}; measure again with the same options or {hint}")


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix [n, n] (float64), the same for a seed on every device."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None]


@torch.inference_mode()
def rotate_model(model: DecoderOnlyLM, seed: int = 0) -> None:
    """Fold the norms and rotate the residual stream and the value heads of `model`, in place.

    The model must hold dense weights (the quantizer's input). Computed in float64 and stored
    back in the model's dtype; afterwards `config.tie_word_embeddings` is False.
    """
    c = model.config
    device = model.device
    q = random_orthogonal(c.hidden_size, seed).to(device)
    r = random_orthogonal(c.head_dim, seed + 1).to(device)

    embed = model.model.embed_tokens.weight
    head = model.lm_head.weight
    untied_head = (head.double() * model.model.norm.weight.double()[None]) @ q
    embed.data = (embed.double() @ q).to(embed.dtype)
    model.lm_head.weight = torch.nn.Parameter(untied_head.to(head.dtype), requires_grad=False)
    _set_ones(model.model.norm.weight)
    c.tie_word_embeddings = False

    for layer in model.model.layers:
        linears = linear_modules(layer)
        for norm_name, readers in READ_BY.items():
            gain = getattr(layer, norm_name).weight.double()
            for name in readers:
                _update(linears[name], weight=lambda w, g=gain: (w * g[None]) @ q)
            _set_ones(getattr(layer, norm_name).weight)
        for name in OUTPUT_SIDE:
            _update(linears[name], weight=lambda w: q.T @ w, bias=lambda b: b @ q)
        _update(
            linears["self_attn.v_proj"],
            weight=lambda w: (r.T @ w.reshape(c.num_key_value_heads, c.head_dim, -1)).reshape(w.shape),
            bias=lambda b: (b.reshape(-1, c.head_dim) @ r).reshape(b.shape),
        )
        _update(
            linears["self_attn.o_proj"],
            weight=lambda w: (w.reshape(w.shape[0], c.num_attention_heads, c.head_dim) @ r).reshape(w.shape),
        )


def _update(module: torch.nn.Module, *, weight, bias=None) -> None:
    """Apply float64 transforms to a dense linear's weight (and bias) in place."""
    w = module.weight
    w.data = weight(w.double()).to(w.dtype).contiguous()
    if bias is not None and module.bias is not None:
        b = module.bias
        b.data = bias(b.double()).to(b.dtype).contiguous()


def _set_ones(weight: torch.Tensor) -> None:
    weight.data = torch.ones_like(weight)
