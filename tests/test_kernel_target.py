"""EXLQ_ARCH: an older architecture's kernels and paths on a newer GPU (the device is stubbed: no GPU needed)."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import forget_kernel_architecture
from exlq.errors import ExlqError
from exlq.runtime import kernels
from exlq.runtime.kernels import exl2_stream_ops, launch, target
from exlq.runtime.kernels.compiler import compile_source


@pytest.mark.parametrize("setting, device, expected", [
    ("", (9, 0), None), ("  ", (8, 6), None),
    ("sm_80", (9, 0), (8, 0)), ("sm_86", (9, 0), (8, 6)), ("sm_89", (9, 0), (8, 9)), ("sm_80", (8, 9), (8, 0)),
    ("sm_90", (9, 0), None), (" sm_89 ", (8, 9), None),  # the device's own: nothing stood in
    ("sm_90", (12, 0), (9, 0)), ("sm_100", (12, 0), (10, 0)), ("sm_120", (12, 0), None),  # a Blackwell card
])
def test_the_setting_names_an_architecture_no_newer_than_the_device(setting, device, expected):
    assert target.parse_arch(setting, device) == expected


@pytest.mark.parametrize("setting, device, message", [
    ("sm_90", (8, 9), "newer than this GPU (sm_89)"), ("sm_89", (8, 6), "newer than this GPU (sm_86)"),
    ("sm_100", (9, 0), "newer than this GPU (sm_90)"), ("sm_75", (9, 0), "must be one of sm_80, sm_86"),
    ("80", (9, 0), "must be one of"), ("compute_80", (9, 0), "must be one of"), ("SM_80", (9, 0), "must be one of"),
])
def test_other_settings_are_refused_with_the_choices(setting, device, message):
    with pytest.raises(ExlqError, match=re.escape(message)):
        target.parse_arch(setting, device)


class _Props:
    multi_processor_count = 132
    shared_memory_per_block_optin = 227 * 1024
    shared_memory_per_multiprocessor = 228 * 1024


@pytest.fixture
def hopper(monkeypatch):
    """A stubbed sm_90 GPU 0 with the H100's shared memory; EXLQ_ARCH unset; the arch caches empty before and after."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: _Props())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(kernels, "_cupy_importable", lambda: True)
    monkeypatch.delenv("EXLQ_ARCH", raising=False)
    forget_kernel_architecture()
    yield monkeypatch
    forget_kernel_architecture()


def test_the_device_itself_without_the_setting(hopper):
    cuda = torch.device("cuda", 0)
    assert target.capability(0) == (9, 0) and target.compile_arch(0) == "sm_90" and launch.arch_of(cuda) == "sm_90"
    assert target.shared_limits(0) == (227 * 1024, 228 * 1024) and target.describe(0) == "sm_90"
    assert launch.hopper_or_newer(cuda) and kernels.enabled(cuda)


@pytest.mark.parametrize("setting, block, sm", [("sm_80", 163 * 1024, 164 * 1024), ("sm_89", 99 * 1024, 100 * 1024)])
def test_a_stand_in_builds_ptx_and_takes_its_paths_and_limits(hopper, setting, block, sm):
    """Kernels built as PTX of the older architecture, no Hopper-only path (programmatic launch, clusters, bulk
    copies), the older GPU's shared memory (so the stages a streamed block could take), and reports that say so."""
    hopper.setenv("EXLQ_ARCH", setting)
    cuda = torch.device("cuda", 0)
    virtual = setting.replace("sm_", "compute_")
    assert target.compile_arch(0) == virtual and launch.arch_of(cuda) == virtual
    assert target.capability(0) == (int(setting[3]), int(setting[4]))
    assert target.describe(0) == f"{virtual} on sm_90 (EXLQ_ARCH)"
    assert not launch.hopper_or_newer(cuda) and not launch.pdl_enabled(0) and kernels.enabled(cuda)
    assert target.shared_limits(0) == (block, sm)
    assert exl2_stream_ops.sm_limits(0) == (132, sm)
    assert exl2_stream_ops.block_shared_limit(0) < block


def test_a_bad_setting_stops_the_first_kernel_use(hopper):
    hopper.setenv("EXLQ_ARCH", "sm_101")
    with pytest.raises(ExlqError, match="EXLQ_ARCH must be one of"):
        kernels.enabled(torch.device("cuda", 0))


def test_ptx_for_a_virtual_architecture_compiles_and_is_cached(tmp_path, monkeypatch):
    """What EXLQ_ARCH loads: PTX text for compute_80 (the driver compiles it for the GPU present), kept in the cache
    beside the cubins under its own architecture."""
    monkeypatch.setenv("EXLQ_CACHE_DIR", str(tmp_path))
    instances = ["silu_mul<fp16_t>"]
    module = compile_source("fused.cu", "compute_80", instances)
    text = module.image.decode()
    assert text.startswith("//") and ".target sm_80" in text and module.names[instances[0]] in text
    assert [p.suffix for p in sorted((tmp_path / "kernels" / "compute_80").iterdir())] == [".json", ".ptx"]
    again = compile_source("fused.cu", "compute_80", instances)
    assert again.image == module.image and again.names == module.names
