"""The `exlq` command: subcommand registry and the mapping of failures to exit codes.

Exit codes: 0 success; 2 bad usage or input (one line saying what is wrong and what to do);
1 internal failure (a bug: set EXLQ_DEBUG=1 for the traceback); 130 interrupted.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

from exlq import __version__
from exlq.cli.bench import bench
from exlq.cli.eval_humaneval import eval_humaneval
from exlq.cli.eval_ppl import eval_ppl
from exlq.cli.infer import infer
from exlq.cli.quantize import convert, measure
from exlq.errors import ExlqError

app = typer.Typer(
    name="exlq",
    help="Quantize LLMs to EXL2 and run them: convert, measure, infer, eval-ppl, eval-humaneval, bench.",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("infer")(infer)
app.command("eval-ppl")(eval_ppl)
app.command("eval-humaneval")(eval_humaneval)
app.command("measure")(measure)
app.command("convert")(convert)
app.command("bench")(bench)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"exlq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """exlq: quantize LLMs to the EXL2 format and run them (torch on CPU, CUDA on NVIDIA GPUs)."""


INTERRUPTED = 130
RESUMABLE = ("convert", "measure")


def _interrupted(args: list[str]) -> None:
    resumes = " (run the same command again to resume where it stopped)" if args and args[0] in RESUMABLE else ""
    _error(f"interrupted{resumes}", INTERRUPTED)


def _error(message: str, code: int) -> None:
    sys.stderr.write(f"exlq: error: {message}\n")
    sys.exit(code)


def _is_usage_error(exc: Exception) -> bool:
    """Click's UsageError, whether from click itself or the copy that newer typer vendors."""
    return any(cls.__name__ == "UsageError" for cls in type(exc).__mro__) and hasattr(exc, "format_message")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    args = sys.argv[1:] if argv is None else argv
    try:
        result = app(args=args, prog_name="exlq", standalone_mode=False)
    except ExlqError as exc:
        _error(str(exc), 2)
    except (KeyboardInterrupt, typer.Abort):
        _interrupted(args)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        if not _is_usage_error(exc):
            if os.environ.get("EXLQ_DEBUG"):
                traceback.print_exc()
            _error(f"internal error: {type(exc).__name__}: {exc} (set EXLQ_DEBUG=1 for the traceback)", 1)
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # typer has printed the help already
            sys.exit(0)
        where = f"exlq {ctx.info_name} --help" if ctx is not None and ctx.parent is not None else "exlq --help"
        _error(f"{exc.format_message()} (see '{where}')", 2)
    if result == INTERRUPTED:  # typer turns Ctrl-C inside a command into this return value
        _interrupted(args)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
