"""The runtime on a CUDA GPU: same results as the CPU/fp32 reference (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from conftest import real_model_dir
from exlq.runtime.generator import Generator
from exlq.runtime.loader import load_model
from exlq.runtime.sampler import Sampler, SamplerSettings
from exlq.runtime.tokenizer import Tokenizer

pytestmark = pytest.mark.gpu


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


@pytest.mark.parametrize("variant", ["llama-tied-llama3rope", "mistral-window", "qwen2"])
def test_cuda_matches_cpu(tiny_model_dirs, variant):
    path = tiny_model_dirs[variant]
    cpu = load_model(path, device="cpu", dtype="fp32")
    ids = torch.randint(0, cpu.config.vocab_size, (2, 40))
    expected = cpu(ids, max_output_len=None)
    assert rel(load_model(path, device="cuda", dtype="fp32")(ids, max_output_len=None), expected) < 1e-4
    for dtype in ("fp16", "bf16"):
        model = load_model(path, device="cuda", dtype=dtype)
        assert model.lm_head.weight.is_cuda and model.dtype != torch.float32
        assert rel(model(ids, max_output_len=None), expected) < (1e-2 if dtype == "fp16" else 3e-2)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cuda_cached_decode_and_padding_match_full_forward(tiny_model_dirs, dtype):
    model = load_model(tiny_model_dirs["qwen2"], device="cuda", dtype=dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 30))
    full = model(ids, max_output_len=None).float()
    cache = model.new_cache(64, batch_size=2)
    parts = [model(ids[:, :17], cache, max_output_len=None)]
    parts += [model(ids[:, i : i + 1], cache) for i in range(17, 30)]
    assert rel(torch.cat(parts, 1).float(), full) < 1e-2
    # Row 0 left-padded by 6 gives the logits of its unpadded tail.
    padded = ids.clone()
    padded[0, :6] = 0
    cache = model.new_cache(64, batch_size=2)
    out = model(padded, cache, max_output_len=1, pad_lengths=torch.tensor([6, 0]))
    assert rel(out[0], model(ids[:1, 6:])[0]) < 1e-2


def test_sampler_on_cuda_is_seeded_and_greedy_is_argmax():
    logits = torch.randn(4, 1000, device="cuda")
    history = torch.randint(0, 1000, (4, 20), device="cuda")
    settings = SamplerSettings(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.2, seed=7)
    a = Sampler(settings).sample(logits, history)
    b = Sampler(settings).sample(logits, history)
    assert a.is_cuda and torch.equal(a, b)
    greedy = Sampler(SamplerSettings()).sample(logits, None)
    assert torch.equal(greedy, logits.argmax(-1))


def test_greedy_generation_same_on_cuda_fp32_as_cpu(tiny_llama_dir):
    tokenizer = Tokenizer.from_dir(tiny_llama_dir)
    prompt = tokenizer.encode("Once upon a time", add_bos=True)
    outputs = []
    for device in ("cpu", "cuda"):
        model = load_model(tiny_llama_dir, device=device, dtype="fp32")
        result = Generator(model, tokenizer, max_seq_len=128).generate(
            prompt, sampler=SamplerSettings(), max_new_tokens=32, eos_ids=[]
        )
        outputs.append(result.token_ids)
    assert outputs[0] == outputs[1]


@pytest.mark.slow
def test_real_model_fp16_on_gpu_close_to_fp32_cpu():
    path = real_model_dir("smollm2-135m")
    tokenizer = Tokenizer.from_dir(path)
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris. The capital of Germany is Berlin. " * 8)])
    expected = load_model(path, device="cpu", dtype="fp32")(ids, max_output_len=None)
    gpu = load_model(path, device="cuda", dtype="fp16")
    assert rel(gpu(ids, max_output_len=None).float(), expected) < 1e-2


def test_exl2_dequantize_on_cuda_is_bit_identical_to_cpu():
    from exlq.quant.exl2_pack import quantize_rtn
    from exlq.runtime.exl2 import dequantize

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(200, 256, generator=g)
    layout = [(8, 32), (6, 32), (5, 32), (4, 64), (3, 64), (2, 32)]
    packed = quantize_rtn(weight, layout, perm=torch.randperm(256, generator=g))
    tensors = (packed.q_weight, packed.q_scale, packed.q_scale_max, packed.q_groups, packed.q_invperm)
    cpu = dequantize(*tensors)
    gpu = dequantize(*(t.cuda() for t in tensors))
    assert torch.equal(gpu.cpu().view(torch.int16), cpu.view(torch.int16))


def test_gptq_on_cuda_matches_cpu_quality():
    from exlq.quant.gptq import QuantSpec, hessian_weighted_error, quantize_gptq

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 512, generator=g) @ (torch.eye(512) + torch.randn(512, 512, generator=g) / 30)
    hessian = x.T.double() @ x.double() / 4096
    weight = torch.randn(256, 512, generator=g) / 20
    spec = QuantSpec((5, 3), (0.2, 0.8), (32, 64))
    cpu = hessian_weighted_error(weight, quantize_gptq(weight, hessian, spec).dequantize(), hessian)
    gpu_q = quantize_gptq(weight.cuda(), hessian.cuda(), spec)
    assert gpu_q.codes.is_cuda
    gpu = hessian_weighted_error(weight, gpu_q.dequantize().cpu(), hessian)
    assert gpu == pytest.approx(cpu, rel=0.03)
