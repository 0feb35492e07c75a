"""Executed instructions and stall samples per source line, from an Nsight Compute report's source page.

    ncu -i REPORT.ncu-rep --page source --csv > SOURCE.csv          # gpu_ab.sh STAGE=ncu writes these
    python bench/ncu_lines.py SOURCE.csv ["exl2_gemv<fp16_t, 1>"] [--source exl2_matmul.cu] [--top 30]

The CSV lists SASS instructions by address, without source lines. This script compiles the same instance here
(NVRTC as the runtime does, so the SASS is the device's when the NVRTC versions match: it checks every opcode)
and takes each instruction's line from nvdisasm (bench/sass_lines.py), then sums per line the executed warp
instructions, the stall samples and the three largest stall reasons. Session 10 found this way that the
register GEMV spends ~20 % of its instructions on the activation gather (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from exlq.runtime.kernels import compiler  # noqa: E402
from sass_lines import disassemble  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("instance", nargs="?", default="exl2_gemv<fp16_t, 1>")
    parser.add_argument("--source", default="exl2_matmul.cu")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()

    sass = {offset: (where, opcode) for offset, where, opcode, _ in disassemble(args.instance, args.source, args.arch)}
    rows = list(csv.reader(args.csv.open()))
    header = next(r for r in rows if r and r[0] == "Address")
    index = {name: i for i, name in enumerate(header)}
    body = rows[rows.index(header) + 1 :]
    stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    base = int(body[0][0], 16)
    per_line: dict[tuple[str, int], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    mismatched = 0
    for row in body:
        where, opcode = sass.get(int(row[0], 16) - base, (("?", 0), ""))
        if opcode and row[1].split() and row[1].split()[0].split(".")[0] != opcode.split(".")[0] and not row[1].lstrip().startswith("@"):
            mismatched += 1
        line = per_line[where]
        line["instructions"] += float(row[index["Instructions Executed"]] or 0)
        line["samples"] += float(row[index["Warp Stall Sampling (All Samples)"]] or 0)
        for stall in stalls:
            line[stall] += float(row[index[stall]] or 0)
    if mismatched:
        print(f"warning: {mismatched} opcodes differ from this machine's build (another NVRTC or source?)")
    total = sum(v["instructions"] for v in per_line.values())
    samples = sum(v["samples"] for v in per_line.values()) or 1.0
    overall = {s: sum(v[s] for v in per_line.values()) for s in stalls}
    print(f"{total:.0f} warp instructions, {samples:.0f} stall samples: "
          + ", ".join(f"{s[6:]} {100 * v / samples:.0f} %" for s, v in sorted(overall.items(), key=lambda x: -x[1])[:6]))
    text = (compiler.SOURCE_DIR / args.source).read_text().splitlines()
    for (name, number), v in sorted(per_line.items(), key=lambda item: -item[1]["instructions"])[: args.top]:
        code = text[number - 1].strip()[:50] if name == args.source and 0 < number <= len(text) else ""
        top = sorted(((v[s], s[6:]) for s in stalls), reverse=True)[:3]
        print(f"{name[:14]:>14}:{number:<4d} instr {100 * v['instructions'] / total:5.1f} %  samples "
              f"{100 * v['samples'] / samples:5.1f} %  {code:50s} " + " ".join(f"{n}={c:.0f}" for c, n in top))


if __name__ == "__main__":
    main()
