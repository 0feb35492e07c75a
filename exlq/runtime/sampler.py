"""Token sampling in torch: greedy, temperature, top-k, top-p, min-p, repetition penalty. On the GPU, greedy takes
the argmax kernel of `kernels.sampling_ops` and sampling its sampling kernels, which draw from the same distribution
as this module's torch path (with their own random numbers: the race hashed from the seed and a count of draws, so
a seeded run repeats).

Everything is done with batched tensor ops on the logits' own device (no per-row host syncs),
so the same code serves the CPU reference path and GPU generation. `Sampler.probabilities()`
exposes the exact distribution that `Sampler.sample()` draws from, which tests use as the
reference and speculative decoding needs for acceptance tests.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import torch

from exlq.errors import ExlqError
from exlq.runtime.kernels import sampling_ops

# Slack for top-p's cumulative-probability comparison: softmax in float32 is only accurate to a
# few ulps, so a prefix whose mass is top_p "on paper" must not be rejected over rounding noise.
_TOP_P_TOLERANCE = 1e-6


@dataclass
class SamplerSettings:
    """How to pick the next token; defaults are plain greedy decoding."""

    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    repetition_range: int = -1  # most recent history tokens penalized; -1 = all, 0 = off
    seed: int | None = None  # None = fresh entropy per Sampler

    def validate(self, name: Callable[[str], str] = lambda field: f"{field}=") -> None:
        """Raise ExlqError naming the first out-of-range setting, so the CLI can report it; `name(field)` is how the
        message names it (the field by default, "temperature=-1.0"; the CLI passes its option, "--temperature -1.0")."""
        _check_real(name("temperature"), self.temperature, lambda v: v >= 0, "must be >= 0 (0 = greedy)")
        _check_int(name("top_k"), self.top_k, "must be >= 0 (0 = off)", minimum=0)
        _check_real(name("top_p"), self.top_p, lambda v: 0 < v <= 1, "must be in (0, 1] (1 = off)")
        _check_real(name("min_p"), self.min_p, lambda v: 0 <= v < 1, "must be in [0, 1) (0 = off)")
        _check_real(
            name("repetition_penalty"),
            self.repetition_penalty,
            lambda v: v > 0,
            "must be > 0 (1 = off, > 1 discourages repeats)",
        )
        _check_int(name("repetition_range"), self.repetition_range, "must be >= -1 (-1 = whole history, 0 = off)",
                   minimum=-1)
        if self.seed is not None:
            _check_int(name("seed"), self.seed, "must be an integer in [0, 2**64) or unset", minimum=0)
            if self.seed >= 2**64:
                raise ExlqError(f"{name('seed')}{self.seed!r} must be an integer in [0, 2**64) or unset")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (no randomness, no distribution needed)."""
        return self.temperature == 0 or self.top_k == 1

    def describe(self) -> str:
        """The settings that act, in words: "greedy", or e.g. "temperature 0.8, top-p 0.95, min-p 0.05"."""
        if self.greedy:
            parts = ["greedy"]
        else:
            parts = [f"temperature {self.temperature:g}"]
            parts += [f"top-k {self.top_k}"] if self.top_k > 0 else []
            parts += [f"top-p {self.top_p:g}"] if self.top_p < 1 else []
            parts += [f"min-p {self.min_p:g}"] if self.min_p > 0 else []
        if self.repetition_penalty != 1 and self.repetition_range != 0:
            parts.append(f"repetition penalty {self.repetition_penalty:g}")
        return ", ".join(parts)


def _check_real(name: str, value: object, in_range: Callable[[float], bool], rule: str) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or not in_range(value):  # type: ignore[arg-type]
        raise ExlqError(f"{name}{value!r} is out of range: it {rule}")


def _check_int(name: str, value: object, rule: str, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ExlqError(f"{name}{value!r} is out of range: it {rule}")


# ---------------------------------------------------------------------------------------------
# Pure transforms, each [B, V] -> [B, V]; usable on their own (tests, speculative decoding).


def penalizes(history: torch.Tensor | None, penalty: float, repetition_range: int) -> bool:
    """Whether a repetition penalty changes any logit (a penalty, a range and some history)."""
    return not (history is None or penalty == 1.0 or repetition_range == 0 or history.shape[-1] == 0)


def apply_repetition_penalty(
    logits: torch.Tensor, history: torch.Tensor | None, penalty: float, repetition_range: int = -1
) -> torch.Tensor:
    """Penalize every token id seen in the last `repetition_range` history tokens (HF convention).

    A seen token's logit is divided by `penalty` if positive, multiplied if not; it is penalized
    once however often it occurs. History ids outside [0, V) (e.g. -1 padding) are ignored.
    """
    if not penalizes(history, penalty, repetition_range):
        return logits
    if repetition_range > 0:
        history = history[:, -repetition_range:]
    seen = token_presence(history.to(logits.device), logits.shape[-1])
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def token_presence(history: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool [B, V]: which ids occur in each row of `history` (out-of-vocab ids ignored)."""
    history = history.long()
    valid = (history >= 0) & (history < vocab_size)
    counts = torch.zeros(history.shape[0], vocab_size, dtype=torch.int32, device=history.device)
    # scatter_add of 0/1 is order-independent (unlike scatter_), so this is deterministic on GPU.
    counts.scatter_add_(1, history.clamp(0, vocab_size - 1), valid.to(torch.int32))
    return counts > 0


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits per row (others -> -inf); k <= 0 or k >= V is off.

    Among logits tied at the k-th place, torch.topk decides which survive, so exactly k remain.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    keep_ids = torch.topk(logits, k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, keep_ids, True)
    return logits.masked_fill(~keep, -math.inf)


def top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool [B, V]: the smallest highest-probability set whose mass reaches top_p (top token always)."""
    if top_p >= 1.0:
        return probs > 0
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # exclusive prefix sum
    keep_sorted = mass_before < top_p - _TOP_P_TOLERANCE
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)


def min_p_mask(probs: torch.Tensor, min_p: float) -> torch.Tensor:
    """Bool [B, V]: tokens with p >= min_p * max(p); the top token always qualifies (min_p < 1)."""
    if min_p <= 0.0:
        return probs > 0
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return probs >= threshold


class Sampler:
    """Draws next tokens according to `SamplerSettings`, with a private, reproducible RNG."""

    def __init__(self, settings: SamplerSettings | None = None) -> None:
        self.settings = settings if settings is not None else SamplerSettings()
        self.settings.validate()
        # Unseeded samplers still get a private generator (never the global RNG), seeded once
        # from OS entropy; the seed is kept so a run can be reported and replayed.
        self.seed: int = self.settings.seed if self.settings.seed is not None else secrets.randbits(63)
        self._generator: torch.Generator | None = None
        self._draw_count = 0

    def _generator_for(self, device: torch.device) -> torch.Generator:
        """The private generator, created lazily on the logits' device (multinomial needs that)."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    @staticmethod
    def _check_shapes(logits: torch.Tensor, history: torch.Tensor | None) -> None:
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        if history is not None and (history.dim() != 2 or history.shape[0] != logits.shape[0]):
            raise ValueError(
                f"history must be [batch, tokens] with batch {logits.shape[0]}, got shape {tuple(history.shape)}"
            )

    def _penalized(self, logits: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        self._check_shapes(logits, history)
        s = self.settings
        return apply_repetition_penalty(logits.float(), history, s.repetition_penalty, s.repetition_range)

    def probabilities(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """The final float32 [B, V] distribution `sample()` draws from (one-hot when greedy)."""
        logits = self._penalized(logits, history)
        if self.settings.greedy:
            return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
        return self._filtered_probs(logits)

    def _filtered_probs(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.settings
        # Shift so the max is 0 before dividing: a tiny temperature then can't overflow to inf.
        scaled = (logits - logits.amax(dim=-1, keepdim=True)) / s.temperature
        probs = torch.softmax(top_k_filter(scaled, s.top_k), dim=-1)
        keep = top_p_mask(probs, s.top_p) & min_p_mask(probs, s.min_p)
        probs = probs * keep
        return probs / probs.sum(dim=-1, keepdim=True)

    def sample(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """Next token id per row: int64 [B], on the logits' device."""
        s = self.settings
        self._check_shapes(logits, history)
        penalty = None
        if penalizes(history, s.repetition_penalty, s.repetition_range):
            ids = history.long()
            ids = ids if ids.stride(-1) == 1 else ids.contiguous()  # the kernels read rows of contiguous ids
            penalty = sampling_ops.Penalty(ids, s.repetition_penalty, s.repetition_range)
        if sampling_ops.applies(logits):  # the logits as they are (no float32 copy); the kernels apply the penalty
            if s.greedy:
                return sampling_ops.argmax_rows(logits, penalty)
            self._draw_count += 1
            return sampling_ops.sample_rows(logits, s.temperature, s.top_p, s.min_p, top_k=s.top_k, seed=self.seed,
                                            step=self._draw_count, penalty=penalty)  # fmt: skip
        if penalty:
            logits = self._penalized(logits, history)
        if s.greedy:
            return logits.argmax(dim=-1)
        return self.draw(self._filtered_probs(logits.float()))

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token id per row [B] from probabilities [B, V] (normalized or not; e.g. a speculative residual).

        The exponential race, argmax p_i / E_i with E_i ~ Exp(1), picks i with probability p_i / Σp, as
        torch.multinomial does (for one sample it runs the same race) but without multinomial's input check,
        which reads a device value and so makes the host wait for the GPU.
        """
        race = torch.empty_like(probs, dtype=torch.float32).exponential_(generator=self._generator_for(probs.device))
        return (probs.float() / race.clamp_min_(1e-30)).argmax(dim=-1)

    def uniforms(self, count: int, device: torch.device) -> torch.Tensor:
        """`count` uniform numbers in [0, 1) from the private generator, on `device` (no host wait)."""
        return torch.rand(count, generator=self._generator_for(torch.device(device)), device=device)
