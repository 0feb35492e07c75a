"""`exlq infer`: generate text (streamed) or score candidate answers for one prompt."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from exlq.cli.common import CacheBitsOpt, CacheOpt, DeviceOpt, dtype_name, DtypeOpt, INFER_SAMPLING, JsonOpt, LayersOpt, ModelArg, load_model_and_tokenizer, option_name, print_json, split_list, stderr
from exlq.errors import ExlqError

SAMPLING = "Sampling"
PROMPT = "Prompt"


def infer(
    model_dir: ModelArg,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The user prompt.", rich_help_panel=PROMPT)] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help="Read the prompt from this file ('-' for stdin).", rich_help_panel=PROMPT)] = None,
    system: Annotated[Optional[str], typer.Option(help="System message.", rich_help_panel=PROMPT)] = None,
    prompt_format: Annotated[str, typer.Option("--format", help="auto (the model's chat template, else raw), chat_template, raw, llama2, llama3, chatml or mistral.", rich_help_panel=PROMPT)] = "auto",
    add_bos: Annotated[Optional[bool], typer.Option("--add-bos/--no-add-bos", help="Prepend the BOS token (default: what the format needs).", rich_help_panel=PROMPT)] = None,
    encode_special_tokens: Annotated[Optional[bool], typer.Option("--encode-special-tokens/--no-encode-special-tokens", help="Turn special-token text such as <|im_start|> in the prompt into special tokens (default: on for chat formats, off for raw).", rich_help_panel=PROMPT)] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Stop after this many new tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.", rich_help_panel=SAMPLING)] = INFER_SAMPLING["temperature"],
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = off).", rich_help_panel=SAMPLING)] = INFER_SAMPLING["top_k"],
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).", rich_help_panel=SAMPLING)] = INFER_SAMPLING["top_p"],
    min_p: Annotated[float, typer.Option(help="Drop tokens below min_p × the top probability (0 = off).", rich_help_panel=SAMPLING)] = INFER_SAMPLING["min_p"],
    repetition_penalty: Annotated[float, typer.Option(help="Penalize tokens already in the context (1 = off).", rich_help_panel=SAMPLING)] = 1.0,
    repetition_range: Annotated[int, typer.Option(help="How many recent tokens the penalty looks at (-1 = all).", rich_help_panel=SAMPLING)] = -1,
    seed: Annotated[Optional[int], typer.Option(help="Seed for reproducible sampling.", rich_help_panel=SAMPLING)] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Always take the most likely token (same as --temperature 0).", rich_help_panel=SAMPLING)] = False,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop when this text appears (repeatable); EOS always stops.")] = None,
    max_seq_len: Annotated[Optional[int], typer.Option(help="KV-cache length: prompt + answer must fit (default: the model's max_position_embeddings).")] = None,
    cache: CacheOpt = "fp16",
    cache_bits: CacheBitsOpt = None,
    score_choices: Annotated[Optional[str], typer.Option(help="Instead of generating, score these comma-separated continuations, each exactly as typed, spaces included (e.g. ' A, B, C, D' after 'Answer:').")] = None,
    choice_values: Annotated[Optional[str], typer.Option(help="Comma-separated numbers for the choices, for the expected value (default: numeric labels themselves, else 1..n).")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    layers: LayersOpt = None,
    draft: Annotated[Optional[Path], typer.Option("--draft", help="Draft model for speculative decoding (same tokenizer; e.g. a smaller model of the family). The output distribution stays the main model's.", show_default=False)] = None,
    draft_tokens: Annotated[int, typer.Option("--draft-tokens", help="Tokens the draft proposes per step at first (adapted to the acceptance rate, up to twice this).")] = 4,
    lora: Annotated[Optional[list[Path]], typer.Option("--lora", help="PEFT LoRA adapter folder (repeatable: several adapters at once).", show_default=False)] = None,
    lora_scale: Annotated[Optional[list[float]], typer.Option("--lora-scale", help="Scale of the adapters: one value for all, or one per --lora (default 1).", show_default=False)] = None,
    json_output: JsonOpt = False,
) -> None:
    """Generate a reply to a prompt, streaming the text to stdout.

    The prompt is formatted with the model's chat template by default (--format). Sampling
    defaults to temperature 0.8, top-p 0.95, min-p 0.05; --greedy for deterministic output.
    With --score-choices, prints the probability of each candidate continuation instead, and
    their probability-weighted value (e.g. a rating from labels A..J).

    Example: exlq infer MODEL -p "Write a haiku about GPUs" --max-new-tokens 64
    """
    from exlq.runtime.generator import Generator
    from exlq.runtime.kv_quant import parse_cache_type
    from exlq.runtime.lora import load_lora, set_loras
    from exlq.runtime.prompt_format import FORMATS, format_prompt, prompt_encoding, resolve_format, stop_strings_for
    from exlq.runtime.sampler import Sampler, SamplerSettings

    # Everything that can be checked without the model is checked before loading it.
    user_text = _read_prompt(prompt, prompt_file)
    if prompt_format not in FORMATS:
        raise ExlqError(f"unknown prompt format {prompt_format!r}; choose one of: {', '.join(FORMATS)}")
    if max_new_tokens < 1:
        raise ExlqError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    labels, values = _parse_choices(score_choices, choice_values)
    settings = SamplerSettings(
        temperature=0.0 if greedy else temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        repetition_range=repetition_range,
        seed=seed,
    )
    settings.validate(option_name)
    if not user_text and prompt_format == "raw" and not system:
        raise ExlqError("the prompt is empty: --format raw sends it as it is, and a model needs at least one token")
    if max_seq_len is not None and max_seq_len < 1:
        raise ExlqError(f"--max-seq-len must be positive (got {max_seq_len})")
    cache_type = parse_cache_type(cache, cache_bits)
    if draft is not None and score_choices:
        raise ExlqError("--draft speeds up generation; it does not apply to --score-choices")
    if draft_tokens < 1:
        raise ExlqError(f"--draft-tokens must be at least 1 (got {draft_tokens})")
    scales = _lora_scales(lora or [], lora_scale or [])
    adapters = [load_lora(path, scale) for path, scale in zip(lora or [], scales)]
    model, tokenizer = load_model_and_tokenizer(model_dir, device, dtype, layers)
    set_loras(model, adapters)
    fmt = resolve_format(prompt_format, tokenizer)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    prompt_text = format_prompt(messages, fmt, tokenizer)
    default_bos, default_special = prompt_encoding(fmt, tokenizer, prompt_text)
    prompt_ids = tokenizer.encode(
        prompt_text,
        add_bos=default_bos if add_bos is None else add_bos,
        encode_special_tokens=default_special if encode_special_tokens is None else encode_special_tokens,
    )
    if max_seq_len is not None and max_seq_len > model.config.max_position_embeddings:
        stderr.print(
            f"[yellow]warning: --max-seq-len {max_seq_len} is beyond the model's max_position_embeddings "
            f"({model.config.max_position_embeddings}); quality may drop past that[/yellow]"
        )
    generator = Generator(model, tokenizer, max_seq_len=max_seq_len, cache_type=cache_type)
    if draft is not None:
        from exlq.runtime.speculative import SpeculativeGenerator

        draft_model, draft_tokenizer = load_model_and_tokenizer(draft, device, dtype)
        generator = SpeculativeGenerator(
            generator, Generator(draft_model, draft_tokenizer, max_seq_len=generator.max_seq_len, cache_type=cache_type), draft_tokens=draft_tokens
        )
    common = {"model": str(model_dir), "format": fmt, "device": str(model.device), "dtype": dtype_name(model.dtype), "prompt_tokens": len(prompt_ids), "cache": cache_type.name}

    if labels:
        _score(generator, prompt_text, prompt_ids, labels, values, common, json_output)
        return

    out = sys.stderr if json_output else sys.stdout

    def show(text: str) -> None:
        out.write(text)
        out.flush()

    sampler = Sampler(settings)  # its seed (drawn when --seed is unset) is reported, so a sampled run can be replayed
    result = generator.generate(
        prompt_ids,
        sampler=sampler,
        max_new_tokens=max_new_tokens,
        stop_strings=[*stop_strings_for(fmt), *(stop or [])],
        on_text=show,
    )
    out.write("\n")
    stderr.print(
        f"[dim]{result.prompt_tokens} prompt tokens, {result.new_tokens} new; first token after "
        f"{result.time_to_first_token:.2f} s, {result.decode_tokens_per_second:.1f} tokens/s; stop: {result.stop_reason}"
        + (f"; draft accepted {result.draft_accepted}/{result.draft_proposed}" if draft else "")
        + (f"; {cache_type.name} KV cache" if cache_type.quantized else "")
        + ("" if settings.greedy else f"; seed {sampler.seed}") + "[/dim]"
    )
    if json_output:
        print_json(
            {
                **common,
                "text": result.text,
                "new_tokens": result.new_tokens,
                "stop_reason": result.stop_reason,
                "time_to_first_token_s": round(result.time_to_first_token, 4),
                "decode_tokens_per_second": round(result.decode_tokens_per_second, 2),
                "seed": None if settings.greedy else sampler.seed,
                **({"draft": str(draft), "draft_proposed": result.draft_proposed, "draft_accepted": result.draft_accepted} if draft else {}),
            }
        )


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise ExlqError("give exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt_file is None:
        return prompt
    if str(prompt_file) == "-":
        return sys.stdin.read()
    try:
        return prompt_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExlqError(f"cannot read --prompt-file {prompt_file}: {exc}") from None


def _parse_choices(score_choices: str | None, choice_values: str | None) -> tuple[list[str], list[float] | None]:
    """Labels and values of --score-choices/--choice-values (no labels: generate instead)."""
    if score_choices is None:
        if choice_values is not None:
            raise ExlqError("--choice-values needs --score-choices")
        return [], None
    labels = score_choices.split(",")  # each scored as typed: " 1" after "Answer:" is not "1"
    if not any(label.strip() for label in labels):
        raise ExlqError("--score-choices needs at least one comma-separated choice")
    if not all(label.strip() for label in labels):
        raise ExlqError(f"--score-choices has an empty choice (got {score_choices!r})")
    if choice_values is None:
        return labels, None
    try:
        values = [float(v) for v in split_list(choice_values)]
    except ValueError:
        raise ExlqError(f"--choice-values must be comma-separated numbers (got {choice_values!r})") from None
    if len(values) != len(labels):
        raise ExlqError(f"--choice-values has {len(values)} numbers for {len(labels)} choices")
    return labels, values


def _score(generator, prompt_text, prompt_ids, labels, values, common, json_output) -> None:
    choice_ids = [generator.continuation_ids(prompt_text, prompt_ids, label) for label in labels]
    scores = generator.score_choices(prompt_ids, choice_ids, labels=labels, values=values)
    if json_output:
        print_json(
            {
                **common,
                "choices": [
                    {"text": c.text, "token_ids": c.token_ids, "logprob": c.logprob, "probability": c.probability, "value": c.value}
                    for c in scores.choices
                ],
                "expected_value": scores.expected_value,
                "best": scores.best,
            }
        )
        return
    for c in scores.choices:
        sys.stdout.write(f"{c.text}\t{c.probability:.4f}\tlogprob {c.logprob:.4f}\n")
    sys.stdout.write(f"expected value: {scores.expected_value:.4f}\nbest: {scores.best}\n")


def _lora_scales(paths: list[Path], scales: list[float]) -> list[float]:
    """One scale per adapter: none given (1.0), one for all, or one each."""
    if not scales:
        return [1.0] * len(paths)
    if not paths:
        raise ExlqError("--lora-scale needs --lora")
    if len(scales) == 1:
        return scales * len(paths)
    if len(scales) != len(paths):
        raise ExlqError(f"give one --lora-scale for all adapters or one per --lora ({len(paths)}), not {len(scales)}")
    return scales
