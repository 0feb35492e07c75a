"""Options, output and model loading shared by the subcommands (parsing and printing only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

# Human-readable text and progress go to stderr; stdout carries results (text or --json).
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

ModelArg = Annotated[Path, typer.Argument(metavar="MODEL", help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json).", show_default=False)]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (first GPU, else CPU), cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Compute dtype: auto (fp16 on GPU, fp32 on CPU), fp16, bf16 or fp32.")]
LayersOpt = Annotated[Optional[str], typer.Option("--layers", help="Decoder layers to run, in order, e.g. 0-15,8-23,16-31 (repeats share weights; each position gets its own cache slot).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object with the results on stdout; human text goes to stderr.")]
CacheOpt = Annotated[str, typer.Option("--cache", help="KV cache: fp16 (unquantized, in the compute dtype), q8, q6 or q4 (Hadamard-rotated groups of 32, one fp16 scale each).")]
CacheBitsOpt = Annotated[Optional[str], typer.Option("--cache-bits", metavar="K,V", help="Quantize keys to K and values to V bits (2-8 each, e.g. 4,2); overrides --cache.", show_default=False)]

#: `exlq infer`'s sampling defaults (also what `exlq bench --sample` decodes with).
INFER_SAMPLING = {"temperature": 0.8, "top_k": 0, "top_p": 0.95, "min_p": 0.05}


def dtype_name(dtype) -> str:
    """torch.float16 -> "float16", for messages and JSON."""
    return str(dtype).removeprefix("torch.")


def print_json(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def load_model_and_tokenizer(model_dir: Path, device: str, dtype: str, layers: str | None = None):
    """Load a model directory for a command, with a status line on stderr; `layers`: a --layers list."""
    from exlq.runtime.layer_order import parse_layer_list
    from exlq.runtime.loader import load_model
    from exlq.runtime.tokenizer import Tokenizer

    order = None if layers is None else parse_layer_list(layers)  # the syntax, before the (slow) load
    with stderr.status(f"loading {model_dir}", spinner="dots"):
        model = load_model(model_dir, device=device, dtype=dtype)
        tokenizer = Tokenizer.from_dir(model_dir)
    if order is not None:
        model.set_layer_order(order)
    stderr.print(
        f"[dim]loaded {type(model).__name__} from {model_dir} on {model.device} "
        f"({dtype_name(model.dtype)})[/dim]"
    )
    return model, tokenizer


def option_name(field: str) -> str:
    """How an error names a setting the CLI took as an option: "--top-p " for the field top_p."""
    return f"--{field.replace('_', '-')} "


def split_list(value: str | None) -> list[str]:
    """'A,B, C' -> ['A', 'B', 'C'] (blank items dropped)."""
    return [item.strip() for item in value.split(",") if item.strip()] if value else []
