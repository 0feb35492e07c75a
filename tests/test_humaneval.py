"""HumanEval: the shipped problems, prompts, the stop rule, pass@k, scoring and the CLI end to end."""

from __future__ import annotations

import itertools
import json
import math
import time

import pytest

from exlq.errors import ExlqError
from exlq.eval.humaneval import (
    body_end,
    build_program,
    build_prompt,
    encode_prompt,
    load_problems,
    mean_pass_at_k,
    pass_at_k,
    resolve_format,
    score_programs,
    select_problems,
    truncate_completion,
)
from exlq.runtime.tokenizer import Tokenizer
from test_cli import assert_usage_error, cli, parse_one_json


@pytest.fixture(scope="module")
def problems():
    return load_problems()


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return Tokenizer.from_dir(tiny_llama_dir)


# --- data -------------------------------------------------------------------------------------------


def test_problems_load_from_package_data(problems):
    assert len(problems) == 164
    assert [p.task_id for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    for p in problems:
        assert p.prompt.endswith("\n") and f"def {p.entry_point}(" in p.prompt
        assert "def check(candidate)" in p.test and p.canonical_solution.strip()
    assert problems[0].entry_point == "has_close_elements"


def test_select_problems(problems):
    assert [p.task_id for p in select_problems(problems, limit=2)] == ["HumanEval/0", "HumanEval/1"]
    chosen = select_problems(problems, "3-5,1,HumanEval/163,4")
    assert [p.task_id for p in chosen] == ["HumanEval/3", "HumanEval/4", "HumanEval/5", "HumanEval/1", "HumanEval/163"]
    assert len(select_problems(problems, "10-20", limit=3)) == 3
    for tasks, limit, message in (("x", None, "--tasks"), ("164", None, "no problem 164"), (None, 0, "--limit")):
        with pytest.raises(ExlqError, match=message):
            select_problems(problems, tasks, limit)


# --- the stop rule ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("    return a + b\n", "    return a + b\n"),  # no end yet: all of it
        ("    return a + b\n\ndef other():\n    pass\n", "    return a + b\n\n"),
        ("    x = 1\n\n\n    return x\nif __name__ == '__main__':\n", "    x = 1\n\n\n    return x\n"),
        ("    return 1\n```\n\nThis function returns one.", "    return 1\n"),  # chat answers close the fence
        ("\treturn 1\nprint(f(2))", "\treturn 1\n"),  # tabs are indentation
        ("    s = '''\n    text\n    '''\n    return s\n# done", "    s = '''\n    text\n    '''\n    return s\n"),
        ("def helper():\n    pass\n", ""),  # unindented from the start: an empty body
        ("", ""),
        ("    return [\n        1,\n    ]\n\n\n", "    return [\n        1,\n    ]\n\n\n"),
    ],
)
def test_truncate_completion(text, expected):
    assert truncate_completion(text) == expected
    assert (body_end(text) is None) == (expected == text)


# --- pass@k -----------------------------------------------------------------------------------------


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of all k-subsets of n samples (c of them correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_known_values_and_mean():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)
    assert pass_at_k(1000, 0, 10) == 0.0 and pass_at_k(1000, 995, 10) == 1.0
    assert 0 < pass_at_k(2000, 1, 10) < 1 and math.isfinite(pass_at_k(2000, 1, 10))  # no overflowing binomials
    assert mean_pass_at_k([(10, 10), (10, 0)], 1) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)


# --- prompts ----------------------------------------------------------------------------------------


def test_raw_and_chat_prompts(problems, tokenizer):
    prompt = problems[2].prompt
    raw = build_prompt(prompt, "raw", tokenizer)
    assert raw.text == prompt and not raw.encode_special_tokens
    chat = build_prompt(prompt, "chat", tokenizer)  # the tiny tokenizer has a ChatML template
    assert chat.text == (
        "<|im_start|>user\nComplete the following Python function:\n```python\n" + prompt + "```<|im_end|>\n"
        "<|im_start|>assistant\n```python\n" + prompt
    )
    assert chat.encode_special_tokens
    assert resolve_format("auto", tokenizer) == "chat"
    ids = encode_prompt(prompt, "chat", tokenizer)
    assert tokenizer.decode(ids) .endswith(prompt) and ids.count(tokenizer.encode("<|im_start|>", encode_special_tokens=True)[0]) == 2
    with pytest.raises(ExlqError, match="--format"):
        resolve_format("chatml", tokenizer)


def test_auto_format_is_raw_without_a_chat_template(tokenizer):
    class NoTemplate:
        chat_template = None

    assert resolve_format("auto", NoTemplate()) == "raw"


# --- scoring ----------------------------------------------------------------------------------------


def test_canonical_solutions_all_pass_quickly(problems):
    """Every dataset solution passes in the sandbox: the sandbox does not break legitimate code."""
    start = time.perf_counter()
    results = score_programs([build_program(p, p.canonical_solution) for p in problems])
    elapsed = time.perf_counter() - start
    failures = [(p.task_id, r.status, r.error) for p, r in zip(problems, results) if not r.passed]
    assert failures == []
    assert mean_pass_at_k([(1, int(r.passed)) for r in results], 1) == 1.0
    assert elapsed < 60, elapsed


def test_wrong_bodies_fail_with_the_assertion(problems):
    results = score_programs([build_program(p, "    return None\n") for p in problems[:6]])
    assert all(r.status == "failed" for r in results)
    assert all(r.error.startswith("AssertionError") or "Error" in r.error for r in results)
    assert "(line " in results[0].error and "assert candidate(" in results[0].error


# --- the command ------------------------------------------------------------------------------------


def test_cli_end_to_end(capsys, tiny_llama_dir, tmp_path):
    out_file = tmp_path / "samples.jsonl"
    code, out, err = cli(
        capsys, "eval-humaneval", tiny_llama_dir, "--limit", 2, "--samples-per-task", 2, "--max-new-tokens", 8,
        "--temperature", 0.8, "--seed", 7, "--batch-size", 3, "--device", "cpu", "--json", "-o", out_file,
        "--max-seq-len", 1200,  # the tiny tokenizer needs ~1000 tokens for these prompts
    )  # fmt: skip
    assert code == 0, err
    payload = parse_one_json(out)
    assert payload["problems"] == 2 and payload["samples_per_task"] == 2 and payload["samples"] == 4
    assert payload["pass@1"] == 0.0 and "pass@10" not in payload  # a random model passes nothing
    assert payload["format"] == "chat" and payload["device"] == "cpu" and payload["dtype"] == "float32"
    assert sum(payload["outcomes"].values()) == 4 and payload["passed"] == 0
    assert payload["new_tokens"] <= 4 * 8 and payload["generation_tokens_per_second"] >= 0
    assert payload["time_s"] >= payload["generation_s"] > 0
    settings = payload["settings"]
    assert settings["seed"] == 7 and settings["temperature"] == 0.8 and settings["cache"] == "fp16"
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [(r["task_id"], r["sample"]) for r in rows] == [("HumanEval/0", 0), ("HumanEval/0", 1), ("HumanEval/1", 0), ("HumanEval/1", 1)]
    for r in rows:
        assert set(r) >= {"task_id", "sample", "completion", "passed", "result", "error", "new_tokens", "stop_reason"}
        assert r["passed"] is False and r["result"] in ("failed", "timeout") and r["error"]
        assert r["new_tokens"] <= 8 and r["completion"] == truncate_completion(r["completion"])
    # The same seed and batch size sample the same completions.
    code, again, err = cli(
        capsys, "eval-humaneval", tiny_llama_dir, "--limit", 2, "--samples-per-task", 2, "--max-new-tokens", 8,
        "--temperature", 0.8, "--seed", 7, "--batch-size", 3, "--device", "cpu", "--json", "-o", tmp_path / "again.jsonl",
        "--max-seq-len", 1200,
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "again.jsonl").read_text().replace('"timeout"', '"failed"') == out_file.read_text().replace('"timeout"', '"failed"')


def test_cli_plain_output(capsys, tiny_llama_dir):
    code, out, err = cli(capsys, "eval-humaneval", tiny_llama_dir, "--tasks", "5", "--max-new-tokens", 4, "--format", "raw", "--device", "cpu")
    assert code == 0, err
    assert out == "pass@1: 0.0000\n"
    assert "1 problems × 1 samples" in err


def test_cli_cache_bits(capsys, tmp_path):
    """--cache-bits K,V as in infer and eval-ppl: the completions are generated through that quantized cache (a model
    of 32-wide heads: the cache quantizes groups of 32)."""
    from tiny_models import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path / "wide-head", "qwen2", seed=7, num_attention_heads=2, num_key_value_heads=1)
    code, out, err = cli(capsys, "eval-humaneval", model_dir, "--tasks", "5", "--max-new-tokens", 4, "--format", "raw",
                         "--device", "cpu", "--cache-bits", "4,2", "--json")  # fmt: skip
    assert code == 0, err
    assert parse_one_json(out)["settings"]["cache"] == "k4v2"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--samples-per-task", 0], "--samples-per-task"),
        (["--batch-size", 0], "--batch-size"),
        (["--max-new-tokens", 0], "--max-new-tokens"),
        (["--temperature", -1], "--temperature -1"),
        (["--top-p", 0], "--top-p 0"),
        (["--format", "chatml"], "--format"),
        (["--limit", 0], "--limit"),
        (["--tasks", "1-x"], "--tasks"),
        (["--cache", "q5x"], "q5x"),
        (["--cache-bits", "9,2"], "--cache-bits"),
        (["--tasks", "5-2"], "runs backwards"),
        (["-o", "/nonexistent-exlq-dir/samples.jsonl"], "does not exist"),
        (["-o", "."], "is a directory"),
        (["--timeout", 0], "--timeout"),
        (["--workers", 0], "--workers"),
    ],
)
def test_cli_bad_options(capsys, tiny_llama_dir, args, needle):
    code, out, err = cli(capsys, "eval-humaneval", tiny_llama_dir, *args)
    assert_usage_error(code, out, err, needle)
