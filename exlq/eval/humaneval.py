"""HumanEval: the 164 problems, prompts for base and chat models, the stop rule, scoring and pass@k.

Each problem is a Python function signature with its docstring; the model writes the body, and
the completion passes when the problem's own tests run to the end in the sandbox
(`exlq.eval.sandbox`). pass@k is the unbiased estimator of Chen et al. 2021 averaged over problems.

Completion = everything the model writes after the prompt, cut at EOS or at the first line that
starts without indentation (the end of the function body: the next `def`, `if __name__`, a
closing code fence, example calls). Chat models get the same prompt as the start of their own
answer ("```python\\n" + prompt after a request to complete the function), so both kinds of model
continue the same code and are scored the same way.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from exlq.errors import ExlqError
from exlq.eval.sandbox import SandboxLimits, SandboxResult, run_sandboxed
from exlq.runtime.kv_quant import CacheType

FORMATS = ("auto", "raw", "chat")
USER_MESSAGE = "Complete the following Python function:\n```python\n{prompt}```"
ANSWER_START = "```python\n{prompt}"
K_VALUES = (1, 10)


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str


def load_problems() -> list[Problem]:
    """The 164 problems shipped with the package (exlq/data/humaneval), in dataset order."""
    data = resources.files("exlq.data").joinpath("humaneval/HumanEval.jsonl.gz").read_bytes()
    rows = [json.loads(line) for line in gzip.decompress(data).decode("utf-8").splitlines() if line.strip()]
    return [Problem(**{f: row[f] for f in Problem.__dataclass_fields__}) for row in rows]


def select_problems(problems: Sequence[Problem], tasks: str | None = None, limit: int | None = None) -> list[Problem]:
    """`tasks`: comma-separated problem numbers and ranges ("0-9,42"); then the first `limit` of them."""
    chosen = list(problems)
    if tasks:
        numbers: list[int] = []
        for part in (p.strip() for p in tasks.split(",")):
            lo, sep, hi = part.removeprefix("HumanEval/").partition("-")
            if not lo.isdigit() or (sep and not hi.isdigit()):
                raise ExlqError(f"--tasks takes problem numbers and ranges such as 0-9,42 (got {part!r})")
            if sep and int(hi) < int(lo):
                raise ExlqError(f"--tasks: the range {part!r} runs backwards; write it low-high, e.g. {hi}-{lo}")
            numbers.extend(range(int(lo), int(hi or lo) + 1))
        bad = [n for n in numbers if not 0 <= n < len(problems)]
        if bad:
            raise ExlqError(f"--tasks: no problem {bad[0]} (there are {len(problems)}, numbered from 0)")
        chosen = [problems[n] for n in dict.fromkeys(numbers)]
    if limit is not None:
        if limit < 1:
            raise ExlqError(f"--limit must be at least 1 (got {limit})")
        chosen = chosen[:limit]
    return chosen


# --- prompts ------------------------------------------------------------------------------------


def resolve_format(name: str, tokenizer) -> str:
    """raw or chat; auto means chat when the model has a chat template."""
    if name not in FORMATS:
        raise ExlqError(f"unknown --format {name!r}; choose one of: {', '.join(FORMATS)}")
    if name == "auto":
        return "chat" if tokenizer.chat_template else "raw"
    return name


@dataclass(frozen=True)
class PromptText:
    text: str
    add_bos: bool
    encode_special_tokens: bool


def build_prompt(prompt: str, fmt: str, tokenizer) -> PromptText:
    """The text the model continues: the problem itself (raw) or a chat whose answer starts with it."""
    from exlq.runtime.prompt_format import format_prompt, prompt_encoding

    if fmt == "raw":
        return PromptText(prompt, tokenizer.add_bos_default, False)
    if fmt != "chat":
        raise ExlqError(f"unknown HumanEval prompt format {fmt!r}")
    messages = [{"role": "user", "content": USER_MESSAGE.format(prompt=prompt)}]
    text = format_prompt(messages, "chat_template", tokenizer) + ANSWER_START.format(prompt=prompt)
    add_bos, special = prompt_encoding("chat_template", tokenizer, text)
    return PromptText(text, add_bos, special)


def encode_prompt(prompt: str, fmt: str, tokenizer) -> list[int]:
    spec = build_prompt(prompt, fmt, tokenizer)
    return tokenizer.encode(spec.text, add_bos=spec.add_bos, encode_special_tokens=spec.encode_special_tokens)


# --- the stop rule --------------------------------------------------------------------------------


def body_end(text: str) -> int | None:
    """Where the function body ends in a completion: the start of its first unindented non-blank line.

    The completion starts at the beginning of a line (every prompt ends with a newline).
    """
    at_line_start = True
    for i, ch in enumerate(text):
        if at_line_start and not ch.isspace():
            return i
        at_line_start = ch == "\n"
    return None


def truncate_completion(text: str) -> str:
    end = body_end(text)
    return text if end is None else text[:end]


# --- scoring --------------------------------------------------------------------------------------


def build_program(problem: Problem, completion: str) -> str:
    """The file the sandbox runs: the prompt, the completed body, the tests and the call of check()."""
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class Scorer:
    """A small pool of threads, each waiting on one sandboxed process at a time (one per program)."""

    def __init__(self, limits: SandboxLimits | None = None, workers: int | None = None):
        self.limits = limits
        self._pool = ThreadPoolExecutor(workers or default_workers())

    def submit(self, program: str, on_done: Callable[[SandboxResult], None] | None = None) -> Future:
        """Start scoring `program`; `on_done` gets its result (in a pool thread) when it ends."""
        future = self._pool.submit(run_sandboxed, program, self.limits)
        if on_done is not None:
            future.add_done_callback(lambda f: f.exception() is None and on_done(f.result()))
        return future

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True)


def score_programs(programs: Iterable[str], *, limits: SandboxLimits | None = None, workers: int | None = None,
                   on_done: Callable[[SandboxResult], None] | None = None) -> list[SandboxResult]:  # fmt: skip
    """Run programs concurrently, each in its own sandboxed process; results in input order."""
    with Scorer(limits, workers) as scorer:
        futures = [scorer.submit(program, on_done) for program in programs]
    return [f.result() for f in futures]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k samples drawn from n (c correct) passes: 1 - C(n-c, k) / C(n, k).

    Computed as a product of ratios (no huge binomials), as in Chen et al. 2021.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems, from (samples, correct) per problem."""
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


# --- the whole evaluation -------------------------------------------------------------------------


@dataclass
class Sample:
    task_id: str
    index: int  # sample number within the problem
    completion: str
    new_tokens: int
    stop_reason: str
    result: SandboxResult | None = None

    def as_json(self) -> dict:
        r = self.result
        return {
            "task_id": self.task_id,
            "sample": self.index,
            "completion": self.completion,
            "passed": bool(r and r.passed),
            "result": r.status if r else "not scored",
            "error": r.error if r else None,
            "new_tokens": self.new_tokens,
            "stop_reason": self.stop_reason,
        }


@dataclass
class HumanEvalConfig:
    format: str = "auto"
    samples_per_task: int = 1
    max_new_tokens: int = 512
    batch_size: int = 8
    max_seq_len: int | None = None
    cache_type: str | CacheType = "fp16"  # a --cache name, or the CacheType of --cache-bits
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    workers: int = field(default_factory=default_workers)

    def validate(self) -> None:
        for name in ("samples_per_task", "max_new_tokens", "batch_size", "workers"):
            if getattr(self, name) < 1:
                raise ExlqError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ExlqError(f"--max-seq-len must be at least 2 (got {self.max_seq_len})")
        if not self.limits.timeout > 0:
            raise ExlqError(f"--timeout must be positive (got {self.limits.timeout})")


@dataclass
class HumanEvalReport:
    format: str
    samples: list[Sample]  # by problem, then sample index
    pass_at: dict[str, float]  # "pass@1", and "pass@10" with at least 10 samples per problem
    problems: int
    new_tokens: int
    generation_seconds: float
    total_seconds: float

    @property
    def passed(self) -> int:
        return sum(bool(s.result and s.result.passed) for s in self.samples)

    @property
    def generation_tokens_per_second(self) -> float:
        return self.new_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


def evaluate_humaneval(model, tokenizer, problems: Sequence[Problem], config: HumanEvalConfig, sampler,
                       *, on_generated: Callable[[int], None] | None = None,
                       on_scored: Callable[[], None] | None = None) -> HumanEvalReport:  # fmt: skip
    """Generate `samples_per_task` completions per problem in batches, score them as batches finish.

    `sampler`: one Sampler for the whole run, so a seeded run is reproducible. Problems are
    batched shortest prompt first (less padding); scoring overlaps generation.
    """
    from exlq.runtime.batch_generator import BatchGenerator

    config.validate()
    if not problems:
        raise ExlqError("no HumanEval problems selected")
    start = time.perf_counter()
    fmt = resolve_format(config.format, tokenizer)
    prompt_ids = {p.task_id: encode_prompt(p.prompt, fmt, tokenizer) for p in problems}
    longest = max(len(ids) for ids in prompt_ids.values())
    room = config.max_seq_len or model.config.max_position_embeddings
    if longest >= room:
        raise ExlqError(f"the longest prompt has {longest} tokens, leaving no room to generate within max_seq_len {room}")
    jobs = [(p, i) for p in sorted(problems, key=lambda p: len(prompt_ids[p.task_id])) for i in range(config.samples_per_task)]
    generator = BatchGenerator(model, tokenizer, max_seq_len=config.max_seq_len, cache_type=config.cache_type)
    samples: list[Sample] = []
    futures: list[Future] = []
    generation_seconds, new_tokens = 0.0, 0
    with Scorer(config.limits, config.workers) as scorer:
        for begin in range(0, len(jobs), config.batch_size):
            chunk = jobs[begin : begin + config.batch_size]
            batch = generator.generate([prompt_ids[p.task_id] for p, _ in chunk], sampler=sampler,
                                       max_new_tokens=config.max_new_tokens, stop_rule=body_end)  # fmt: skip
            generation_seconds += batch.seconds
            new_tokens += batch.new_tokens
            for (problem, index), row in zip(chunk, batch.rows):
                sample = Sample(problem.task_id, index, truncate_completion(row.text), len(row.token_ids), row.stop_reason)
                samples.append(sample)
                futures.append(scorer.submit(build_program(problem, sample.completion), _store_in(sample, on_scored)))
            if on_generated is not None:
                on_generated(len(chunk))
        for future in futures:
            future.result()  # re-raise anything that went wrong in a worker
    order = {p.task_id: n for n, p in enumerate(problems)}
    samples.sort(key=lambda s: (order[s.task_id], s.index))
    counts = [(config.samples_per_task, sum(s.result.passed for s in samples if s.task_id == p.task_id)) for p in problems]
    pass_at = {f"pass@{k}": mean_pass_at_k(counts, k) for k in K_VALUES if k <= config.samples_per_task}
    return HumanEvalReport(fmt, samples, pass_at, len(problems), new_tokens, generation_seconds, time.perf_counter() - start)


def _store_in(sample: Sample, on_scored: Callable[[], None] | None) -> Callable[[SandboxResult], None]:
    def store(result: SandboxResult) -> None:
        sample.result = result
        if on_scored is not None:
            on_scored()

    return store


def check_writable(path: Path) -> None:
    """Refuse an output file that cannot be written before hours of generation, not after them."""
    if path.is_dir():
        raise ExlqError(f"--output {path} is a directory; give a file name such as samples.jsonl")
    if not path.parent.is_dir():
        raise ExlqError(f"--output {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ExlqError(f"--output {path} is not writable")


def write_samples(path: Path, samples: Iterable[Sample]) -> None:
    """One JSON object per sample (see Sample.as_json)."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps(sample.as_json(), ensure_ascii=False) + "\n")
    except OSError as exc:
        raise ExlqError(f"cannot write --output {path}: {exc}") from None
