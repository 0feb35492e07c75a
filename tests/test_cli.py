"""The `exlq` command line: help, infer (generation and choice scoring), eval-ppl, and bad input.

A few tests run the CLI in a real subprocess (exit codes and stdout/stderr separation as a shell
sees them); the many bad-input cases call `exlq.cli.app.main` in-process, which goes through the
same error mapping (ExlqError and usage errors -> exit 2 with one `exlq: error:` line).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_datasets, write_jsonl
import torch

import exlq
from exlq.cli.app import main
from exlq.runtime.generator import Generator
from exlq.runtime.loader import load_model
from exlq.runtime.sampler import SamplerSettings
from exlq.runtime.tokenizer import Tokenizer
from tiny_models import _TRAINING_TEXT

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The quick brown fox"
STOP_REASONS = {"eos", "max_new_tokens", "stop_string"}
LONG_TEXT = "\n".join(_TRAINING_TEXT * 3)  # a few hundred tiny-tokenizer tokens
SEEDED_OPTIONS = ("--temperature", 1, "--seed", 5, "--max-new-tokens", 16, "--json", "--format", "raw")


# --- helpers ----------------------------------------------------------------------------------------


def _cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "EXLQ_DEBUG"}
    # a wide console (no wrapped status lines); datasets' arrow cache kept out of the user's home
    env.update(COLUMNS="200", PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(tmp_path / "hf_datasets_cache"))
    return env


def on_cpu(args) -> list[str]:
    """Model commands run on the CPU reference path (the tests compare with fp32 CPU results),
    unless a test asks for a device itself; `auto` would pick a GPU where there is one."""
    args = [str(a) for a in args]
    if args and args[0] in ("infer", "eval-ppl") and "--device" not in args and "--help" not in args:
        args += ["--device", "cpu"]
    return args


def run_cli(args, tmp_path: Path, input: str | None = None) -> subprocess.CompletedProcess:
    """`python -m exlq.cli.app ARGS` in a subprocess, stdout and stderr captured apart."""
    return subprocess.run(
        [sys.executable, "-m", "exlq.cli.app", *on_cpu(args)],
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=_cli_env(tmp_path),
        cwd=str(REPO),
        timeout=180,
    )


def cli(capsys, *args) -> tuple[int, str, str]:
    """`exlq ARGS` in-process: (exit code, stdout, stderr). main() always ends in SystemExit."""
    capsys.readouterr()  # drop anything printed before
    with pytest.raises(SystemExit) as exc_info:
        main(on_cpu(args))
    out, err = capsys.readouterr()
    code = exc_info.value.code
    return (0 if code is None else code), out, err


def assert_usage_error(code: int, out: str, err: str, *needles: str, after_load: bool = False) -> str:
    """Exit 2, nothing on stdout, and a single one-line `exlq: error: ...` naming the problem.

    Errors found before the model is loaded leave stderr as exactly that line. Errors found after it
    (they need the tokenizer or the model) follow the "loaded ..." status line that every command
    prints to stderr by design (human text and progress go to stderr); the error is then the last line.
    """
    assert code == 2, (code, out, err)
    assert out == "", out
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    message = lines[-1]
    assert message.startswith("exlq: error: ") and len(message) > len("exlq: error: ") + 5, err
    assert err.endswith(message + "\n"), err  # the error is one line and the last thing written
    assert sum("exlq: error" in line for line in lines) == 1, err
    assert "Traceback" not in err, err
    if after_load:
        assert all(not line.startswith("exlq: error") for line in lines[:-1])
        assert "loaded" in lines[0], err
    else:
        assert lines == [message], f"expected only the error line on stderr, got: {err!r}"
    for needle in needles:
        assert needle.lower() in message.lower(), (needle, message)
    return message


def parse_one_json(out: str) -> dict:
    """stdout must be exactly one JSON object (and nothing else)."""
    payload = json.loads(out)  # fails on any extra text
    assert isinstance(payload, dict)
    return payload


@pytest.fixture(scope="module")
def api(tiny_llama_dir):
    """The Python API on the same tiny model: the reference the CLI's numbers are checked against."""
    model = load_model(tiny_llama_dir, device="cpu", dtype="fp32")
    tokenizer = Tokenizer.from_dir(tiny_llama_dir)
    return model, tokenizer


def raw_prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """How `infer --format raw` tokenizes a prompt: the tokenizer's default BOS, special-token text kept plain."""
    return tokenizer.encode(text, add_bos=tokenizer.add_bos_default, encode_special_tokens=False)


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] of one cache-less forward over `ids`, every position."""
    return model(torch.tensor([ids]), None, max_output_len=None)[0].float()


@pytest.fixture(scope="module")
def broken_model_dirs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny model, each broken in one way a user might meet."""
    import shutil

    root = tmp_path_factory.mktemp("broken-models")
    dirs = {}
    for name in ("truncated", "gpt2", "badjson", "noconfig"):
        dirs[name] = Path(shutil.copytree(tiny_llama_dir, root / name))
    weights = dirs["truncated"] / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    config_path = dirs["gpt2"] / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    config_path.write_text(json.dumps(config))
    (dirs["badjson"] / "config.json").write_text("{this is not: json,")
    (dirs["noconfig"] / "config.json").unlink()
    return dirs


@pytest.fixture(scope="module")
def long_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ppl") / "text.txt"
    path.write_text(LONG_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def real_runs(tiny_llama_dir, long_text_file, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """The subprocess runs of this file, started together (each spends ~2-4 s importing torch)."""
    tmp = tmp_path_factory.mktemp("cli-subprocess")
    commands = {
        "help": (["--help"], None),
        "infer_json": (["infer", tiny_llama_dir, "-p", PROMPT, "--greedy", "--max-new-tokens", 8, "--json", "--format", "raw"], None),
        "infer_stdin": (["infer", tiny_llama_dir, "--prompt-file", "-", *SEEDED_OPTIONS], PROMPT),
        "eval_ppl": (["eval-ppl", tiny_llama_dir, "--data", long_text_file, "--rows", 2, "--length", 32, "--json"], None),
        "missing_model": (["infer", tmp / "no-such-model", "-p", "hi"], None),
    }
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: CI boxes are small
        futures = {name: pool.submit(run_cli, args, tmp, input) for name, (args, input) in commands.items()}
        results = {name: future.result() for name, future in futures.items()}
    results["missing_model_path"] = tmp / "no-such-model"
    return results


# --- help and version -------------------------------------------------------------------------------


def test_root_help_and_version(real_runs, capsys):
    result = real_runs["help"]
    assert result.returncode == 0, result.stderr
    assert "infer" in result.stdout and "eval-ppl" in result.stdout and "--version" in result.stdout
    assert result.stderr == ""

    code, out, err = cli(capsys, "--version")
    assert (code, out, err) == (0, f"exlq {exlq.__version__}\n", "")


def test_no_arguments_prints_help(capsys):
    code, out, err = cli(capsys)
    assert code == 0 and "infer" in out and "eval-ppl" in out and err == ""


@pytest.mark.parametrize(
    "command, options",
    [
        ("infer", ["--prompt", "--prompt-file", "--format", "--greedy", "--temperature", "--top-p", "--seed",
                   "--max-new-tokens", "--max-seq-len", "--score-choices", "--choice-values", "--json", "--device", "--dtype"]),
        ("eval-ppl", ["--data", "--text-field", "--rows", "--length", "--stride", "--json", "--device", "--dtype"]),
    ],
)
def test_subcommand_help(capsys, command, options):
    code, out, err = cli(capsys, command, "--help")
    assert code == 0, err
    assert "MODEL" in out
    for option in options:
        assert option in out, option


# --- infer: generation ------------------------------------------------------------------------------


def test_infer_json_greedy_subprocess_matches_python_api(real_runs, api):
    result = real_runs["infer_json"]  # infer MODEL -p PROMPT --greedy --max-new-tokens 8 --json --format raw
    assert result.returncode == 0, result.stderr
    payload = parse_one_json(result.stdout)
    for key in ("text", "prompt_tokens", "new_tokens", "stop_reason", "time_to_first_token_s", "decode_tokens_per_second"):
        assert key in payload, key
    assert payload["format"] == "raw" and payload["device"] == "cpu" and payload["dtype"] == "float32"
    assert 1 <= payload["new_tokens"] <= 8 or (payload["new_tokens"] == 0 and payload["stop_reason"] == "eos")
    assert payload["stop_reason"] in STOP_REASONS
    assert payload["time_to_first_token_s"] >= 0 and payload["decode_tokens_per_second"] >= 0
    # In --json mode the streamed text goes to stderr, stdout carries only the JSON.
    assert payload["text"] in result.stderr
    assert "loaded" in result.stderr

    model, tokenizer = api
    prompt_ids = raw_prompt_ids(tokenizer, PROMPT)
    assert payload["prompt_tokens"] == len(prompt_ids)
    reference = Generator(model, tokenizer).generate(
        prompt_ids, sampler=SamplerSettings(temperature=0), max_new_tokens=8
    )
    assert payload["text"] == reference.text
    assert payload["new_tokens"] == reference.new_tokens
    assert payload["stop_reason"] == reference.stop_reason


def test_infer_plain_output_goes_to_stdout(capsys, tiny_llama_dir):
    code, out, err = cli(capsys, "infer", tiny_llama_dir, "-p", PROMPT, "--greedy", "--max-new-tokens", 8, "--format", "raw")
    assert code == 0, err
    code, json_out, _ = cli(capsys, "infer", tiny_llama_dir, "-p", PROMPT, "--greedy", "--max-new-tokens", 8, "--format", "raw", "--json")
    assert code == 0
    text = parse_one_json(json_out)["text"]
    assert out == text + "\n"  # the streamed reply, then a newline; nothing else on stdout
    assert "prompt tokens" in err and "new" in err  # the stats line goes to stderr


def test_infer_greedy_is_deterministic(capsys, tiny_llama_dir):
    args = ("infer", tiny_llama_dir, "-p", "Paris is the capital of", "--greedy", "--max-new-tokens", 12, "--json")
    runs = []
    for _ in range(2):
        code, out, err = cli(capsys, *args)
        assert code == 0, err
        runs.append(parse_one_json(out))
    assert runs[0]["text"] == runs[1]["text"] and runs[0]["new_tokens"] == runs[1]["new_tokens"]
    assert runs[0]["format"] == "chat_template"  # the tiny tokenizer has a chat template: auto picks it


def test_infer_seeded_sampling_is_reproducible_including_stdin_prompt(capsys, tiny_llama_dir, real_runs):
    runs = []
    for _ in range(2):
        code, out, err = cli(capsys, "infer", tiny_llama_dir, "-p", PROMPT, *SEEDED_OPTIONS)
        assert code == 0, err
        runs.append(parse_one_json(out))
    assert runs[0]["text"] == runs[1]["text"]
    assert runs[0]["seed"] == 5
    # Unseeded, the seed drawn is reported, and --seed with it replays the run.
    unseeded = [o for o in SEEDED_OPTIONS if o not in ("--seed", 5)]
    code, out, err = cli(capsys, "infer", tiny_llama_dir, "-p", PROMPT, *unseeded)
    assert code == 0, err
    drawn = parse_one_json(out)
    assert isinstance(drawn["seed"], int) and f"seed {drawn['seed']}" in err
    code, out, err = cli(capsys, "infer", tiny_llama_dir, "-p", PROMPT, *unseeded, "--seed", drawn["seed"])
    assert code == 0, err
    assert parse_one_json(out)["text"] == drawn["text"]
    # A real process reading the prompt from stdin samples the same tokens.
    result = real_runs["infer_stdin"]  # infer MODEL --prompt-file - SEEDED_OPTIONS, PROMPT on stdin
    assert result.returncode == 0, result.stderr
    assert parse_one_json(result.stdout)["text"] == runs[0]["text"]


def test_infer_stops_at_max_seq_len(capsys, tiny_llama_dir):
    code, out, err = cli(
        capsys, "infer", tiny_llama_dir, "-p", PROMPT, "--format", "raw",
        "--max-seq-len", 24, "--max-new-tokens", 100, "--greedy", "--json",
    )
    assert code == 0, err
    payload = parse_one_json(out)
    prompt_tokens = payload["prompt_tokens"]
    assert prompt_tokens < 24
    assert payload["new_tokens"] <= 24 - prompt_tokens + 1
    # The tiny model does not write EOS within 24 tokens of this prompt, so the cache fills up: it holds
    # the prompt and every new token but the last (sampled, never run through the model).
    assert payload["stop_reason"] == "max_seq_len", payload
    assert payload["new_tokens"] == 24 - prompt_tokens + 1


def test_infer_stop_string(capsys, tiny_llama_dir):
    base = ("infer", tiny_llama_dir, "-p", PROMPT, "--format", "raw", "--greedy", "--max-new-tokens", 20, "--json")
    code, out, err = cli(capsys, *base)
    assert code == 0, err
    full = parse_one_json(out)["text"]
    stop = next((full[i : i + 2] for i in range(1, len(full) - 1) if full[i : i + 2].isascii() and full[i : i + 2].strip()), None)
    if stop is None:
        pytest.skip(f"no usable stop string in the tiny model's reply {full!r}")
    code, out, err = cli(capsys, *base, "--stop", stop)
    assert code == 0, err
    payload = parse_one_json(out)
    assert payload["stop_reason"] == "stop_string"
    assert payload["text"] == full[: full.index(stop)]  # cut before the stop string, which is not shown


def test_internal_failure_exits_1_with_one_line(capsys, monkeypatch, tiny_llama_dir):
    from exlq.runtime import generator

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.delenv("EXLQ_DEBUG", raising=False)
    monkeypatch.setattr(generator.Generator, "generate", boom)
    code, out, err = cli(capsys, "infer", tiny_llama_dir, "-p", "hi", "--format", "raw")
    assert code == 1 and out == ""
    last = err.splitlines()[-1]
    assert last.startswith("exlq: error: internal error: RuntimeError: boom") and "EXLQ_DEBUG=1" in last
    assert "Traceback" not in err


# --- infer: choice scoring --------------------------------------------------------------------------


@pytest.mark.parametrize("choice_values, expected_values", [(None, [1.0, 2.0, 3.0]), ("10,20,30", [10.0, 20.0, 30.0])])
def test_score_choices(capsys, tiny_llama_dir, api, choice_values, expected_values):
    prompt = "Answer:"
    args = ["infer", tiny_llama_dir, "-p", prompt, "--format", "raw", "--score-choices", "a,b,c", "--json"]
    if choice_values is not None:
        args += ["--choice-values", choice_values]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    payload = parse_one_json(out)
    choices = payload["choices"]
    assert [c["text"] for c in choices] == ["a", "b", "c"]
    assert [c["value"] for c in choices] == expected_values
    assert math.isclose(sum(c["probability"] for c in choices), 1.0, abs_tol=1e-9)
    expected = sum(c["probability"] * v for c, v in zip(choices, expected_values))
    assert math.isclose(payload["expected_value"], expected, rel_tol=1e-9)
    assert payload["best"] == max(choices, key=lambda c: c["logprob"])["text"]

    # Each logprob against a cache-less full forward of the model.
    model, tokenizer = api
    prompt_ids = raw_prompt_ids(tokenizer, prompt)
    assert payload["prompt_tokens"] == len(prompt_ids)
    last = torch.log_softmax(full_logits(model, prompt_ids)[-1], dim=-1)
    for c in choices:
        ids = c["token_ids"]
        assert ids and tokenizer.decode(ids).strip() == c["text"]
        if len(ids) == 1:
            reference = float(last[ids[0]])
        else:
            logprobs = torch.log_softmax(full_logits(model, prompt_ids + ids), dim=-1)
            positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(ids) - 1)
            reference = sum(float(logprobs[p, t]) for p, t in zip(positions, ids))
        assert c["logprob"] == pytest.approx(reference, abs=1e-4)
    # probabilities are the softmax of the logprobs over the candidate set
    norm = math.log(sum(math.exp(c["logprob"]) for c in choices))
    for c in choices:
        assert c["probability"] == pytest.approx(math.exp(c["logprob"] - norm), rel=1e-6)


def test_score_choices_are_scored_as_typed(capsys, tiny_llama_dir, api):
    """' 1, 2' scores " 1" and " 2" after the prompt (README's example), not "1" and "2": the spaces are the user's."""
    _, tokenizer = api
    prompt = "Rate it:"
    results = {}
    for choices in (" 1, 2", "1,2"):
        code, out, err = cli(capsys, "infer", tiny_llama_dir, "-p", prompt, "--format", "raw", "--score-choices", choices,
                             "--json")
        assert code == 0, err
        results[choices] = parse_one_json(out)["choices"]
    plain_prompt = tokenizer.encode(prompt, encode_special_tokens=True)
    for choices, texts in ((" 1, 2", [" 1", " 2"]), ("1,2", ["1", "2"])):
        assert [c["text"] for c in results[choices]] == texts
        for c, text in zip(results[choices], texts):
            assert c["token_ids"] == tokenizer.encode(prompt + text, encode_special_tokens=True)[len(plain_prompt):]
    assert [c["token_ids"] for c in results[" 1, 2"]] != [c["token_ids"] for c in results["1,2"]]
    assert [c["value"] for c in results[" 1, 2"]] == [1.0, 2.0]


def test_score_choices_numeric_labels_and_plain_output(capsys, tiny_llama_dir):
    code, out, err = cli(capsys, "infer", tiny_llama_dir, "-p", "Rate it:", "--format", "raw", "--score-choices", "2,4,8", "--json")
    assert code == 0, err
    payload = parse_one_json(out)
    assert [c["value"] for c in payload["choices"]] == [2.0, 4.0, 8.0]  # numeric labels value themselves
    assert math.isclose(payload["expected_value"], sum(c["probability"] * c["value"] for c in payload["choices"]))

    code, out, err = cli(capsys, "infer", tiny_llama_dir, "-p", "Rate it:", "--format", "raw", "--score-choices", "2,4,8")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines[:3]] == ["2", "4", "8"]
    assert lines[3].startswith("expected value: ") and lines[4] == f"best: {payload['best']}"


# --- eval-ppl ---------------------------------------------------------------------------------------


def test_eval_ppl_nonoverlapping_subprocess(real_runs, api):
    result = real_runs["eval_ppl"]  # eval-ppl MODEL --data long_text_file --rows 2 --length 32 --json
    assert result.returncode == 0, result.stderr
    payload = parse_one_json(result.stdout)
    assert payload["tokens_scored"] == 2 * 31
    assert payload["windows"] == 2 and payload["length"] == 32 and payload["stride"] is None
    assert isinstance(payload["convention"], str) and "non-overlapping" in payload["convention"]
    assert math.isfinite(payload["perplexity"]) and payload["perplexity"] > 1
    assert math.isclose(payload["perplexity"], math.exp(payload["mean_nll"]), rel_tol=1e-9)

    # The same perplexity from cache-less forwards of the two windows.
    model, tokenizer = api
    ids = tokenizer.encode(LONG_TEXT)
    assert len(ids) >= 64
    nll = 0.0
    for w in range(2):
        window = ids[w * 32 : (w + 1) * 32]
        logprobs = torch.log_softmax(full_logits(model, window), dim=-1)
        nll -= sum(float(logprobs[j, window[j + 1]]) for j in range(31))
    assert payload["perplexity"] == pytest.approx(math.exp(nll / 62), rel=1e-4)


def test_eval_ppl_sliding_scores_every_token_but_the_first(capsys, tiny_llama_dir, long_text_file, api):
    code, out, err = cli(capsys, "eval-ppl", tiny_llama_dir, "--data", long_text_file, "--stride", 16, "--length", 32, "--json")
    assert code == 0, err
    payload = parse_one_json(out)
    n_tokens = len(api[1].encode(long_text_file.read_text(encoding="utf-8")))
    assert payload["tokens_scored"] == n_tokens - 1
    assert payload["stride"] == 16 and "sliding" in payload["convention"]
    assert math.isfinite(payload["perplexity"])


def test_eval_ppl_plain_output(capsys, tiny_llama_dir, long_text_file):
    code, out, err = cli(capsys, "eval-ppl", tiny_llama_dir, "--data", long_text_file, "--rows", 1, "--length", 16)
    assert code == 0, err
    assert out.startswith("perplexity ") and "over 15 tokens (1 windows)" in out and len(out.splitlines()) == 1
    assert "convention" in err


def test_eval_ppl_batching_does_not_change_the_result(capsys, tiny_llama_dir, long_text_file):
    results = {}
    for mode in (("--stride", 16), ("--rows", 5)):
        for batch_size in (1, 3):
            code, out, err = cli(capsys, "eval-ppl", tiny_llama_dir, "--data", long_text_file, "--length", 32, *mode, "--batch-size", batch_size, "--json")
            assert code == 0, err
            results[mode[0], batch_size] = parse_one_json(out)
        one, three = results[mode[0], 1], results[mode[0], 3]
        assert one["tokens_scored"] == three["tokens_scored"] and one["windows"] == three["windows"]
        assert three["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
    assert results["--rows", 1]["tokens_scored"] == 5 * 31


def test_eval_ppl_more_rows_than_fit_warns(capsys, tiny_llama_dir, long_text_file, api):
    code, out, err = cli(capsys, "eval-ppl", tiny_llama_dir, "--data", long_text_file, "--rows", 10_000, "--length", 128, "--json")
    assert code == 0, err
    payload = parse_one_json(out)
    fit = len(api[1].encode(LONG_TEXT)) // 128
    assert payload["windows"] == fit and payload["tokens_scored"] == fit * 127
    assert f"only {fit} windows" in err


@needs_datasets
def test_eval_ppl_jsonl_text_field(capsys, tiny_llama_dir, api, tmp_path):
    rows = list(_TRAINING_TEXT) * 2
    joined = "\n\n".join(rows)
    n_tokens = len(api[1].encode(joined))
    results = []
    for name, field in (("text.jsonl", None), ("body.jsonl", "body")):
        path = write_jsonl(tmp_path / name, [{field or "text": r, "id": i} for i, r in enumerate(rows)])
        extra = ["--text-field", field] if field else []
        code, out, err = cli(capsys, "eval-ppl", tiny_llama_dir, "--data", path, "--stride", 16, "--length", 32, "--json", *extra)
        assert code == 0, err
        payload = parse_one_json(out)
        assert payload["tokens_scored"] == n_tokens - 1
        assert f"field '{field or 'text'}'" in payload["data"]
        results.append(payload)
    assert results[0]["perplexity"] == results[1]["perplexity"]  # same text, however the field is named


# --- bad input --------------------------------------------------------------------------------------


def test_bad_model_dir_subprocess(real_runs):
    result = real_runs["missing_model"]
    assert_usage_error(result.returncode, result.stdout, result.stderr, "does not exist", str(real_runs["missing_model_path"]))


@pytest.mark.parametrize(
    "which, needles",
    [
        ("missing", ["does not exist"]),
        ("file", ["not a directory"]),
        ("noconfig", ["config.json"]),
        ("truncated", ["model.safetensors", "safetensors"]),
        ("gpt2", ["GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"]),
        ("badjson", ["config.json"]),
    ],
)
def test_bad_model_directories(capsys, tmp_path, tiny_llama_dir, broken_model_dirs, which, needles):
    path = {
        "missing": tmp_path / "nowhere",
        "file": tiny_llama_dir / "config.json",
        **broken_model_dirs,
    }[which]
    code, out, err = cli(capsys, "infer", path, "-p", "hi", "--max-new-tokens", 2)
    assert_usage_error(code, out, err, *needles)


LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 4


@pytest.mark.parametrize(
    "args, needles, after_load",
    [
        (["-p", LONG_PROMPT, "--max-seq-len", 8, "--format", "raw"], ["max_seq_len", "8"], True),
        (["-p", "hi", "--bogus-option"], ["--bogus-option"], False),
        ([], ["--prompt"], False),
        (["-p", "hi", "--prompt-file", __file__], ["--prompt", "--prompt-file"], False),
        (["-p", "hi", "--format", "nope"], ["nope", "raw", "chatml"], False),
        (["-p", "hi", "--top-p", 1.5], ["--top-p 1.5"], False),
        (["-p", "hi", "--dtype", "fp8"], ["fp8", "fp16"], False),
        (["-p", "hi", "--device", "cuda"], ["cuda", "--device cpu"], False),
        (["-p", "hi", "--max-new-tokens", "many"], ["--max-new-tokens"], False),
        (["-p", "hi", "--max-new-tokens", 0], ["--max-new-tokens"], False),
        (["-p", "hi", "--max-seq-len", 0], ["--max-seq-len"], False),
        (["-p", "hi", "--seed", -1], ["--seed -1"], False),
        (["-p", "hi", "--temperature", -0.5], ["--temperature -0.5"], False),
        (["-p", "hi", "--repetition-range", -2], ["--repetition-range -2"], False),
        (["-p", "", "--format", "raw"], ["prompt is empty"], False),
        (["--prompt-file", "/nonexistent/prompt.txt"], ["/nonexistent/prompt.txt"], False),
        (["-p", "hi", "--score-choices", "a,b", "--choice-values", "1"], ["1 numbers", "2 choices"], False),
        (["-p", "hi", "--score-choices", "a,b", "--choice-values", "x,y"], ["--choice-values"], False),
        (["-p", "hi", "--score-choices", " , "], ["--score-choices"], False),
        (["-p", "hi", "--score-choices", "a,,b"], ["an empty choice"], False),
        (["-p", "hi", "--choice-values", "1,2"], ["--score-choices"], False),
    ],
)
def test_infer_bad_input(capsys, tiny_llama_dir, args, needles, after_load):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, out, err = cli(capsys, "infer", tiny_llama_dir, *args)
    assert_usage_error(code, out, err, *needles, after_load=after_load)


@pytest.mark.parametrize(
    "args, needles, after_load",
    [
        (["--data", "/nonexistent/data.txt"], ["/nonexistent/data.txt", "does not exist"], False),
        (["--data", "TEXT", "--rows", 0], ["--rows"], False),
        (["--data", "TEXT", "--rows", 2, "--stride", 16], ["--rows", "--stride"], False),
        (["--data", "TEXT", "--stride", 64, "--length", 32], ["--stride", "32"], False),
        (["--data", "SHORT", "--length", 32], ["fewer than one window", "32"], True),
        (["--data", "TEXT", "--length", 1], ["--length"], False),
        (["--data", "TEXT", "--rows", 1, "--length", 8, "--batch-size", 0], ["--batch-size"], False),
        (["--data", "TEXT", "--rows", "two"], ["--rows"], False),
        (["--data", "TEXT", "--rows", 1, "--kl-ref", "/nonexistent/ref"], ["--kl-ref", "does not exist"], False),
    ],
)
def test_eval_ppl_bad_input(capsys, tiny_llama_dir, long_text_file, tmp_path, args, needles, after_load):
    short = tmp_path / "short.txt"
    short.write_text("hi", encoding="utf-8")
    args = [{"TEXT": long_text_file, "SHORT": short}.get(a, a) for a in args]
    code, out, err = cli(capsys, "eval-ppl", tiny_llama_dir, *args)
    assert_usage_error(code, out, err, *needles, after_load=after_load)


@needs_datasets
def test_eval_ppl_jsonl_missing_field(capsys, tiny_llama_dir, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"body": "hello there"}, {"body": "general kenobi"}])
    code, out, err = cli(capsys, "eval-ppl", tiny_llama_dir, "--data", path, "--json")
    # datasets may draw its "Generating train split" progress on stderr first; the error is the last line
    assert code == 2 and out == "", (code, out, err)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1].startswith("exlq: error: ") and "'text'" in lines[-1] and "body" in lines[-1] and "--text-field" in lines[-1]
    assert sum("exlq: error" in line for line in lines) == 1 and "Traceback" not in err


# --- interruption ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command, hint", [("eval-ppl", False), ("convert", True), ("measure", True)])
@pytest.mark.parametrize("how", ["returned", "raised"])
def test_ctrl_c_exits_130_saying_so(capsys, monkeypatch, command, hint, how):
    """Ctrl-C in a command reaches main as typer's return value 130 (or as KeyboardInterrupt outside one): exit 130
    with one line, which for the resumable jobs says that running the command again resumes."""
    from exlq.cli import app as app_module

    def interrupted(**_):
        if how == "raised":
            raise KeyboardInterrupt
        return 130

    monkeypatch.setattr(app_module, "app", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        app_module.main([command, "MODEL"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 130 and err.startswith("exlq: error: interrupted") and err.count("\n") == 1
    assert ("run the same command again to resume" in err) == hint
