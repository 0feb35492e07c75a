"""Which one-token steps the decode attention kernel takes (the rest stays on SDPA); the kernel itself is tested
against SDPA on the GPU (test_kernels_gpu.py)."""

import pytest
import torch

from exlq.runtime.kernels import attention_ops


def cache_views(dim=64, heads=14, kv_heads=2, span=256, capacity=1024, bsz=1, dtype=torch.float16):
    q = torch.zeros(bsz, heads, 1, dim, dtype=dtype)
    k, v = (torch.zeros(bsz, kv_heads, capacity, dim, dtype=dtype)[:, :, :span] for _ in range(2))
    return q, k, v


def test_cache_prefix_views_take_the_kernel():
    """Left-padded batches too: the kernel starts each row past its padding (AttentionBatch.attend passes it)."""
    assert attention_ops.applies(*cache_views())
    assert attention_ops.applies(*cache_views(dim=128, heads=32, kv_heads=8, bsz=2, dtype=torch.bfloat16))
    assert attention_ops.applies(*cache_views(span=32768, capacity=32768))  # any length: chunks in turn


@pytest.mark.parametrize("change", ["two tokens", "head size 80", "9 a group", "rows not contiguous", "mixed dtypes",
                                    "switched off"])
def test_other_steps_stay_on_sdpa(change, monkeypatch):
    q, k, v = cache_views()
    if change == "two tokens":
        q = torch.zeros(1, 14, 2, 64, dtype=torch.float16)
    elif change == "head size 80":
        q, k, v = cache_views(dim=80)
    elif change == "9 a group":
        q, k, v = cache_views(heads=18)
    elif change == "rows not contiguous":
        k, v = (torch.zeros(1, 2, 64, 512, dtype=torch.float16)[..., ::2].transpose(2, 3) for _ in range(2))
    elif change == "mixed dtypes":
        v = v.to(torch.bfloat16)
    else:
        monkeypatch.setenv("EXLQ_DECODE_ATTENTION", "0")
    assert not attention_ops.applies(q, k, v)


def test_chunks_of_64_keys_unless_forced(monkeypatch):
    monkeypatch.delenv("EXLQ_ATTENTION_CHUNK", raising=False)
    assert attention_ops.chunk_size() == 64
    monkeypatch.setenv("EXLQ_ATTENTION_CHUNK", "32")
    assert attention_ops.chunk_size() == 32
    monkeypatch.setenv("EXLQ_ATTENTION_CHUNK", "48")
    with pytest.raises(Exception, match="EXLQ_ATTENTION_CHUNK"):
        attention_ops.chunk_size()


def test_a_cluster_of_blocks_a_head_on_hopper(monkeypatch):
    """Thread-block clusters need sm_90: one block walks a head's chunks before it, after it a cluster of 8, or of 16
    past LONG_SPAN keys."""
    monkeypatch.delenv("EXLQ_ATTENTION_RANKS", raising=False)
    cpu = torch.device("cpu")
    monkeypatch.setattr(attention_ops, "hopper_or_newer", lambda device: False)
    assert attention_ops.ranks(cpu, 8192) == 1
    monkeypatch.setattr(attention_ops, "hopper_or_newer", lambda device: True)
    assert attention_ops.LONG_SPAN == 1024
    assert [attention_ops.ranks(cpu, span) for span in (1, 1024, 1025, 8192)] == [8, 8, 16, 16]
    monkeypatch.setenv("EXLQ_ATTENTION_RANKS", "2")
    assert attention_ops.ranks(cpu, 8192) == 2
    monkeypatch.setenv("EXLQ_ATTENTION_RANKS", "3")
    with pytest.raises(Exception, match="EXLQ_ATTENTION_RANKS"):
        attention_ops.ranks(cpu, 8192)


def test_a_refused_cluster_launch_falls_back_to_one_block_a_head(monkeypatch):
    """A driver or GPU slice that refuses the cluster launch: the same kernel again with one block a head (a warning),
    and one block a head on that device from then on."""
    calls = []

    def launch(function, grid, block, args, device, overlap=False, shared_bytes=0, cluster=None):
        calls.append((grid, cluster))
        if cluster is not None:
            raise attention_ops.ExlqError("cuLaunchKernelEx failed with CUresult 912")

    monkeypatch.delenv("EXLQ_ATTENTION_RANKS", raising=False)
    monkeypatch.setattr(attention_ops, "hopper_or_newer", lambda device: True)
    monkeypatch.setattr(attention_ops, "kernel", lambda *args: 0)
    monkeypatch.setattr(attention_ops, "launch", launch)
    monkeypatch.setattr(attention_ops, "_clusters_refused", set())
    q, k, v = cache_views(dim=128, heads=32, kv_heads=8)
    with pytest.warns(RuntimeWarning, match="one block a head"):
        attention_ops.decode_attention(q, k, v, 100, None)
    attention_ops.decode_attention(q, k, v, 100, None)
    assert calls == [((8, 8, 1), (1, 8, 1)), ((8, 1, 1), None), ((8, 1, 1), None)]


@pytest.mark.parametrize("dim, span, push, expected", [(64, 256, True, True), (128, 256, True, False),
                                                       (128, 2048, True, True), (64, 256, False, False),
                                                       (128, 2048, False, False)])
def test_clusters_push_at_head_size_64_and_in_clusters_of_16(dim, span, push, expected, monkeypatch):
    """The cluster's merge is the launch's last argument: a push at head size 64 (faster in the small models' steps),
    a pull at 128 in clusters of 8 (the 8B's step did not gain by pushing) but a push in clusters of 16 (past
    LONG_SPAN: it did), a pull everywhere with EXLQ_ATTENTION_PUSH=0 (PUSH_MERGE off)."""
    launches = []
    monkeypatch.setattr(attention_ops, "PUSH_MERGE", push)
    monkeypatch.setattr(attention_ops, "hopper_or_newer", lambda device: True)
    monkeypatch.setattr(attention_ops, "kernel", lambda *args: 0)
    monkeypatch.setattr(attention_ops, "launch", lambda function, grid, block, args, *rest, **options:
                        launches.append(args))
    attention_ops.decode_attention(*cache_views(dim=dim, heads=8, kv_heads=2, span=span, capacity=span), 100, None)
    (args,) = launches
    ranks = 16 if span > attention_ops.LONG_SPAN else 8
    assert args[-1] is expected and attention_ops.pushes(dim, ranks) is expected
