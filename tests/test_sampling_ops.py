"""The sampling kernels' host side, on the CPU: how rows are cut into pieces and what the kernels are told."""

from __future__ import annotations

import ctypes

import pytest
import torch

from exlq.runtime.kernels import sampling_ops


@pytest.mark.parametrize("vocab", [8, 1000, 4096, 4104, 32000, 49152, 128256, 151936, 262144, 524288])
def test_pieces_cover_the_row_without_an_empty_block(vocab):
    count, chunk = sampling_ops.pieces(vocab)
    assert chunk % 8 == 0 and chunk <= sampling_ops.SEEN_TOKENS
    assert count <= sampling_ops.MAX_PIECES
    assert (count - 1) * chunk < vocab <= count * chunk


def test_row_workspace_keeps_the_block_statistics_aligned():
    for count in (1, 12, 38, 64):  # a row's float4 statistics start after the fixed words, rows one after another
        assert (sampling_ops.row_words(count) * 8) % 16 == 0 and ((sampling_ops.row_words(0)) * 8) % 16 == 0


def test_kernel_arguments_match_the_cuda_struct_and_carry_the_penalty_window():
    assert ctypes.sizeof(sampling_ops.SampleArgs) == 104  # static_assert in cuda/sampling.cu
    logits = torch.zeros(2, 64, dtype=torch.float16)
    work, out = torch.zeros(8), torch.zeros(2, dtype=torch.long)
    plain = sampling_ops._args(logits, work, out, None)
    assert plain.history is None and plain.penalty == 1.0 and plain.chunk == 64 and plain.row_stride == 64
    window = torch.zeros(2, 10, dtype=torch.long)[:, :7]  # a slice of a longer buffer
    recent = sampling_ops._args(logits, work, out, sampling_ops.Penalty(window, 1.25, 5))
    assert (recent.history_stride, recent.history_start, recent.history_end) == (10, 2, 7)
    assert recent.penalty == 1.25 and recent.history == window.data_ptr()
    assert sampling_ops._args(logits, work, out, sampling_ops.Penalty(window, 1.25, -1)).history_start == 0
    with pytest.raises(ValueError, match="int64"):
        sampling_ops._args(logits, work, out, sampling_ops.Penalty(window.int(), 1.25))
