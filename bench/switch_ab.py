"""A/B of runtime switches in one process: one model built per shape, each switch flipped between decode runs.

`exlq bench` builds its synthetic model in every process (most of a run's time), so an A/B of six interleaved runs a
setting spent minutes of device time a switch. Here each shape's model is built once, and each switch (a module-level
flag the runtime reads at every call, e.g. `kernels.attention_ops.ROPE_ATTENTION`) is set on and off in the order
1 0 0 1 per round, the captured graphs dropped before each run, and `skip_probe.decode_rate` times one-token graph
replays back to back (the GPU's own rate, no token read between steps; `exlq bench` reads one a step).

    python3 bench/switch_ab.py --switches kernels.attention_ops.ROPE_ATTENTION rope.TABLE EXLQ_ATTENTION_RANKS=4 \
        [--shapes llama3-8b qwen2.5-0.5b] [--bpw 4.0] [--steps 256] [--prompt 32] [--rounds 3]

A switch's path is relative to `exlq.runtime`; path=LITERAL gives that attribute a Python literal's value (on) or
its own (off); NAME=VALUE is an environment setting the runtime reads at every call (on: set to VALUE; off: as the
process found it). Prints one JSON line a run, then each switch's mean on and off per
shape and the gain.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from skip_probe import decode_rate  # noqa: E402

from exlq.cli.bench import _synthetic_model  # noqa: E402
from exlq.eval.speed import PROMPT_TOKENS  # noqa: E402


class ValueSwitch:
    """A setting as a switch: `on` gives it `value`, off what it held when made. `read` and `write` reach the setting
    (an environment variable, absent as None; a module attribute)."""

    def __init__(self, read: Callable[[], object], write: Callable[[object], None], value: object) -> None:
        self.read, self.write, self.value, self.found = read, write, value, read()

    @property
    def on(self) -> bool:
        return self.read() == self.value

    @on.setter
    def on(self, on: bool) -> None:
        self.write(self.value if on else self.found)


def environment_switch(name: str, value: str) -> ValueSwitch:
    """NAME=VALUE: the variable holds VALUE, or (off) what the process found (unset if it was)."""

    def write(held: object) -> None:
        if held is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = str(held)

    return ValueSwitch(lambda: os.environ.get(name), write, value)


def attribute_switch(module: object, attribute: str, value: str) -> ValueSwitch:
    """module.ATTRIBUTE=LITERAL: the attribute holds the literal's value, or (off) its own."""
    return ValueSwitch(lambda: getattr(module, attribute), lambda held: setattr(module, attribute, held),
                       ast.literal_eval(value))


def resolve(switch: str) -> tuple[object, str]:
    """The module and attribute of `switch` ("kernels.attention_ops.ROPE_ATTENTION": exlq.runtime's), of a value
    given to one ("kernels.attention_ops.PUSH_HEAD_DIMS=(64, 128)"), or of an environment setting
    ("EXLQ_ATTENTION_RANKS=4")."""
    if "=" in switch:
        name, value = switch.split("=", 1)
        if "." not in name:
            return environment_switch(name, value), "on"
        path, _, attribute = name.rpartition(".")
        return attribute_switch(importlib.import_module(f"exlq.runtime.{path}"), attribute, value), "on"
    path, _, attribute = switch.rpartition(".")
    module = importlib.import_module(f"exlq.runtime.{path}")
    if not isinstance(getattr(module, attribute, None), bool):
        raise SystemExit(f"{switch} is not a boolean switch of exlq.runtime.{path}")
    return module, attribute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", nargs="+", required=True)
    parser.add_argument("--shapes", nargs="+", default=["llama3-8b", "qwen2.5-0.5b"])
    parser.add_argument("--bpw", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=PROMPT_TOKENS,
                        help="prompt tokens before the timed steps (their cache positions: from here on)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    switches = {switch: resolve(switch) for switch in args.switches}
    summary = []
    for shape in args.shapes:
        model = _synthetic_model(shape, args.bpw, torch.device("cuda"), 128)
        for switch, (module, attribute) in switches.items():
            default = getattr(module, attribute)
            rates: dict[bool, list[float]] = {True: [], False: []}
            for round_ in range(args.rounds):
                for on in (True, False, False, True):
                    setattr(module, attribute, on)
                    model.decode_graphs.clear()
                    rate = decode_rate(model, args.steps, args.prompt)
                    rates[on].append(rate)
                    print(json.dumps({"shape": shape, "switch": switch, "on": on, "round": round_,
                                      "tokens_per_second": round(rate, 1)}), flush=True)
            setattr(module, attribute, default)
            model.decode_graphs.clear()
            on_mean, off_mean = statistics.mean(rates[True]), statistics.mean(rates[False])
            summary.append(f"{shape} {switch}: on {on_mean:.1f} ({min(rates[True]):.1f}-{max(rates[True]):.1f}), off "
                           f"{off_mean:.1f} ({min(rates[False]):.1f}-{max(rates[False]):.1f}) tok/s: "
                           f"{100 * (on_mean / off_mean - 1):+.2f} %")
        del model
        torch.cuda.empty_cache()
    print("\n".join(summary))


if __name__ == "__main__":
    main()
