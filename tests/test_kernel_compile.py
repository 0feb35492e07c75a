"""Every CUDA source compiles through NVRTC for Ampere, Ada and Hopper: no GPU needed, so CI runs it."""

from __future__ import annotations

import pytest

from exlq.runtime.kernels.catalog import SOURCES
from exlq.runtime.kernels.compiler import SOURCE_DIR, compile_source, cubin_resources

ARCHES = ("sm_80", "sm_89", "sm_90")
MAX_LOCAL_BYTES = 32  # a thread's stack frame: spilled registers, local arrays


def test_every_source_is_in_the_catalog():
    on_disk = {p.name for p in SOURCE_DIR.glob("*.cu")}
    assert on_disk == set(SOURCES), "a .cu file that the runtime does not know (or the reverse)"


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_kernel_compiles(source, arch, tmp_path, monkeypatch):
    monkeypatch.setenv("EXLQ_CACHE_DIR", str(tmp_path))  # a real compile, not a cache hit
    for instances in SOURCES[source]:
        module = compile_source(source, arch, list(instances))
        assert module.cubin[:4] == b"\x7fELF"
        assert set(module.names) == set(instances) and all(module.names.values())
        again = compile_source(source, arch, list(instances))  # now from the disk cache
        assert again.cubin == module.cubin and again.names == module.names
        # No instance keeps more than a few words in local memory (spills are a silent slowdown: session 14's warp
        # GEMV spilled 40-80 bytes at its register bound; bench/kernel_resources.py prints the numbers). Some GEMV
        # instances keep 8-32 bytes under their register bounds, which ptxas places differently per architecture.
        registers, local = cubin_resources(module.cubin)
        for instance, mangled in module.names.items():
            assert 0 < registers[mangled] <= 255, instance
            assert local.get(mangled, 0) <= MAX_LOCAL_BYTES, f"{instance} uses {local[mangled]} bytes of local memory on {arch}"


def test_gemv_descriptors_match_the_kernel_structs():
    """The GEMV's matrix descriptors are filled by ctypes on the host and read as C structs by the kernel: the
    sizes the .cu asserts at compile time must be the ctypes ones, and the fields the same, in the same order."""
    import ctypes
    import re

    from exlq.runtime.kernels.exl2_ops import MAX_GROUP, GemvGroup, GemvMatrix

    text = (SOURCE_DIR / "exl2_common.cuh").read_text()  # shared by both GEMV kernels
    asserted = {m[0]: int(m[1]) for m in re.findall(r"static_assert\(sizeof\((\w+)\) == (\d+),", text)}
    assert asserted == {"GemvMatrix": ctypes.sizeof(GemvMatrix), "GemvGroup": ctypes.sizeof(GemvGroup)}
    for struct in (GemvMatrix, GemvGroup):
        body = re.search(r"struct %s \{(.*?)\};" % struct.__name__, text, re.S)[1]
        body = re.sub(r"//[^\n]*", "", body)
        declared = [name for declaration in body.split(";") for name in re.findall(r"(\w+)(?:\[\w+\])?\s*(?:,|$)", declaration.strip())]
        assert declared == [name for name, _ in struct._fields_]
    assert f"#define MAX_GROUP {MAX_GROUP}" in text


def test_launch_config_structs_have_the_cuda_h_layout():
    """cuLaunchKernelEx (programmatic dependent launch) reads CUlaunchConfig and CUlaunchAttribute as laid out in
    cuda.h on 64-bit hosts: a wrong offset would launch with garbage dimensions or attributes."""
    import ctypes

    from exlq.runtime.kernels.launch import _LaunchAttribute, _LaunchConfig

    assert ctypes.sizeof(_LaunchAttribute) == 72 and _LaunchAttribute.value.offset == 8  # id, pad, 64-byte union
    assert ctypes.sizeof(_LaunchConfig) == 56
    assert (_LaunchConfig.shared_bytes.offset, _LaunchConfig.stream.offset, _LaunchConfig.attrs.offset,
            _LaunchConfig.num_attrs.offset) == (24, 32, 40, 48)


def test_programmatic_launch_is_on_by_default_on_hopper_and_off_by_switch(monkeypatch):
    from exlq.runtime.kernels import launch

    monkeypatch.delenv("EXLQ_PDL", raising=False)
    monkeypatch.setattr(launch, "_hopper_or_newer", lambda index: True)
    assert launch.pdl_enabled(0)
    monkeypatch.setenv("EXLQ_PDL", "0")
    assert not launch.pdl_enabled(0)
    monkeypatch.setenv("EXLQ_PDL", "1")
    monkeypatch.setattr(launch, "_hopper_or_newer", lambda index: False)  # Ampere, Ada: plain launches
    assert not launch.pdl_enabled(0)
