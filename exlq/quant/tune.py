"""End-to-end tuning of an EXL2 model's continuous parameters (norms, group scales) toward the FP model.

Every other step of the converter is layer-local. Once all layers and the head are quantized, the
integer codes and the 4-bit scale codes are fixed, but two kinds of fp16 fields stay free:
- the RMSNorm weights (`input_layernorm`, `post_attention_layernorm`, the final `model.norm`);
- each quantized linear's `q_scale_max`: group g's dequantized rows are linear in it (spec §4.3),
  so a multiplier s_g on it scales the group's input channels (rows of Wᵀ, stored order) by s_g.

This stage fits them end to end. Parameters θ live in log space (multiplier exp θ, θ = 0 at the
start), trained by Adam on the mean over calibration tokens of KL(P_fp ‖ P_q) between next-token
distributions (fp32 log-softmax of the full vocabulary, a chunk of tokens at a time so the
vocabulary-sized logits stay bounded). The teacher is the FP model (rotated, unquantized): the
converter hands over its normalized final states, turned into logits chunk by chunk with the FP
head. The student is the model with its dequantized weights held fixed: the multipliers act on
the linears' inputs ((x·m) Wᵀ = x (W·diag m)ᵀ) and on the norms' outputs, so only θ gets
gradients and no weight-sized gradient is ever formed. Everything runs in fp32, on any device.

Training uses W·exp θ; what is written is f16(q_scale_max·exp θ), dequantized with the format's
three fp16 roundings, and fp16 norm weights. Decisions use what is written: one calibration row in
HOLDOUT_EVERY is held out of the training, the epoch with the lowest held-out KL is kept, and only
if its exact held-out KL is below the untuned model's; otherwise nothing changes, so the stage
cannot make a model worse on its own calibration data.

The quantized head's group scales are not tuned: the head reads only the final norm's output, whose
per-channel weight already covers any per-group multiplier of the head's input rows.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from exlq.quant.hessian import linear_modules
from exlq.runtime.attention import AttentionBatch
from exlq.runtime.exl2 import Exl2Tensors, decode_q_groups, row_groups
from exlq.runtime.model import DecoderOnlyLM

TUNE_LR = 2e-3  # Adam's step size on θ (log multipliers) at 3 bits per weight, decayed by a cosine over all steps
STEPS_PER_EPOCH = 16  # Adam steps per epoch: more calibration makes larger (less noisy) steps, not more of them,
# so a step size found on a small calibration carries over to a large one
HOLDOUT_EVERY = 8  # one calibration row in this many is held out of the training (at least one)
LOGIT_ELEMENTS = 1 << 24  # tokens × vocabulary per chunk of logits (64 MB in fp32)
CHECKPOINT_LAYERS: bool | None = None  # recompute each layer's activations in the backward pass; None: on CUDA
# devices (long rows through deep models would hold every layer's activations; recomputing is cheap there)
FP16_MAX = 65504.0
NORMS = ("input_layernorm", "post_attention_layernorm")


def default_lr(bpw: float) -> float:
    """TUNE_LR at 3.0 bpw, halved per extra bit: the quantization error and so the multipliers' distance to their
    best values halve per bit (on smollm2 with 8 k calibration tokens, 2e-3 was best of 2e-3/5e-3 at 3.0 bpw, and
    5e-4 ≈ 1e-3 > 2e-3 at 4.0)."""
    return TUNE_LR * 2.0 ** (3.0 - bpw)


@dataclass(frozen=True)
class TuneSettings:
    """What decides the tuning's result (its checkpoints are keyed by these)."""

    epochs: int
    lr: float = TUNE_LR
    steps: int = STEPS_PER_EPOCH  # Adam steps per epoch, at most (rows per step: training rows / steps, rounded up)
    seed: int = 0  # the order of the rows in each epoch
    norms: bool = True  # tune the norms' weights too (else only the group scales)

    def to_json(self) -> dict:
        result = {"epochs": self.epochs, "lr": self.lr, "steps": self.steps, "seed": self.seed}
        return result if self.norms else {**result, "norms": False}

    def key(self) -> str:
        """A short name for this setting's checkpoints, e.g. `tune-3f2a…`."""
        text = repr(sorted(self.to_json().items())).encode()
        return "tune-" + hashlib.sha256(text).hexdigest()[:12]


@dataclass
class TuneResult:
    """`tensors`: the replacements to write (`<linear>.q_scale_max`, `<norm>.weight`, fp16; empty when the
    tuning was not kept); `info`: held-out KL before/after, per-epoch history, why it was (not) kept."""

    applied: bool
    tensors: dict[str, torch.Tensor]
    info: dict


@dataclass
class TuneState:
    """The training's state after a finished epoch: enough to continue it bit for bit."""

    epoch: int  # epochs done
    theta: dict[str, torch.Tensor]
    best_theta: dict[str, torch.Tensor]
    adam: dict[str, torch.Tensor]  # exp_avg / exp_avg_sq / step per parameter
    baseline_kl: float
    best_kl: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)

    def to_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"theta/{k}": v for k, v in self.theta.items()}
        tensors |= {f"best/{k}": v for k, v in self.best_theta.items()}
        tensors |= {f"adam/{k}": v for k, v in self.adam.items()}
        meta = {
            "epoch": self.epoch, "baseline_kl": self.baseline_kl, "best_kl": self.best_kl,
            "best_epoch": self.best_epoch, "history": self.history,
        }
        return tensors, meta

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], meta: dict) -> TuneState:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        return cls(
            epoch=meta["epoch"], theta=part("theta/"), best_theta=part("best/"), adam=part("adam/"),
            baseline_kl=meta["baseline_kl"], best_kl=meta["best_kl"], best_epoch=meta["best_epoch"],
            history=meta["history"],
        )


@dataclass
class TuneCheckpoint:
    """Where the state goes between epochs (the converter's job directory): load() → state or None."""

    load: Callable[[], TuneState | None]
    save: Callable[[TuneState], None]


def holdout_rows(rows: int) -> list[int]:
    """The held-out calibration rows: one in HOLDOUT_EVERY (at least one), spread over all of them
    (calibration rows come grouped by source)."""
    count = max(1, rows // HOLDOUT_EVERY)
    return sorted({min(rows - 1, int((j + 0.5) * rows / count)) for j in range(count)})


def kl_sum(student: torch.Tensor, teacher: torch.Tensor, teacher_head: torch.Tensor, student_head: torch.Tensor) -> torch.Tensor:
    """Σ over rows of KL(softmax(teacher·Hₜᵀ) ‖ softmax(student·Hₛᵀ)) for normalized final states [n, hidden],
    in chunks of tokens; differentiable in `student` (the teacher's side has no gradient)."""
    chunk = max(1, LOGIT_ELEMENTS // teacher_head.shape[0])
    total = student.new_zeros(())
    for start in range(0, student.shape[0], chunk):
        with torch.no_grad():
            t_logp = torch.log_softmax(F.linear(teacher[start : start + chunk].float(), teacher_head), dim=-1)
            t_p = t_logp.exp()
        s_logp = torch.log_softmax(F.linear(student[start : start + chunk], student_head), dim=-1)
        total = total + (t_p * (t_logp - s_logp)).sum()
    return total


class Student:
    """The quantized model in fp32 with its multipliers (hooks on the linears' inputs and the norms' outputs).

    `set_weights` puts the weights written for θ (or the untuned ones) into the model, exactly as the runtime
    will compute them from the files (fp16 embedding, norms and biases, weights dequantized bit-exactly);
    the hooks apply exp θ on top while `active` (training).
    """

    def __init__(self, model: DecoderOnlyLM, linears: dict[str, Exl2Tensors]):
        self.model = model
        device = model.device
        embedding = model.model.embed_tokens.weight  # as written: fp16 (the FP stream has been through it)
        embedding.data = embedding.data.half().to(embedding.dtype)
        self.linears = {
            name: Exl2Tensors(**{f.name: None if (v := getattr(t, f.name)) is None else v.to(device) for f in fields(t)})
            for name, t in linears.items()
        }
        self.modules = {
            f"model.layers.{i}.{name}": module
            for i, layer in enumerate(model.model.layers)
            for name, module in linear_modules(layer).items()
        }
        if set(self.modules) != set(linears):
            raise ValueError("tuning needs the quantized tensors of every decoder linear")
        self.norms = self.norm_modules(model)
        self.base_norms = {name: norm.weight.detach().float().clone() for name, norm in self.norms.items()}
        self.channel_group = {}
        for name, t in self.linears.items():
            layout = decode_q_groups(t.q_groups, t.q_weight.shape[0])
            self.channel_group[name] = row_groups(layout).to(device)[t.q_invperm.to(device).long()]
        self.params = {name: nn.Parameter(torch.zeros(t.q_scale_max.numel(), device=device)) for name, t in self.linears.items()}
        self.params |= {name: nn.Parameter(torch.zeros_like(w)) for name, w in self.base_norms.items()}
        self.active = False

    @staticmethod
    def norm_modules(model: DecoderOnlyLM) -> dict[str, nn.Module]:
        """The tuned RMSNorms by name: each layer's two and the final one."""
        norms = {f"model.layers.{i}.{n}": getattr(layer, n) for i, layer in enumerate(model.model.layers) for n in NORMS}
        norms["model.norm"] = model.model.norm
        return norms

    @contextmanager
    def hooked(self) -> Iterator[None]:
        def scale_input(name: str):
            def hook(_module, args):
                if self.active:
                    return (args[0] * self.params[name].exp()[self.channel_group[name]],) + args[1:]
                return None

            return hook

        def scale_output(name: str):
            def hook(_module, _args, output):
                return output * self.params[name].exp() if self.active else None

            return hook

        handles = [m.register_forward_pre_hook(scale_input(n)) for n, m in self.modules.items()]
        handles += [m.register_forward_hook(scale_output(n)) for n, m in self.norms.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.active = False

    def written(self, theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What would be written for θ: fp16 q_scale_max of every linear and fp16 weight of every norm."""
        out = {}
        for name, t in self.linears.items():
            scaled = t.q_scale_max.float() * theta[name].exp()
            out[f"{name}.q_scale_max"] = scaled.clamp(max=FP16_MAX).half()
        for name, base in self.base_norms.items():
            out[f"{name}.weight"] = (base * theta[name].exp()).clamp(-FP16_MAX, FP16_MAX).half()
        return out

    @torch.no_grad()
    def set_weights(self, written: dict[str, torch.Tensor] | None, dtype: torch.dtype) -> None:
        """Put the exactly dequantized weights (and norms) for `written` (None: untuned) into the model."""
        for name, module in self.modules.items():
            tensors = self.linears[name]
            if written is not None:
                tensors = replace(tensors, q_scale_max=written[f"{name}.q_scale_max"].to(tensors.q_scale_max.device))
            weight = tensors.weight(module.out_features).to(module.weight.device, dtype)
            module.weight.data = weight.contiguous()
            if module.bias is not None:  # as written: fp16
                module.bias.data = tensors.bias[: module.out_features].to(module.bias.device, dtype)
        for name, norm in self.norms.items():
            weight = self.base_norms[name] if written is None else written[f"{name}.weight"]
            norm.weight.data = weight.to(norm.weight.device, dtype)

    def final_states(self, ids: torch.Tensor, checkpoint_layers: bool = False) -> torch.Tensor:
        """Normalized final states [B, T, hidden] (fp32) of the model as it stands (hooks as set)."""
        model = self.model
        length = ids.shape[1]
        positions = torch.arange(length, device=model.device)[None].expand(ids.shape[0], -1)
        cos, sin = model.rotary.cos_sin(positions, torch.float32)
        batch = AttentionBatch(0, length, cos, sin)
        hidden = model.embed(ids)
        for i, layer in enumerate(model.model.layers):
            if checkpoint_layers and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                hidden = checkpoint(layer, hidden, batch, None, i, use_reentrant=False)
            else:
                hidden = layer(hidden, batch, None, i)
        return model.model.norm(hidden).float()


def tune(
    model: DecoderOnlyLM,
    ids: torch.Tensor,
    teacher_states: torch.Tensor,
    teacher_head: torch.Tensor,
    linears: dict[str, Exl2Tensors],
    student_head: torch.Tensor,
    settings: TuneSettings,
    *,
    checkpoint: TuneCheckpoint | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TuneResult:
    """Tune the norms and group scales of the quantized `model` toward the teacher; see the module docstring.

    model: the converted model (its decoder linears and norms are replaced by the result, exactly as
    written, in the model's dtype); ids [rows, T]: calibration; teacher_states [rows, T, hidden]: the FP
    model's normalized final states on them; teacher_head / student_head [vocab, hidden]: the FP and the
    (dequantized) quantized head; linears: the packed tensors of every decoder linear by module name.
    """
    started = time.perf_counter()
    device, dtype = model.device, model.dtype
    rows = ids.shape[0]
    if rows < 2 or settings.epochs == 0:
        reason = "off" if settings.epochs == 0 else "needs at least 2 calibration rows (one is held out)"
        return TuneResult(False, {}, {"applied": False, "reason": reason})
    held = holdout_rows(rows)
    train = [r for r in range(rows) if r not in held]
    ids = ids.to(device)
    teacher_states = teacher_states.to(device)
    teacher_head = teacher_head.to(device, torch.float32)
    student_head = student_head.to(device, torch.float32)
    checkpoint_layers = device.type == "cuda" if CHECKPOINT_LAYERS is None else CHECKPOINT_LAYERS
    student = Student(model, linears)
    names = [n for n in student.params if settings.norms or n in linears]
    params = [student.params[n] for n in names]
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    rows_per_step = math.ceil(len(train) / settings.steps)
    steps_per_epoch = math.ceil(len(train) / rows_per_step)
    total_steps = steps_per_epoch * settings.epochs

    def heldout_kl() -> float:
        total, tokens = 0.0, 0
        with torch.no_grad():
            for r in held:
                states = student.final_states(ids[r : r + 1])[0]
                total += float(kl_sum(states, teacher_states[r], teacher_head, student_head))
                tokens += states.shape[0]
        return total / tokens

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in student.params.items()}

    state = checkpoint.load() if checkpoint is not None else None
    with student.hooked():
        student.set_weights(None, torch.float32)
        if state is None:
            baseline = heldout_kl()  # no multipliers yet: exactly the untuned model
            state = TuneState(0, snapshot(), snapshot(), {}, baseline, baseline, 0)
        else:
            with torch.no_grad():
                for n, p in student.params.items():
                    p.copy_(state.theta[n].to(device))
            if state.adam:
                optimizer.load_state_dict(_adam_state(optimizer, names, state.adam))
        student.active = True
        while state.epoch < settings.epochs:  # no early stop: the cosine's last, small steps may be the best
            epoch_started = time.perf_counter()
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(settings.seed + state.epoch))
            train_kl, train_tokens = 0.0, 0
            for step in range(steps_per_epoch):
                picked = [train[int(i)] for i in order[step * rows_per_step : (step + 1) * rows_per_step]]
                done = state.epoch * steps_per_epoch + step
                for group in optimizer.param_groups:  # cosine decay to 0 over all steps
                    group["lr"] = settings.lr * 0.5 * (1 + math.cos(math.pi * done / total_steps))
                optimizer.zero_grad(set_to_none=False)
                tokens = len(picked) * ids.shape[1]
                for r in picked:  # one row at a time, gradients accumulated: memory of one row
                    states = student.final_states(ids[r : r + 1], checkpoint_layers)[0]
                    leaf = states.detach().requires_grad_()
                    loss = kl_sum(leaf, teacher_states[r], teacher_head, student_head) / tokens
                    loss.backward()
                    states.backward(leaf.grad)
                    train_kl += float(loss.detach()) * tokens
                optimizer.step()
                train_tokens += tokens
            kl = heldout_kl()
            state.epoch += 1
            state.theta = snapshot()
            state.adam = _flat_adam(optimizer, names)
            if kl < state.best_kl:
                state.best_kl, state.best_epoch, state.best_theta = kl, state.epoch, snapshot()
            state.history.append({
                "epoch": state.epoch, "train_kl": train_kl / train_tokens, "heldout_kl": kl,
                "seconds": round(time.perf_counter() - epoch_started, 1),
            })
            if checkpoint is not None:
                checkpoint.save(state)
            if progress is not None:
                progress(state.epoch, settings.epochs)
        # The decision, on exactly what would be written.
        student.active = False
        written = student.written(state.best_theta)
        student.set_weights(written, torch.float32)
        exact = heldout_kl() if state.best_epoch > 0 else state.baseline_kl
        applied = state.best_epoch > 0 and exact < state.baseline_kl
    student.set_weights(written if applied else None, dtype)
    info = {
        "applied": applied,
        "settings": settings.to_json(),
        "heldout_rows": held,
        "heldout_kl_before": state.baseline_kl,
        "heldout_kl_after": exact if applied else state.baseline_kl,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if not applied:
        info["reason"] = "no epoch lowered the held-out KL"
    return TuneResult(applied, written if applied else {}, info)


def _flat_adam(optimizer: torch.optim.Adam, names: list[str]) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state as flat named tensors (for a safetensors checkpoint)."""
    flat = {}
    for name, p in zip(names, optimizer.param_groups[0]["params"]):
        for key, value in optimizer.state.get(p, {}).items():
            flat[f"{name}/{key}"] = torch.as_tensor(value).detach().clone()
    return flat


def _adam_state(optimizer: torch.optim.Adam, names: list[str], flat: dict[str, torch.Tensor]) -> dict:
    """The inverse of `_flat_adam`: a state dict for `optimizer.load_state_dict`."""
    state_dict = optimizer.state_dict()
    state = {}
    for index, name in enumerate(names):
        entry = {k.split("/")[-1]: v for k, v in flat.items() if k.rsplit("/", 1)[0] == name}
        if entry:
            state[index] = entry
    return {"state": state, "param_groups": state_dict["param_groups"]}
