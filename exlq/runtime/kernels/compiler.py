"""Run-time compilation of the `cuda/` sources with NVRTC, cached on disk per architecture and source hash.

No build step and no CUDA toolkit: NVRTC (from `nvidia-cuda-nvrtc` or CuPy's CUDA) turns a `.cu` file into
a cubin for one architecture (`sm_80`, `sm_89`, `sm_90`, ...), or into PTX for a virtual one (`compute_80`: what
`EXLQ_ARCH` builds, see `target`). The image and the lowered names of its template instances are cached under
`$EXLQ_CACHE_DIR/kernels` (default `~/.cache/exlq/kernels`), keyed by a hash of the sources, options, instances and
the NVRTC version, so a second run loads in milliseconds.
This module needs no GPU: CI compiles every kernel with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from exlq.errors import ExlqError

#: The kernel sources: `cuda/` at the top of the repository, reached through the package's link
#: `exlq/cuda_sources` (a wheel stores the files themselves there).
SOURCE_DIR = Path(__file__).resolve().parents[2] / "cuda_sources"
OPTIONS = ("-std=c++17", "--use_fast_math", "-lineinfo")
#: The kernel variants compiled in (catalog.VARIANTS): EXLQ_NVRTC_DEFINES lists macro names, comma or space
#: separated, that the sources test with #ifdef. Why: a prepared variant and the default are timed in one tree and one
#: GPU call, the setting flipped between runs, instead of two trees and two kernel caches (docs/benchmarks.md).
DEFINES_VARIABLE = "EXLQ_NVRTC_DEFINES"
_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"', re.MULTILINE)


@dataclass(frozen=True)
class CompiledModule:
    """A cubin (arch "sm_XY") or PTX text ("compute_XY"), and the mangled name of each requested kernel instance
    (e.g. "exl2_gemv<fp16_t, 1>")."""

    image: bytes
    names: dict[str, str]
    arch: str


def cache_dir() -> Path:
    root = os.environ.get("EXLQ_CACHE_DIR") or Path.home() / ".cache" / "exlq"
    return Path(root) / "kernels"


def read_source(name: str) -> tuple[str, dict[str, str]]:
    """The text of `cuda/<name>` and of the local headers it includes (NVRTC gets them by name)."""
    path = SOURCE_DIR / name
    if not path.is_file():
        raise ExlqError(f"kernel source {path} is missing: reinstall exlq (its CUDA sources ship with the package)")
    text = path.read_text()
    headers: dict[str, str] = {}
    pending = _INCLUDE.findall(text)
    while pending:  # headers of headers too: all of them key the cache and reach NVRTC
        header = pending.pop()
        if header not in headers:
            headers[header] = (SOURCE_DIR / header).read_text()
            pending += _INCLUDE.findall(headers[header])
    return text, headers


def is_virtual(arch: str) -> bool:
    """Whether `arch` is a virtual architecture ("compute_80"), built to PTX, rather than a real one ("sm_80")."""
    return arch.startswith("compute_")


def nvrtc_version() -> tuple[int, int]:
    from cupy.cuda import nvrtc

    return tuple(nvrtc.getVersion())


def variant_options(source: str | None = None) -> tuple[str, ...]:
    """-D options of the variants EXLQ_NVRTC_DEFINES selects, those of `source` only where given (the other sources
    keep their default builds and cache entries); an unknown name is an error (a typo would otherwise time the
    default and call it the variant). Read when a process first loads a module: set it before the run."""
    from exlq.runtime.kernels.catalog import VARIANTS

    names = os.environ.get(DEFINES_VARIABLE, "").replace(",", " ").split()
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ExlqError(f"{DEFINES_VARIABLE}: unknown kernel variant(s) {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(VARIANTS)) or 'none'}")
    return tuple(f"-D{v}" for v in sorted(set(names)) if source is None or source in VARIANTS[v])


def build_options(source: str) -> tuple[str, ...]:
    """NVRTC options of a source's build: OPTIONS and the selected variants' -D (its cache key includes them)."""
    return (*OPTIONS, *variant_options(source))


def compile_source(name: str, arch: str, instances: list[str]) -> CompiledModule:
    """Compile `cuda/<name>` for `arch` (e.g. "sm_90") with the selected variants, from the disk cache when the same
    build exists."""
    source, headers = read_source(name)
    options = build_options(name)
    key = hashlib.sha256(
        json.dumps([source, sorted(headers.items()), options, arch, instances, nvrtc_version()]).encode()
    ).hexdigest()[:24]
    stem = cache_dir() / arch / f"{Path(name).stem}-{key}"
    image_path = stem.with_suffix(".ptx" if is_virtual(arch) else ".cubin")
    names_path = stem.with_suffix(".json")
    if image_path.is_file() and names_path.is_file():
        return CompiledModule(image_path.read_bytes(), json.loads(names_path.read_text()), arch)
    module = _nvrtc_compile(name, source, headers, arch, instances, options)
    stem.parent.mkdir(parents=True, exist_ok=True)
    for path, data in ((image_path, module.image), (names_path, json.dumps(module.names).encode())):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file
    return module


def _nvrtc_compile(name: str, source: str, headers: dict[str, str], arch: str, instances: list[str],
                   options: tuple[str, ...] = OPTIONS) -> CompiledModule:
    from cupy.cuda import nvrtc

    program = nvrtc.createProgram(
        source, name, tuple(h.encode() for h in headers.values()), tuple(h.encode() for h in headers)
    )
    try:
        for instance in instances:
            nvrtc.addNameExpression(program, instance)
        try:
            nvrtc.compileProgram(program, (*options, f"-arch={arch}"))
        except nvrtc.NVRTCError as exc:
            raise ExlqError(f"NVRTC failed to compile cuda/{name} for {arch}:\n{nvrtc.getProgramLog(program)}") from exc
        names = {instance: nvrtc.getLoweredName(program, instance) for instance in instances}
        return CompiledModule(nvrtc.getPTX(program) if is_virtual(arch) else nvrtc.getCUBIN(program), names, arch)
    finally:
        nvrtc.destroyProgram(program)


# ----- what a cubin says about its kernels (registers, spills): checked in CI, printed by bench/kernel_resources.py -----

EIATTR_FRAME_SIZE = 0x11  # bytes of local memory (stack frame) a thread: spilled registers, local arrays
EIATTR_REGCOUNT = 0x2F
EIFMT_SVAL = 4  # attribute formats: 1 no value, 2 one byte, 3 two bytes, 4 sized value


def elf_sections(cubin: bytes) -> list[tuple[str, int, int, int]]:
    """(name, offset, size, link) of every section of a 64-bit little-endian ELF file."""
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    entsize, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * entsize) for i in range(count)]
    names_at = headers[names_index][4]
    return [(c_string(cubin, names_at + h[0]), h[4], h[5], h[6]) for h in headers]


def c_string(data: bytes, at: int) -> str:
    return data[at : data.index(b"\0", at)].decode()


def cubin_resources(cubin: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """Registers and local-memory (stack frame) bytes a thread, by mangled kernel name: EIATTR_REGCOUNT and
    EIATTR_FRAME_SIZE of the cubin's `.nv.info` section."""
    sections = elf_sections(cubin)
    _, symtab_at, symtab_size, strtab_index = next(s for s in sections if s[0] == ".symtab")
    strtab_at = sections[strtab_index][1]
    symbols = [c_string(cubin, strtab_at + struct.unpack_from("<I", cubin, symtab_at + off)[0])
               for off in range(0, symtab_size, 24)]
    found: dict[int, dict[str, int]] = {EIATTR_REGCOUNT: {}, EIATTR_FRAME_SIZE: {}}
    for name, at, size, _ in sections:
        if name != ".nv.info":
            continue
        end = at + size
        while at < end:
            fmt, attribute = cubin[at], cubin[at + 1]
            if fmt == EIFMT_SVAL:
                length = struct.unpack_from("<H", cubin, at + 2)[0]
                if attribute in found:
                    symbol, value = struct.unpack_from("<II", cubin, at + 4)
                    found[attribute][symbols[symbol]] = value
                at += 4 + length
            else:
                at += {1: 2, 2: 3, 3: 4}.get(fmt, 2)
    return found[EIATTR_REGCOUNT], found[EIATTR_FRAME_SIZE]
