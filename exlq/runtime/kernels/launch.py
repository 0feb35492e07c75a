"""Launching NVRTC-compiled kernels on torch tensors: torch's current stream, zero-copy pointers.

Each kernel instance is compiled alone on its first use and loaded once per device from the cubin
`compiler.compile_source` returns, through CuPy's module loader. A launch calls the driver's `cuLaunchKernel` directly on
`torch.cuda.current_stream()`: kernels order correctly with torch ops and are captured by
`torch.cuda.graph` like any torch kernel. (CuPy's own launch path, with a stream object wrapping torch's,
cost about 0.3 ms per launch on the H100 machine: more than most of these kernels run.)
Arguments are packed as C values: tensors as 64-bit device pointers, None as a null pointer, Python
ints as 32-bit `int`, floats as `float`, ctypes structures by value.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings

import torch

from exlq.errors import ExlqError
from exlq.runtime.kernels import target
from exlq.runtime.kernels.compiler import compile_source, is_virtual


def arch_of(device: torch.device) -> str:
    """NVRTC's -arch for `device`: its own ("sm_90"), or the PTX target EXLQ_ARCH names ("compute_80")."""
    return target.compile_arch(device_index(device))


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _module(source: str, instances: tuple[str, ...], index: int) -> dict[str, int]:
    import cupy

    compiled = compile_source(source, arch_of(torch.device("cuda", index)), list(instances))
    with cupy.cuda.Device(index):
        module = cupy.cuda.function.Module()
        if is_virtual(compiled.arch):  # PTX (EXLQ_ARCH), handed to the driver as a C string: it compiles it here
            try:
                module.load(compiled.image + b"\0")
            except cupy.cuda.driver.CUDADriverError as exc:
                raise ExlqError(f"the driver could not compile cuda/{source} from {compiled.arch} PTX (EXLQ_ARCH): "
                                f"{exc}. An NVRTC newer than the driver writes PTX it cannot read; unset EXLQ_ARCH") from exc
        else:
            module.load(compiled.image)
        functions = {name: module.get_function(lowered) for name, lowered in compiled.names.items()}
    _loaded_modules.append(module)  # keep the module (and its functions) alive for the process
    for name, function in functions.items():
        if (percent := preferred_carveout(name)) is not None:
            from cupy_backends.cuda.api import driver

            driver.funcSetAttribute(function.ptr, driver.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, percent)
    return {name: f.ptr for name, f in functions.items()}


_loaded_modules: list = []

#: A tuning probe, unset by default: the split of each SM's L1 / shared memory a kernel prefers
#: (CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT: percent of the most shared memory an SM has; unset, the
#: driver's choice). EXLQ_CARVEOUT=PCT for every kernel, or NAME=PCT,NAME=PCT for the kernels whose instance name
#: starts with NAME (the first that matches), e.g. "exl2_stream=100,exl2_gemv=100". Why: the streamed GEMV's stage
#: count changes the 8B's decode where it changes no copy request, only the shared memory reserved
#: (docs/benchmarks.md, session 32).
CARVEOUT = os.environ.get("EXLQ_CARVEOUT", "")


def preferred_carveout(name: str, setting: str | None = None) -> int | None:
    """The carveout percent EXLQ_CARVEOUT (or `setting`) asks for kernel instance `name`; None: the driver's choice."""
    setting = CARVEOUT if setting is None else setting
    for part in filter(None, (p.strip() for p in setting.split(","))):
        prefix, _, value = part.rpartition("=")
        if not value.isdigit() or not 0 <= int(value) <= 100:
            raise ExlqError(f"EXLQ_CARVEOUT takes PCT or NAME=PCT,... with PCT in 0-100, not {setting!r}")
        if name.startswith(prefix):
            return int(value)
    return None


def kernel(source: str, instances: tuple[str, ...], name: str, device: torch.device) -> int:
    """The driver handle of kernel `name` (one of `instances`) of `cuda/<source>` on `device`. Each instance is
    compiled and loaded on its first use, alone: a first run compiles the few it needs (~1.6 s each), not the whole
    set (~20 s for the EXL2 GEMV's)."""
    if name not in instances:
        raise KeyError(f"{name} is not an instance of cuda/{source}")
    return _module(source, (name,), device_index(device))[name]


@functools.cache
def blocks_per_sm(function: int, threads: int) -> int:
    """Blocks of `threads` threads an SM runs at once of kernel `function` (the driver's occupancy answer: its
    registers, shared memory and carveout on this GPU), for grids sized to one wave: 7 of the one-row wide group GEMV's
    20-KB blocks on an H100, fewer where an SM has 100 KB of shared memory (sm_86, sm_89)."""
    from cupy_backends.cuda.api import driver

    return driver.occupancyMaxActiveBlocksPerMultiprocessor(function, threads, 0)


def _argument(value):
    if isinstance(value, ctypes.Structure):  # a struct passed by value, laid out as in the .cu
        return value
    if isinstance(value, torch.Tensor):
        return ctypes.c_uint64(value.data_ptr())
    if value is None:
        return ctypes.c_uint64(0)
    if isinstance(value, float):
        return ctypes.c_float(value)
    return ctypes.c_int32(int(value))


#: Programmatic dependent launch (sm_90 and newer; EXLQ_PDL=0 turns it off): a kernel launched with overlap=True may
#: start while the stream's previous kernel still runs, and calls pdl_wait() (cuda/common.cuh) before it reads or
#: writes anything that kernel touches. Its prologue (the layer's own weights and tables) then hides the previous
#: kernel's tail and the launch gap: +5 % on the 8B's decode, +8-12 % on Qwen2.5-0.5B's (docs/benchmarks.md, session 16).
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6
CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION = 4


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint * 16)]


def _attribute(kind: int, *values: int) -> _LaunchAttribute:
    return _LaunchAttribute(id=kind, value=(ctypes.c_uint * 16)(*values))


_PDL = _attribute(CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, 1)


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [
        *[(name, ctypes.c_uint) for name in ("gx", "gy", "gz", "bx", "by", "bz", "shared_bytes")],
        ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint),
    ]


@functools.cache
def _launch_ex():
    function = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    function.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


@functools.cache
def _hopper_or_newer(index: int) -> bool:
    return target.capability(index)[0] >= 9


_pdl_refused: set[int] = set()  # devices whose driver refused a programmatic launch: plain launches from then on


def pdl_enabled(index: int) -> bool:
    """Whether overlap=True launches on device `index` use programmatic dependent launch (read at every launch, so a
    test or a benchmark can switch it; CUDA graphs keep what was captured)."""
    return os.environ.get("EXLQ_PDL", "1") != "0" and index not in _pdl_refused and _hopper_or_newer(index)


def hopper_or_newer(device: torch.device) -> bool:
    """Compute capability 9.0 or newer (programmatic dependent launch, bulk copies, clusters); EXLQ_ARCH counts."""
    return _hopper_or_newer(device_index(device))


_shared_allowed: dict[int, int] = {}  # dynamic shared memory each kernel handle may take


def allow_shared(function: int, shared_bytes: int) -> None:
    """Let kernel `function` take `shared_bytes` of dynamic shared memory (beyond 48 KiB the driver must be told)."""
    if _shared_allowed.get(function, 48 * 1024) < shared_bytes:
        from cupy_backends.cuda.api import driver

        driver.funcSetAttribute(function, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_bytes)
        _shared_allowed[function] = shared_bytes


CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED = 14
_large_clusters: set[int] = set()  # kernel handles allowed clusters of more than 8 blocks


def _allow_cluster(function: int, cluster: tuple[int, int, int]) -> None:
    """Clusters of more than 8 blocks (up to 16 on the H100/H200) need the kernel's leave."""
    if cluster[0] * cluster[1] * cluster[2] > 8 and function not in _large_clusters:
        from cupy_backends.cuda.api import driver

        driver.funcSetAttribute(function, CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1)
        _large_clusters.add(function)


def _launch_with(attributes: list[_LaunchAttribute], config: tuple, function: int, params) -> int:
    """cuLaunchKernelEx with `attributes`; config: (grid x, y, z, block x, y, z, shared bytes, stream). Its CUresult."""
    array = (_LaunchAttribute * len(attributes))(*attributes)
    launch_config = _LaunchConfig(*config, array, len(attributes))
    return _launch_ex()(ctypes.byref(launch_config), function, ctypes.addressof(params), None)


def launch(function: int, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, device: torch.device,
           overlap: bool = False, shared_bytes: int = 0, cluster: tuple[int, int, int] | None = None) -> None:
    """Run kernel `function` on torch's current stream of `device`; `overlap`: the kernel calls pdl_wait() first
    and may start before the previous kernel ends (on sm_90+, unless EXLQ_PDL=0); `shared_bytes`: its dynamic shared
    memory (beyond 48 KiB, after allow_shared); `cluster`: thread-block cluster dimensions (sm_90+; they divide the
    grid)."""
    from cupy_backends.cuda.api import driver

    values = [_argument(a) for a in args]
    params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    stream = torch.cuda.current_stream(device).cuda_stream
    gx, gy, gz = (*grid, 1, 1)[:3]
    bx, by, bz = (*block, 1, 1)[:3]
    required = []  # launch attributes the kernel cannot run without
    if cluster is not None:
        _allow_cluster(function, cluster)
        required.append(_attribute(CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, *cluster))
    config = (gx, gy, gz, bx, by, bz, shared_bytes, stream)
    result = None  # of the last launch with the required attributes alone
    if overlap and pdl_enabled(index := device_index(device)):  # plain launches skip the device lookup
        first = _launch_with([*required, _PDL], config, function, params)
        if first == 0:
            return
        # An older driver may refuse programmatic launch (e.g. inside a graph capture): the kernels are correct
        # without it. A launch that fails without it too has another fault (raised), and PDL stays on.
        if required:
            result = _launch_with(required, config, function, params)
        if result in (None, 0):
            _pdl_refused.add(index)
            warnings.warn(f"cuLaunchKernelEx (programmatic dependent launch) failed with CUresult {first}: "
                          "launching without it from now on (EXLQ_PDL=0 skips the attempt)", RuntimeWarning,
                          stacklevel=2)
    elif required:
        result = _launch_with(required, config, function, params)
    if result == 0:
        return
    if result is not None:
        raise ExlqError(f"cuLaunchKernelEx failed with CUresult {result} (cluster {cluster}, grid {grid})")
    driver.launchKernel(function, gx, gy, gz, bx, by, bz, shared_bytes, stream, ctypes.addressof(params), 0)
