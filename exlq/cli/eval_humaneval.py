"""`exlq eval-humaneval`: pass@k on the 164 HumanEval problems, completions run in a sandbox."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from exlq.cli.common import CacheBitsOpt, DeviceOpt, dtype_name, DtypeOpt, JsonOpt, LayersOpt, ModelArg, load_model_and_tokenizer, option_name, print_json, stderr
from exlq.cli.progress import StepCounter, stage_progress

SAMPLING = "Sampling"
SANDBOX = "Scoring"


def eval_humaneval(
    model_dir: ModelArg,
    samples_per_task: Annotated[int, typer.Option(help="Completions per problem (n of pass@k; pass@10 needs at least 10).")] = 1,
    temperature: Annotated[float, typer.Option(help="0 = greedy. For pass@10 the usual setting is 0.8 with --top-p 0.95.", rich_help_panel=SAMPLING)] = 0.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = off).", rich_help_panel=SAMPLING)] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).", rich_help_panel=SAMPLING)] = 0.95,
    min_p: Annotated[float, typer.Option(help="Drop tokens below min_p × the top probability (0 = off).", rich_help_panel=SAMPLING)] = 0.0,
    seed: Annotated[Optional[int], typer.Option(help="Seed for reproducible sampling (same batch size needed).", rich_help_panel=SAMPLING)] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Stop a completion after this many tokens.")] = 512,
    prompt_format: Annotated[str, typer.Option("--format", help="raw (complete the code: base models), chat (the chat template, the answer pre-filled with the code) or auto (chat when the model has a chat template).")] = "auto",
    cache: Annotated[str, typer.Option("--cache", help="KV cache type: fp16 (the model's dtype) or a quantized one (q4, q6, q8) where the runtime has them.")] = "fp16",
    cache_bits: CacheBitsOpt = None,
    batch_size: Annotated[int, typer.Option(help="Completions generated together in one batch.")] = 8,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N problems (after --tasks).", show_default=False)] = None,
    tasks: Annotated[Optional[str], typer.Option(help="Problem numbers and ranges, e.g. 0-9,42.", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write every sample as a JSON line: task_id, sample, completion, passed, result, error.", show_default=False)] = None,
    timeout: Annotated[float, typer.Option(help="Wall-clock seconds each sample's tests may run.", rich_help_panel=SANDBOX)] = 10.0,
    workers: Annotated[Optional[int], typer.Option(help="Samples scored at once, each in its own sandboxed process (default: CPU cores, at most 8).", show_default=False, rich_help_panel=SANDBOX)] = None,
    max_seq_len: Annotated[Optional[int], typer.Option(help="Tokens a sample may reach, prompt + completion, padding in a batch not counted (default: longest prompt + --max-new-tokens, within the model's max_position_embeddings).", show_default=False)] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    layers: LayersOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """HumanEval pass@1 (and pass@10 with 10+ samples per problem) of a model.

    The model completes each function; a completion ends at EOS or at the first unindented line.
    Each one runs against the problem's tests in its own sandboxed process (time, memory, process
    and file limits, no network; see exlq/eval/sandbox.py). pass@k is the unbiased estimator of
    Chen et al. 2021. Defaults: greedy, one sample per problem.

    Example: exlq eval-humaneval MODEL --samples-per-task 10 --temperature 0.8 --top-p 0.95 -o samples.jsonl
    """
    from exlq.eval.humaneval import FORMATS, HumanEvalConfig, check_writable, default_workers, evaluate_humaneval, load_problems, select_problems, write_samples
    from exlq.eval.sandbox import SandboxLimits
    from exlq.errors import ExlqError
    from exlq.runtime.kv_quant import parse_cache_type
    from exlq.runtime.sampler import Sampler, SamplerSettings

    # Everything that can be checked without the model is checked before loading it.
    if prompt_format not in FORMATS:
        raise ExlqError(f"unknown --format {prompt_format!r}; choose one of: {', '.join(FORMATS)}")
    cache_type = parse_cache_type(cache, cache_bits)
    if output is not None:
        check_writable(output)
    config = HumanEvalConfig(
        format=prompt_format, samples_per_task=samples_per_task, max_new_tokens=max_new_tokens, batch_size=batch_size,
        max_seq_len=max_seq_len, cache_type=cache_type, limits=SandboxLimits(timeout=timeout),
        workers=default_workers() if workers is None else workers,
    )  # fmt: skip
    config.validate()
    settings = SamplerSettings(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    settings.validate(option_name)
    sampler = Sampler(settings)
    problems = select_problems(load_problems(), tasks, limit)
    if sampler.settings.greedy and samples_per_task > 1:
        stderr.print(f"[yellow]greedy decoding: the {samples_per_task} samples per problem will be identical[/yellow]")
    model, tokenizer = load_model_and_tokenizer(model_dir, device, dtype, layers)

    total = len(problems) * samples_per_task
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with stage_progress(*columns, transient=True) as progress:
        generating, scoring = StepCounter(progress, "generating", total), StepCounter(progress, "scoring   ", total)
        report = evaluate_humaneval(
            model, tokenizer, problems, config, sampler, on_generated=generating.advance, on_scored=scoring.advance,
        )  # fmt: skip
    if output is not None:
        write_samples(output, report.samples)

    outcomes = Counter(s.result.status for s in report.samples)
    stderr.print(
        f"[dim]{report.problems} problems × {samples_per_task} samples in {report.total_seconds:.1f} s; "
        f"generation {report.generation_seconds:.1f} s, {report.generation_tokens_per_second:.1f} tokens/s; "
        f"{outcomes['passed']} passed, {outcomes['failed']} failed, {outcomes['timeout']} timed out[/dim]"
    )
    if not json_output:
        for name, value in report.pass_at.items():
            print(f"{name}: {value:.4f}")
        return
    print_json(
        {
            "model": str(model_dir),
            "format": report.format,
            **{name: value for name, value in report.pass_at.items()},
            "problems": report.problems,
            "samples_per_task": samples_per_task,
            "samples": len(report.samples),
            "passed": report.passed,
            "outcomes": dict(outcomes),
            "stop_reasons": dict(Counter(s.stop_reason for s in report.samples)),
            "time_s": round(report.total_seconds, 3),
            "generation_s": round(report.generation_seconds, 3),
            "new_tokens": report.new_tokens,
            "generation_tokens_per_second": round(report.generation_tokens_per_second, 2),
            "settings": {
                "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p, "seed": sampler.seed,
                "max_new_tokens": max_new_tokens, "batch_size": batch_size, "cache": cache_type.name, "max_seq_len": max_seq_len,
                "timeout_s": timeout, "workers": config.workers, "tasks": tasks, "limit": limit,
            },  # fmt: skip
            "sandbox": sorted({h for s in report.samples for h in s.result.hardening}),  # OS-level layers in effect
            "device": str(model.device),
            "dtype": dtype_name(model.dtype),
            "output": str(output) if output is not None else None,
        }
    )
