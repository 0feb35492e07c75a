"""Progress of long commands on stderr: a rich bar per stage on a terminal, plain lines in logs (CI, nohup), where a
live bar would print nothing until the end."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import Progress, ProgressColumn

from exlq.cli.common import stderr

#: report(stage, done, total): `done` of `total` steps of `stage` are finished (stages appear at their first report).
Report = Callable[[str, int, int], None]


class LogProgress:
    """Progress as lines: stage done/total, time since the start, the stage's ETA (and `memory()`, e.g. peak RAM), at
    most one every `every` seconds plus each stage's first and last. The ETA's rate counts from the stage's first
    report, so a resumed job's is this run's."""

    def __init__(self, write: Callable[[str], None], every: float = 0.0, memory: Callable[[], str] | None = None) -> None:
        self.write, self.every, self.memory = write, every, memory
        self.started = time.monotonic()
        self.first: dict[str, tuple[float, int]] = {}
        self.last_line = float("-inf")

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        start, done_at_start = self.first.setdefault(stage, (now, done))
        if start < now and done < total and now - self.last_line < self.every:
            return
        self.last_line = now
        line = f"{stage} {done}/{total}, elapsed {clock(now - self.started)}"
        if done > done_at_start:
            line += f", ETA {clock((now - start) / (done - done_at_start) * (total - done))}"
        self.write(line + (f", {self.memory()}" if self.memory else ""))


def clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


@contextmanager
def stage_progress(*columns: ProgressColumn | str, transient: bool = False, every: float = 10.0,
                   memory: Callable[[], str] | None = None) -> Iterator[Report]:
    """A report function for the block: on a terminal a bar per stage with these columns (their `memory` field is
    `memory()`), elsewhere LogProgress lines on stderr, at most one every `every` seconds."""
    if not stderr.is_terminal:
        yield LogProgress(lambda line: stderr.print(line, markup=False, highlight=False), every, memory)
        return
    progress = Progress(*columns, console=stderr, transient=transient)
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total, memory="")
        progress.update(tasks[stage], completed=done, memory=memory() if memory else "")

    with progress:
        yield report


class StepCounter:
    """Turns `advance(n)` callbacks into report(stage, done, total) calls."""

    def __init__(self, report: Report, stage: str, total: int) -> None:
        self.report, self.stage, self.total, self.done = report, stage, total, 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.report(self.stage, self.done, self.total)
