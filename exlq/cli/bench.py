"""`exlq bench`: decode and prefill speed, weight bandwidth and VRAM of a model, real or synthetic."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from exlq.cli.common import INFER_SAMPLING, CacheBitsOpt, CacheOpt, JsonOpt, print_json, stderr

MAX_BATCH = 32  # the EXL2 GEMV's row limit (exl2_ops.GEMV_MAX_ROWS): a step of more rows would time the prefill path


def bench(
    model_dir: Annotated[Optional[Path], typer.Argument(metavar="[MODEL]", help="Model directory (FP16 or EXL2); or use --synthetic.", show_default=False)] = None,
    synthetic: Annotated[Optional[str], typer.Option(help="Build a model of this shape with random weights instead: llama3-8b, llama3.2-1b, qwen2.5-7b, qwen2.5-1.5b, qwen2.5-0.5b, smollm2-135m.", show_default=False)] = None,
    bpw: Annotated[float, typer.Option(help="With --synthetic: EXL2 bits per weight of the decoder linears (2-8), or 16 for FP16.")] = 4.0,
    group_size: Annotated[int, typer.Option(help="With --synthetic: rows per group of the decoder linears, 32, 64 or 128 (real conversions choose 32 for many matrices, which costs the GEMV more).")] = 128,
    cache_tokens: Annotated[int, typer.Option("--max-seq-len", help="KV-cache length allocated for the decode test.")] = 4096,
    cache: CacheOpt = "fp16",
    cache_bits: CacheBitsOpt = None,
    new_tokens: Annotated[int, typer.Option(help="Decode steps timed.")] = 256,
    batch: Annotated[int, typer.Option(help=f"Sequences decoded together, 1 to {MAX_BATCH} (tokens/s counts all of them; the weights are read once a step).")] = 1,
    prefill: Annotated[str, typer.Option(help="Prefill lengths timed, comma separated.")] = "512,2048",
    sample: Annotated[bool, typer.Option("--sample", help="Decode with exlq infer's default sampling (temperature 0.8, top-p 0.95, min-p 0.05, on the GPU) instead of greedy: what its sampling costs a token.")] = False,
    device: Annotated[str, typer.Option(help="cuda or cuda:N.")] = "cuda",
    json_output: JsonOpt = False,
) -> None:
    """Decode tokens/s (batch 1, or --batch sequences at once), prefill tokens/s, achieved weight GB/s against the copy bandwidth, peak VRAM.

    The conventions are in `exlq/eval/speed.py`. --synthetic needs no weights: decoder linears get random
    EXL2 codes at --bpw (layout as the converter cuts it, groups of --group-size rows, lm_head at 6 bits,
    tied or not, as a conversion writes it).
    """
    import torch

    from exlq.errors import ExlqError
    from exlq.eval.speed import measure_speed
    from exlq.runtime.config import read_model_config
    from exlq.runtime.kv_quant import parse_cache_type
    from exlq.runtime.sampler import Sampler, SamplerSettings

    if (model_dir is None) == (synthetic is None):
        raise ExlqError("give a MODEL directory or --synthetic SHAPE (one of them)")
    cache_type = parse_cache_type(cache, cache_bits)
    if group_size not in (32, 64, 128):
        raise ExlqError(f"--group-size must be 32, 64 or 128, got {group_size}")
    if not 1 <= batch <= MAX_BATCH:
        raise ExlqError(f"--batch must be between 1 and {MAX_BATCH}, got {batch}")
    if synthetic is not None:  # a bad shape or bitrate is said before the missing GPU
        from exlq.quant.synthetic import check_bpw, synthetic_config

        synthetic_config(synthetic)
        check_bpw(bpw)
    else:
        read_model_config(model_dir)
    if not torch.cuda.is_available():
        raise ExlqError("exlq bench measures GPU speed and needs a CUDA GPU (none is visible)")
    target = torch.device(device)
    if target.type != "cuda":
        raise ExlqError(f"--device must be cuda or cuda:N, got {device!r}")
    lengths = [int(x) for x in prefill.split(",") if x.strip()]
    if any(n < 1 for n in lengths) or cache_tokens < 64 or new_tokens < 1:
        raise ExlqError("--prefill lengths and --new-tokens must be positive and --max-seq-len at least 64")
    with stderr.status("building the model", spinner="dots"):
        model = _synthetic_model(synthetic, bpw, target, group_size) if synthetic else _real_model(model_dir, target)
    stderr.print(f"[dim]timing on {torch.cuda.get_device_name(target)}[/dim]")
    report = measure_speed(model, cache_tokens=max(cache_tokens, max(lengths, default=0)), prefill_lengths=lengths,
                           new_tokens=new_tokens, cache_type=cache_type, batch=batch,
                           sampler=Sampler(SamplerSettings(**INFER_SAMPLING, seed=0)) if sample else None)  # fmt: skip
    payload = {"model": str(model_dir) if model_dir else f"synthetic:{synthetic}", "bpw": None if model_dir else bpw,
               "group_size": None if model_dir else group_size, **report.as_dict()}
    if json_output:
        print_json(payload)
        return
    print(f"{payload['model']} on {report.device} (kernels: {report.kernels})")
    print(f"decode (batch {batch}, {report.sampling}): {report.decode_tokens_per_second:.1f} tokens/s, weights {report.weight_bytes_per_token / 1e9:.3f} GB/token, "
          f"{report.decode_weight_gbps:.0f} GB/s = {100 * report.roofline_fraction:.1f}% of copy bandwidth {report.copy_bandwidth_gbps:.0f} GB/s")
    for n, tps in report.prefill_tokens_per_second.items():
        print(f"prefill {n}: {tps:.0f} tokens/s")
    print(f"peak VRAM: {report.peak_vram_gib:.2f} GiB ({report.cache} cache of {report.cache_tokens} tokens)")


def _synthetic_model(shape: str, bpw: float, device, group_size: int):
    import torch

    from exlq.quant.synthetic import SyntheticStore, synthetic_config
    from exlq.runtime.architectures.registry import model_class_for
    from exlq.runtime.config import config_from_dict

    raw = synthetic_config(shape)
    model_class = model_class_for(raw)
    store = SyntheticStore(raw, bpw, device, group_size=group_size)
    return model_class(config_from_dict(model_class.config_class, raw), store, dtype=torch.float16, device=device).eval()


def _real_model(model_dir: Path, device):
    from exlq.runtime.loader import load_model

    return load_model(model_dir, device=device, dtype="fp16")
