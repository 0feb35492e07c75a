"""`exlq eval-ppl`: perplexity of a model on a text (WikiText-2 test by default)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

from exlq.cli.common import CacheBitsOpt, CacheOpt, DeviceOpt, dtype_name, DtypeOpt, JsonOpt, LayersOpt, ModelArg, load_model_and_tokenizer, print_json, stderr
from exlq.cli.progress import StepCounter, stage_progress


def eval_ppl(
    model_dir: ModelArg,
    data: Annotated[str, typer.Option(help="'wikitext2' (the WikiText-2 test split from ../shared) or a .txt, .jsonl or .parquet file.")] = "wikitext2",
    text_field: Annotated[str, typer.Option(help="Field holding the text in .jsonl/.parquet rows (rows are joined with a blank line).")] = "text",
    rows: Annotated[Optional[int], typer.Option(help="Score the first ROWS non-overlapping windows (default: all that fit).")] = None,
    length: Annotated[int, typer.Option(help="Window length in tokens.")] = 2048,
    stride: Annotated[Optional[int], typer.Option(help="Sliding windows every STRIDE tokens over the whole text instead of non-overlapping ones.")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows run together (faster on GPUs, more memory).")] = 1,
    kl_ref: Annotated[Optional[Path], typer.Option("--kl-ref", help="Reference model (e.g. the FP16 original): also report the mean KL divergence KL(P_ref || P_model) per scored token and top-1 agreement.", show_default=False)] = None,
    token_by_token: Annotated[bool, typer.Option("--token-by-token", help="Run each window through the KV cache one token per step (a one-token prefill, then decode steps), so the cache's quantization shows in the perplexity. Slow.")] = False,
    chunk: Annotated[Optional[int], typer.Option("--chunk", help="With --token-by-token: N tokens per step instead of 1.", show_default=False)] = None,
    cache: CacheOpt = "fp16",
    cache_bits: CacheBitsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    layers: LayersOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Perplexity over token windows; the exact convention is printed with the result.

    Non-overlapping mode (default): windows of --length tokens, each scored alone, the first
    token of each not predicted ("5x1k" is --rows 5 --length 1024). Sliding mode (--stride S):
    every token after the first is scored once with up to length-S tokens of context.
    The text is tokenized with no BOS or other special tokens. Windows run in one forward pass
    with no KV cache, unless --token-by-token runs them through a cache (--cache q4 etc.).
    """
    import torch

    from exlq.data.text_sources import load_text
    from exlq.errors import ExlqError
    from exlq.eval.perplexity import check_chunk, check_window_options, evaluate_perplexity, nonoverlapping_windows, sliding_windows
    from exlq.runtime.config import read_model_config
    from exlq.runtime.kv_quant import parse_cache_type

    if rows is not None and stride is not None:
        raise ExlqError("--rows and --stride choose different modes: give one of them")
    if rows is not None and rows < 1:
        raise ExlqError(f"--rows must be at least 1 (got {rows})")
    if batch_size < 1:
        raise ExlqError(f"--batch-size must be at least 1 (got {batch_size})")
    check_window_options(length, stride)
    cache_type = parse_cache_type(cache, cache_bits)
    if chunk is not None and not token_by_token:
        raise ExlqError("--chunk sets the step of --token-by-token scoring: add --token-by-token")
    if cache_type.quantized and not token_by_token:
        raise ExlqError(
            f"--cache {cache_type.name} only changes scoring through the KV cache; full windows run without one: "
            "add --token-by-token"
        )
    check_chunk(chunk)
    step = (chunk or 1) if token_by_token else None
    source = load_text(data, text_field=text_field)
    if kl_ref is not None:  # a wrong path is said now, not after the model and the text are loaded
        try:
            read_model_config(kl_ref)
        except ExlqError as exc:
            raise ExlqError(f"--kl-ref: {exc}") from None
    model, tokenizer = load_model_and_tokenizer(model_dir, device, dtype, layers)
    reference = None
    if kl_ref is not None:
        reference, ref_tokenizer = load_model_and_tokenizer(kl_ref, device, dtype)
        if ref_tokenizer.vocab_size != tokenizer.vocab_size or reference.config.vocab_size != model.config.vocab_size:
            raise ExlqError(f"--kl-ref {kl_ref} has a different vocabulary than {model_dir}: KL needs the same tokens")
    with stderr.status("tokenizing", spinner="dots"):
        ids = torch.tensor(tokenizer.encode(source.text), dtype=torch.long)
    windows = sliding_windows(ids.numel(), length, stride) if stride else nonoverlapping_windows(ids.numel(), length, rows)
    if rows is not None and len(windows) < rows:
        stderr.print(f"[yellow]only {len(windows)} windows of {length} tokens fit the text (asked for {rows})[/yellow]")

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with stage_progress(*columns, transient=True) as report:
        scored = StepCounter(report, "scoring windows", len(windows))
        result = evaluate_perplexity(
            model, ids, length=length, rows=rows, stride=stride, batch_size=batch_size,
            on_window=scored.advance, reference=reference, chunk=step, cache_type=cache_type,
        )
    payload = {
        "model": str(model_dir),
        "data": source.description,
        "perplexity": result.perplexity,
        "mean_nll": result.mean_nll,
        "tokens_scored": result.tokens_scored,
        "windows": result.windows,
        "length": length,
        "stride": stride,
        "convention": result.convention,
        "mode": result.mode,
        "device": str(model.device),
        "dtype": dtype_name(model.dtype),
        "seconds": round(result.seconds, 3),
        "tokens_per_second": round(result.tokens_per_second, 1),
    }
    if token_by_token:
        cache_mb = result.cache_bytes_per_window / 1e6
        payload.update(chunk=step, cache=result.cache_type, cache_bytes_per_token=result.cache_bytes_per_token, cache_mb_per_window=round(cache_mb, 3))
    if layers is not None:
        payload["layer_order"] = model.layer_order
    if reference is not None:
        payload.update(kl_reference=str(kl_ref), kl_divergence=result.kl_divergence, top1_agreement=result.top1_agreement)
    if json_output:
        print_json(payload)
        return
    sys.stdout.write(f"perplexity {result.perplexity:.4f} over {result.tokens_scored} tokens ({result.windows} windows)\n")
    if token_by_token:
        sys.stdout.write(
            f"token-by-token through the {result.cache_type} KV cache ({step} token{'s' if step > 1 else ''} per step): {result.cache_bytes_per_token} "
            f"bytes per token, {cache_mb:.3f} MB per {length}-token window\n"
        )
    if reference is not None:
        sys.stdout.write(f"KL divergence vs {kl_ref}: {result.kl_divergence:.5f} per token; top-1 agreement {result.top1_agreement:.4f}\n")
    stderr.print(f"[dim]data: {source.description}\nconvention: {result.convention}\n{result.seconds:.1f} s, {result.tokens_per_second:.0f} tokens/s[/dim]")
