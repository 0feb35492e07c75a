"""Every CUDA source compiles through NVRTC for Ampere, Ada, Hopper and Blackwell (sm_100 data-centre parts, sm_120
consumer cards): no GPU needed, so CI runs it."""

from __future__ import annotations

import pytest

from exlq.runtime.kernels.catalog import SOURCES
from exlq.runtime.kernels.compiler import SOURCE_DIR, compile_source, cubin_resources

ARCHES = ("sm_80", "sm_89", "sm_90", "sm_100", "sm_120")
MAX_LOCAL_BYTES = 32  # a thread's stack frame: spilled registers, local arrays
#: Kernels launched with blocks of up to this many threads (add_rms_norm: one row a block, up to 1024 threads) must
#: fit them in an SM's 65536 registers (allocated 8 at a time), or the launch fails with "too many resources
#: requested" (session 21: add_rms_norm took 80 registers on sm_80 and sm_89).
LARGEST_BLOCK = {"add_rms_norm": 1024, "finish_add_rms_norm": 1024}


def test_every_source_is_in_the_catalog():
    on_disk = {p.name for p in SOURCE_DIR.glob("*.cu")}
    assert on_disk == set(SOURCES), "a .cu file that the runtime does not know (or the reverse)"


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_kernel_compiles(source, arch, tmp_path, monkeypatch):
    monkeypatch.setenv("EXLQ_CACHE_DIR", str(tmp_path))  # a real compile, not a cache hit
    for instances in SOURCES[source]:
        module = compile_source(source, arch, list(instances))
        assert module.image[:4] == b"\x7fELF"
        assert set(module.names) == set(instances) and all(module.names.values())
        again = compile_source(source, arch, list(instances))  # now from the disk cache
        assert again.image == module.image and again.names == module.names
        # No instance keeps more than a few words in local memory (spills are a silent slowdown: session 14's warp
        # GEMV spilled 40-80 bytes at its register bound; bench/kernel_resources.py prints the numbers). Some GEMV
        # instances keep 8-32 bytes under their register bounds, which ptxas places differently per architecture.
        assert_resources(module, arch)


def assert_resources(module, arch: str) -> None:
    """Every instance of `module` within the register bound, its block within an SM's registers, no more than a few
    words of local memory."""
    registers, local = cubin_resources(module.image)
    for instance, mangled in module.names.items():
        assert 0 < registers[mangled] <= 255, instance
        assert local.get(mangled, 0) <= MAX_LOCAL_BYTES, f"{instance} uses {local[mangled]} bytes of local memory on {arch}"
        threads = LARGEST_BLOCK.get(instance.partition("<")[0], 0)
        assert -(-registers[mangled] // 8) * 8 * threads <= 65536, f"{instance}: {registers[mangled]} registers on {arch}"


def _descriptor_cases():
    from exlq.runtime.kernels import exl2_ops, exl2_stream_ops

    return [("exl2_common.cuh", (exl2_ops.GemvMatrix, exl2_ops.GemvGroup)),
            ("exl2_stream.cu", (exl2_stream_ops.StreamMatrix, exl2_stream_ops.StreamGroup, exl2_stream_ops.NormFold))]


@pytest.mark.parametrize("source, structs", _descriptor_cases())
def test_gemv_descriptors_match_the_kernel_structs(source, structs):
    """The GEMVs' matrix descriptors are filled by ctypes on the host and read as C structs by the kernel: the
    sizes the .cu asserts at compile time must be the ctypes ones, and the fields the same, in the same order."""
    import ctypes
    import re

    from exlq.runtime.kernels.exl2_ops import MAX_GROUP

    text = (SOURCE_DIR / source).read_text()
    asserted = {m[0]: int(m[1]) for m in re.findall(r"static_assert\(sizeof\((\w+)\) == (\d+),", text)}
    assert asserted == {struct.__name__: ctypes.sizeof(struct) for struct in structs}
    for struct in structs:
        body = re.search(r"struct %s \{(.*?)\};" % struct.__name__, text, re.S)[1]
        body = re.sub(r"//[^\n]*", "", body)
        declared = [name for declaration in body.split(";") for name in re.findall(r"(\w+)(?:\[\w+\])?\s*(?:,|$)", declaration.strip())]
        assert declared == [name for name, _ in struct._fields_]
    assert f"#define MAX_GROUP {MAX_GROUP}" in (SOURCE_DIR / "exl2_common.cuh").read_text()


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


def test_the_carveout_probe_is_off_by_default_and_matches_kernel_names():
    """EXLQ_CARVEOUT (a tuning probe): unset, every kernel keeps the driver's L1 / shared split; PCT applies to all;
    NAME=PCT to the instances whose name starts with NAME, the first that matches; anything else is refused."""
    from exlq.errors import ExlqError
    from exlq.runtime.kernels import launch

    stream, gemv = "exl2_stream<fp16_t, 2>", "exl2_gemv<fp16_t, 1, 2>"
    assert launch.preferred_carveout(stream, "") is None
    assert launch.preferred_carveout(gemv, "75") == 75
    setting = "exl2_stream=100, exl2_gemv_group=50,exl2_gemv=0"
    assert [launch.preferred_carveout(n, setting) for n in (stream, gemv, "exl2_gemv_group<fp16_t, 1, 2>")] == [100, 0, 50]
    assert launch.preferred_carveout("rope_store<fp16_t>", setting) is None
    for bad in ("101", "exl2_stream=half", "exl2_stream:100"):
        with pytest.raises(ExlqError, match="EXLQ_CARVEOUT"):
            launch.preferred_carveout(stream, bad)


def test_a_refused_programmatic_launch_falls_back_to_a_plain_one(monkeypatch):
    """A driver that refuses cuLaunchKernelEx's programmatic launch (older ones in graph captures) must not stop the
    model: one warning, the same launch without it, and plain launches on that device from then on."""
    import types

    import torch
    from cupy_backends.cuda.api import driver

    from exlq.runtime.kernels import launch

    plain, attempts = [], []
    monkeypatch.delenv("EXLQ_PDL", raising=False)
    monkeypatch.setattr(launch, "_hopper_or_newer", lambda index: True)
    monkeypatch.setattr(launch, "_pdl_refused", set())
    monkeypatch.setattr(launch, "_launch_ex", lambda: lambda *args: attempts.append(args) or 801)  # NOT_SUPPORTED
    monkeypatch.setattr(launch, "device_index", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(driver, "launchKernel", lambda function, *rest: plain.append(function))
    with pytest.warns(RuntimeWarning, match="programmatic dependent launch"):
        launch.launch(7, (2,), (64,), (1, 2.0), torch.device("cuda"), overlap=True)
    assert len(attempts) == 1 and plain == [7] and not launch.pdl_enabled(0)
    launch.launch(8, (2,), (64,), (1,), torch.device("cuda"), overlap=True)  # no second attempt, no warning
    assert len(attempts) == 1 and plain == [7, 8]


@pytest.mark.parametrize("refuses", ["programmatic launch", "cluster"])
def test_a_refused_cluster_launch_raises_and_keeps_programmatic_launch(monkeypatch, refuses):
    """A cluster launch with programmatic launch that the driver refuses: tried again with the cluster alone. If that
    works, programmatic launch was the fault (a warning, off from then on); if not, the cluster was (an ExlqError for
    the caller's fallback), and programmatic launch stays on."""
    import types

    import torch

    from exlq.errors import ExlqError
    from exlq.runtime.kernels import launch

    attempts = []

    def launch_ex(config, function, params, extra):
        ids = [config._obj.attrs[i].id for i in range(config._obj.num_attrs)]
        attempts.append(ids)
        pdl = launch.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION in ids
        return 801 if pdl or refuses == "cluster" else 0

    monkeypatch.delenv("EXLQ_PDL", raising=False)
    monkeypatch.setattr(launch, "_hopper_or_newer", lambda index: True)
    monkeypatch.setattr(launch, "_pdl_refused", set())
    monkeypatch.setattr(launch, "_launch_ex", lambda: launch_ex)
    monkeypatch.setattr(launch, "device_index", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: types.SimpleNamespace(cuda_stream=0))
    cluster_id, pdl_id = launch.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, launch.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    if refuses == "cluster":
        with pytest.raises(ExlqError, match="cluster"):
            launch.launch(7, (8, 8), (128,), (1,), torch.device("cuda"), overlap=True, cluster=(1, 8, 1))
        assert launch.pdl_enabled(0)
    else:
        with pytest.warns(RuntimeWarning, match="programmatic dependent launch"):
            launch.launch(7, (8, 8), (128,), (1,), torch.device("cuda"), overlap=True, cluster=(1, 8, 1))
        assert not launch.pdl_enabled(0)
    assert attempts == [[cluster_id, pdl_id], [cluster_id]]


def _variant_cases():
    from exlq.runtime.kernels import exl2_stream_ops
    from exlq.runtime.kernels.catalog import VARIANTS

    hopper_only = {exl2_stream_ops.SOURCE}  # its kernels trap below sm_90: the variant changes nothing there
    return [(name, source, arch) for name, sources in sorted(VARIANTS.items()) for source in sources
            for arch in ("sm_80", "sm_90") if arch == "sm_90" or source not in hopper_only]


@pytest.mark.parametrize("name, source, arch", _variant_cases())
def test_kernel_variants_compile_and_change_the_build(name, source, arch, tmp_path, monkeypatch):
    """Every prepared variant (EXLQ_NVRTC_DEFINES) compiles without spills, and is its own build: another image under
    another cache key, so a GPU session that flips the setting times the variant, not a cached default."""
    from exlq.runtime.kernels.catalog import SOURCES

    monkeypatch.setenv("EXLQ_CACHE_DIR", str(tmp_path))
    instances = list(SOURCES[source][0])
    monkeypatch.delenv("EXLQ_NVRTC_DEFINES", raising=False)
    default = compile_source(source, arch, instances)
    monkeypatch.setenv("EXLQ_NVRTC_DEFINES", name)
    variant = compile_source(source, arch, instances)
    assert variant.image != default.image
    assert len(list((tmp_path / "kernels" / arch).glob("*.json"))) == 2
    assert_resources(variant, arch)


def test_variant_names_are_checked(monkeypatch):
    """EXLQ_NVRTC_DEFINES takes the catalog's variant names, comma or space separated; a name it does not know is an
    error, not a silent default build."""
    from exlq.errors import ExlqError
    from exlq.runtime.kernels.catalog import VARIANTS
    from exlq.runtime.kernels.compiler import variant_options

    name = sorted(VARIANTS)[0]
    monkeypatch.setenv("EXLQ_NVRTC_DEFINES", f" {name}, {name} ")
    assert variant_options() == (f"-D{name}",)
    monkeypatch.setenv("EXLQ_NVRTC_DEFINES", "")
    assert variant_options() == ()
    monkeypatch.setenv("EXLQ_NVRTC_DEFINES", f"{name},NO_SUCH_VARIANT")
    with pytest.raises(ExlqError, match="NO_SUCH_VARIANT"):
        variant_options()


def test_variants_reach_only_their_sources(monkeypatch):
    """A variant's -D goes to the sources the catalog lists for it, the only ones that test the macro: the others keep
    their default builds and cache keys (a GPU session's precompiled cache holds no other builds of them)."""
    from exlq.runtime.kernels.catalog import SOURCES, VARIANTS
    from exlq.runtime.kernels.compiler import read_source, variant_options

    for name, listed in VARIANTS.items():
        monkeypatch.setenv("EXLQ_NVRTC_DEFINES", name)
        for source in SOURCES:
            text, headers = read_source(source)
            assert not any(name in t for t in (text, *headers.values())) or source in listed, f"{source} tests {name}"
            assert variant_options(source) == ((f"-D{name}",) if source in listed else ())
