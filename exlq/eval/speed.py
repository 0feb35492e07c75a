"""Speed of a loaded model on a GPU: batch-1 decode, prefill, weight traffic against copy bandwidth, VRAM.

Conventions (also printed by `exlq bench`):
- copy bandwidth: a device-to-device `copy_` of 1 GiB, bytes read + bytes written per second;
- weight bytes per token: every decoder linear and lm_head as stored (packed EXL2 tensors or dense
  weights) plus one embedding row; achieved GB/s = weight bytes per token × decode tokens/s;
- decode: one token per step into a KV cache after a 32-token prompt, greedy (argmax on the GPU) or, with a
  sampler, drawn as `exlq infer` draws it (on the GPU, each token's sampling kernels between two steps), with one
  host read of each token as any generator that streams text makes, after the next step is queued (as
  `Generator.generate` does: the GPU does not wait for the host); the CUDA-graph path is used if enabled, and
  a first untimed pass over the same positions captures its graphs (steady state is measured). With a batch of
  B sequences each step makes B tokens (tokens/s counts all of them) and reads the weights once;
- prefill: one forward of L tokens into an empty cache, logits of the last position only;
- peak VRAM: torch's peak allocated bytes over the whole run (weights, cache, activations).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from exlq.runtime import kernels
from exlq.runtime.exl2 import Exl2Linear
from exlq.runtime.generator import TokenReader
from exlq.runtime.kernels import target
from exlq.runtime.kernels.launch import device_index
from exlq.runtime.kv_quant import as_cache_type
from exlq.runtime.linear import DenseLinear
from exlq.runtime.sampler import Sampler

PROMPT_TOKENS = 32


@dataclass
class SpeedReport:
    device: str
    weight_bytes_per_token: int
    decoder_bpw: float | None  # stored bits per weight over the EXL2 decoder linears (None: no EXL2 layer)
    copy_bandwidth_gbps: float
    decode_tokens_per_second: float
    decode_weight_gbps: float
    roofline_fraction: float  # achieved weight GB/s ÷ copy bandwidth
    prefill_tokens_per_second: dict[int, float] = field(default_factory=dict)
    peak_vram_gib: float = 0.0
    cache_tokens: int = 0
    cache: str = "fp16"  # KV-cache type of the decode test
    batch: int = 1  # sequences decoded together (decode tokens/s counts all of them)
    sampling: str = "greedy"  # how the decode test picks tokens
    kernels: str = ""  # what the CUDA kernels are built for ("sm_90"; EXLQ_ARCH: "compute_80 on sm_90"), or "off"

    def as_dict(self) -> dict:
        return asdict(self)


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every linear once (shared repeats counted per use)."""
    total = 0
    for slot_layer in model.layer_order:
        layer = model.model.layers[slot_layer]
        total += sum(_linear_bytes(m) for m in layer.modules() if isinstance(m, (Exl2Linear, DenseLinear)))
    total += _linear_bytes(model.lm_head)
    embed = model.model.embed_tokens.weight
    return total + embed.shape[1] * embed.element_size()


def decoder_bits_per_weight(model) -> float | None:
    """Average stored bpw of the EXL2 decoder linears, weighted by size (spec §13 accounting)."""
    layers = [m for m in model.model.layers.modules() if isinstance(m, Exl2Linear)]
    if not layers:
        return None
    bits = sum(m.tensors.total_bits() for m in layers)
    return bits / sum(m.q_invperm.numel() * m.q_weight.shape[1] for m in layers)


def _linear_bytes(module) -> int:
    if isinstance(module, Exl2Linear):
        return module.tensors.total_bits() // 8
    if isinstance(module, DenseLinear):
        return module.weight.numel() * module.weight.element_size()
    return sum(p.numel() * p.element_size() for p in module.parameters())


def copy_bandwidth(device: torch.device, size_bytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write)."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = _timed(device, lambda: dst.copy_(src), repeats)
    del src, dst
    return 2 * size_bytes / seconds / 1e9


def _timed(device: torch.device, fn, repeats: int) -> float:
    """Mean seconds per call of `fn` on the GPU, after one warm-up call."""
    fn()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def decode_speed(model, cache_tokens: int, new_tokens: int = 256, cache_type=None, batch: int = 1,
                 sampler: Sampler | None = None) -> float:
    """Decode tokens/s of `batch` sequences after a short prompt (one host sync per step), drawn by `sampler`
    (default: greedy, the argmax kernel); `cache_type` as new_cache takes it."""
    sampler = sampler or Sampler()
    device = model.device
    cache = model.new_cache(cache_tokens, batch_size=batch, cache_type=cache_type)
    prompt = torch.randint(0, model.config.vocab_size, (batch, PROMPT_TOKENS), device=device)
    steps = min(new_tokens, cache_tokens - PROMPT_TOKENS - 8)

    def next_tokens(ids: torch.Tensor) -> torch.Tensor:  # [batch, 1]
        return sampler.sample(model(ids, cache, max_output_len=1)[:, -1])[:, None]

    reader = TokenReader(device)

    def run(count: int) -> None:
        cache.reset()
        token = next_tokens(prompt)
        for _ in range(count):
            reader.start(token)  # what a streaming generator does each step: read the token, the next step queued
            following = next_tokens(token)
            reader.value()
            token = following
        reader.start(token)
        reader.value()

    run(steps)  # warm-up over the same positions: kernels loaded, every attention-span graph captured
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    run(steps)
    torch.cuda.synchronize(device)
    prefill_start = time.perf_counter()
    cache.reset()
    model(prompt, cache)
    torch.cuda.synchronize(device)
    prefill_seconds = time.perf_counter() - prefill_start
    return batch * steps / (prefill_start - start - prefill_seconds)


def prefill_call(model, length: int) -> Callable[[], None]:
    """One forward over `length` random tokens into an emptied cache, as a call to time (prefill_speed,
    bench/prefill_spread.py)."""
    cache = model.new_cache(length)
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=model.device)

    def run() -> None:
        cache.reset()
        model(ids, cache)

    return run


def prefill_speed(model, length: int, repeats: int = 3) -> float:
    """Tokens/s of one forward over `length` tokens into an empty cache."""
    return length / _timed(model.device, prefill_call(model, length), repeats)


def measure_speed(
    model, *, cache_tokens: int = 4096, prefill_lengths=(512, 2048), new_tokens: int = 256, cache_type=None,
    batch: int = 1, sampler: Sampler | None = None,
) -> SpeedReport:
    """Decode (`batch` sequences through a cache of `cache_type`, default fp16; greedy, or drawn by `sampler`) and
    prefill speed, bandwidth and peak VRAM."""
    device = model.device
    bandwidth = copy_bandwidth(device)
    torch.cuda.reset_peak_memory_stats(device)  # after the copy buffers are gone: weights stay counted
    weight_bytes = weight_bytes_per_token(model)
    sampler = sampler or Sampler()
    decode = decode_speed(model, cache_tokens, new_tokens, cache_type, batch, sampler)
    prefill = {n: prefill_speed(model, n) for n in prefill_lengths}
    weight_gbps = weight_bytes * decode / batch / 1e9  # one read of the weights per step
    return SpeedReport(
        device=torch.cuda.get_device_name(device),
        weight_bytes_per_token=weight_bytes,
        decoder_bpw=decoder_bits_per_weight(model),
        copy_bandwidth_gbps=bandwidth,
        decode_tokens_per_second=decode,
        decode_weight_gbps=weight_gbps,
        roofline_fraction=weight_gbps / bandwidth,
        prefill_tokens_per_second=prefill,
        peak_vram_gib=torch.cuda.max_memory_allocated(device) / 2**30,
        cache_tokens=cache_tokens,
        cache=as_cache_type(cache_type).name,
        batch=batch,
        sampling=sampler.settings.describe(),
        kernels=kernel_target(device),
    )


def kernel_target(device: torch.device) -> str:
    """What the decode ran on: the kernels' architecture (an EXLQ_ARCH stand-in says so), or "off" (torch path)."""
    return target.describe(device_index(device)) if kernels.enabled(device) else "off"
