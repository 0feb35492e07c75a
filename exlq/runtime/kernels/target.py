"""The GPU architecture the kernels are built and routed for: the device's own, or an older one it stands in for.

Users run these kernels on Ampere (sm_80/86) and Ada (sm_89) cards, whose paths differ from Hopper's: no programmatic
dependent launch, no thread-block clusters, no bulk copies (so no streamed GEMV), less shared memory. With
`EXLQ_ARCH=sm_80|sm_86|sm_89|...` (at most the device's own capability) a newer GPU runs those paths: every kernel is
built as PTX for that architecture (`compute_XY`, which the driver compiles for the device, as it would for a GPU
newer than a cubin), the capability the runtime routes by is that one, and so are the shared-memory limits. The GPU
tests run so on the Hopper machine test the Ampere and Ada code; speeds measured so are not those of the older GPU.
Not stood in for: registers and spills (the driver compiles the PTX for the device present; CI's cubin checks in
tests/test_kernel_compile.py cover each architecture's), the SM count, the L2 size.
"""

from __future__ import annotations

import functools
import os
import re

import torch

from exlq.errors import ExlqError

#: Shared memory (one block's opt-in maximum, one SM's total) by compute capability, bytes (CUDA C++ Programming
#: Guide, "Technical Specifications per Compute Capability"). Used only where EXLQ_ARCH names an older GPU than the
#: one present; otherwise the device's own properties count.
SHARED_LIMITS = {
    (8, 0): (163 * 1024, 164 * 1024),
    (8, 6): (99 * 1024, 100 * 1024),
    (8, 7): (163 * 1024, 164 * 1024),
    (8, 9): (99 * 1024, 100 * 1024),
    (9, 0): (227 * 1024, 228 * 1024),
    (10, 0): (227 * 1024, 228 * 1024),
    (12, 0): (99 * 1024, 100 * 1024),
}
_ARCH = re.compile(r"sm_(\d{1,2})(\d)")


def parse_arch(setting: str, device_capability: tuple[int, int]) -> tuple[int, int] | None:
    """The capability EXLQ_ARCH=`setting` asks for on a device of `device_capability`; None where it is unset or names
    the device's own. Refused: another spelling, an architecture without a limits entry, or one newer than the device
    (a kernel built for sm_90 cannot run on an sm_80 GPU)."""
    setting = setting.strip()
    if not setting:
        return None
    match = _ARCH.fullmatch(setting)
    if match is None or (capability := (int(match[1]), int(match[2]))) not in SHARED_LIMITS:
        names = ", ".join(f"sm_{a}{b}" for a, b in SHARED_LIMITS)
        raise ExlqError(f"EXLQ_ARCH must be one of {names}, not {setting!r}")
    if capability > device_capability:
        device = "sm_{}{}".format(*device_capability)
        raise ExlqError(f"EXLQ_ARCH={setting} is newer than this GPU ({device}): only an older architecture can be "
                        "run on it")
    return None if capability == device_capability else capability


@functools.cache
def _emulated(index: int) -> tuple[int, int] | None:
    return parse_arch(os.environ.get("EXLQ_ARCH", ""), torch.cuda.get_device_capability(index))


def capability(index: int) -> tuple[int, int]:
    """The compute capability the kernels of GPU `index` are built and routed for (EXLQ_ARCH, else the device's)."""
    return _emulated(index) or torch.cuda.get_device_capability(index)


def compile_arch(index: int) -> str:
    """NVRTC's -arch for GPU `index`: a cubin for the device itself ("sm_90"), or PTX for the architecture EXLQ_ARCH
    stands in for ("compute_80"), which the driver compiles for the device at load."""
    emulated = _emulated(index)
    if emulated is None:
        return "sm_{}{}".format(*torch.cuda.get_device_capability(index))
    return "compute_{}{}".format(*emulated)


@functools.cache
def shared_limits(index: int) -> tuple[int, int]:
    """(one block's opt-in maximum, one SM's total) of shared memory on GPU `index`, bytes: the device's, or the
    smaller ones of the architecture EXLQ_ARCH stands in for."""
    props = torch.cuda.get_device_properties(index)
    own = (getattr(props, "shared_memory_per_block_optin", 227 * 1024),
           getattr(props, "shared_memory_per_multiprocessor", 228 * 1024))
    emulated = _emulated(index)
    if emulated is None:
        return own
    return min(own[0], SHARED_LIMITS[emulated][0]), min(own[1], SHARED_LIMITS[emulated][1])


def describe(index: int) -> str:
    """What the kernels are built for, for reports: "sm_90", or "compute_80 on sm_90 (EXLQ_ARCH)"."""
    own = "sm_{}{}".format(*torch.cuda.get_device_capability(index))
    built = compile_arch(index)
    return own if built == own else f"{built} on {own} (EXLQ_ARCH)"
