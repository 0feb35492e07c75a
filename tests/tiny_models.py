"""Tiny random Hugging Face model directories for fast CPU tests.

Models are built and saved with `transformers` (a test-only dependency), so exlq is checked
against the reference implementation; the tokenizer is a small byte-level BPE trained here,
which keeps multi-byte characters split across tokens (what streaming has to handle).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
UNK_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(5)

_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Émile a mangé une crème brûlée à Zürich. Übergrößenträger, naïve café.",
    "日本語のテキストも少し。中文也有一点。",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Emoji: 🙂🚀",
    "Once upon a time there was a little model that could count tokens.",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tiny_tokenizer(directory: Path, vocab_size: int = 320, chat_template: str | None = CHATML_TEMPLATE) -> int:
    """Train a byte-level BPE tokenizer into `directory`; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID]}, indent=2)
    )
    return tokenizer.get_vocab_size()


_BASE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)

ARCHITECTURES = ("llama", "mistral", "qwen2")


def make_hf_model(arch: str, vocab_size: int, seed: int = 0, **overrides):
    """A transformers model with random weights (scaled up so that logits are not all ~0)."""
    import transformers

    config_class = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }[arch]
    model_class = {
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
    }[arch]
    params = dict(_BASE, vocab_size=vocab_size)
    params.update(overrides)
    config = config_class(**params)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def make_tiny_model_dir(directory: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a complete HF model directory (config, safetensors, tokenizer files) and return it."""
    directory = Path(directory)
    vocab_size = write_tiny_tokenizer(directory)
    model = make_hf_model(arch, vocab_size, seed=seed, **overrides)
    model.save_pretrained(directory, safe_serialization=True)
    # save_pretrained writes a generation_config.json of its own: keep ours (two EOS ids).
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID]}, indent=2)
    )
    return directory
