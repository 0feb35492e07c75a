"""SASS instructions per source line of one kernel instance: where a kernel spends its instructions.

    python bench/sass_lines.py ["exl2_gemv<fp16_t, 1>"] [--source exl2_matmul.cu] [--arch sm_90] [--lines 170-185]

Compiles the instance with NVRTC (as the runtime does, -lineinfo included), disassembles it with nvdisasm
(`pip install nvidia-cuda-nvdisasm`; no GPU needed) and prints, per source line, the static instruction count
and the commonest opcodes; `--lines A-B` prints the instructions of those lines in program order instead.
Static counts, not executed ones: compare two versions of a kernel, then time them on a GPU (METHOD.md).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exlq.runtime.kernels import compiler  # noqa: E402

LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*?);")


def nvdisasm() -> str:
    found = shutil.which("nvdisasm") or next(
        (str(p) for p in map(Path, sys.path) for p in [p / "nvidia" / "cu13" / "bin" / "nvdisasm"] if p.is_file()), None
    )
    if found is None:
        sys.exit("nvdisasm not found: pip install nvidia-cuda-nvdisasm")
    return found


def disassemble(instance: str, source: str, arch: str) -> list[tuple[int, tuple[str, int], str, str]]:
    """(offset, (file, line), opcode, operands) of every SASS instruction of one instance, compiled as the runtime
    compiles it (-lineinfo) and disassembled with nvdisasm; offsets from the start of the kernel."""
    module = compiler._nvrtc_compile(source, *compiler.read_source(source), arch, [instance],
                                     compiler.build_options(source))  # EXLQ_NVRTC_DEFINES too
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(module.image + b"\0")  # CuPy's getCUBIN drops the image's last byte; nvdisasm insists on it
        cubin.flush()
        sass = subprocess.run([nvdisasm(), "-g", "-c", cubin.name], capture_output=True, text=True, check=True).stdout
    where, out = None, []
    for text in sass.splitlines():
        if m := LINE.search(text):
            where = (Path(m[1]).name, int(m[2]))
        elif (m := INSTRUCTION.match(text)) and where:
            out.append((int(m[1], 16), where, m[2], m[3]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("instance", nargs="?", default="exl2_gemv<fp16_t, 1>")
    parser.add_argument("--source", default="exl2_matmul.cu")
    parser.add_argument("--arch", default="sm_90", help="a real architecture, sm_XY (a cubin to read; not compute_XY PTX)")
    parser.add_argument("--lines", default=None, metavar="A-B")
    args = parser.parse_args()
    if not args.arch.startswith("sm_"):
        parser.error(f"--arch must name a real architecture (sm_80, sm_90, ...), not {args.arch!r}")

    source = (compiler.SOURCE_DIR / args.source).read_text().splitlines()
    counts, opcodes = Counter(), defaultdict(Counter)
    low, high = map(int, args.lines.split("-")) if args.lines else (0, -1)
    for offset, where, opcode, operands in disassemble(args.instance, args.source, args.arch):
        counts[where] += 1
        opcodes[where][opcode.split(".")[0]] += 1
        if where[0] == args.source and low <= where[1] <= high:
            print(f"{where[1]:5d} {offset:04x} {opcode}{operands}")
    if args.lines:
        return
    print(f"{sum(counts.values())} instructions in {args.instance} ({args.arch})")
    for (name, line), count in sorted(counts.items()):
        text = source[line - 1].strip()[:60] if name == args.source and line <= len(source) else ""
        print(f"{count:5d} {name}:{line:<4d} {text:60s} {dict(opcodes[(name, line)].most_common(3))}")


if __name__ == "__main__":
    main()
