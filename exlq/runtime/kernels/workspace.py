"""Scratch memory of kernels that reduce across blocks (e.g. the split-K GEMV): per device an fp32 buffer and an int32
counter buffer, zero between launches (the kernels re-zero what they use)."""

from __future__ import annotations

import torch


class Workspace:
    """Grows to the largest request seen. A replaced pair stays alive: CUDA graphs captured before the growth (e.g.
    at a smaller batch) hold its addresses, and freeing it would let their replays write into reused memory."""

    def __init__(self) -> None:
        self._buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._retired: list[tuple[torch.Tensor, torch.Tensor]] = []

    def get(self, device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
        have = self._buffers.get(device)
        if have is None or have[0].numel() < floats or have[1].numel() < counters:
            if have is not None:
                self._retired.append(have)
                floats, counters = max(floats, have[0].numel()), max(counters, have[1].numel())
            have = (torch.zeros(floats, dtype=torch.float32, device=device),
                    torch.zeros(counters, dtype=torch.int32, device=device))
            self._buffers[device] = have
        return have
