"""Tokenizer: loading a HF model directory's tokenizer files, encode/decode semantics, real-model parity."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from exlq.errors import ExlqError
from exlq.runtime.tokenizer import Tokenizer
from conftest import REAL_MODELS, hf_tokenizer, real_model_dir
from tiny_models import BOS_ID, EOS_ID, IM_END_ID, IM_START_ID, write_tiny_tokenizer

SAMPLE_TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\n\nnew lines  ",
    "def add(a, b):\n    return a + b\n",
    "日本語のテキスト🙂 Émile a mangé une crème brûlée.",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    write_tiny_tokenizer(tmp_path)
    return tmp_path


@pytest.fixture
def tiny(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_dir)


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


# --- loading --------------------------------------------------------------------------------------


def test_tiny_attributes(tiny: Tokenizer) -> None:
    assert tiny.bos_token == "<s>" and tiny.eos_token == "</s>" and tiny.unk_token == "<unk>"
    assert tiny.bos_token_id == BOS_ID
    assert tiny.eos_token_ids == [EOS_ID, IM_END_ID]
    assert tiny.pad_token_id is None
    assert tiny.add_bos_default is True
    assert tiny.chat_template is not None and tiny.chat_template.startswith("{% for message in messages %}")
    assert tiny.vocab_size == 320


def test_eos_ids_are_merged_in_order_without_repeats(tiny_dir: Path) -> None:
    _edit_json(tiny_dir / "generation_config.json", eos_token_id=IM_END_ID)
    _edit_json(tiny_dir / "tokenizer_config.json", eos_token="<|im_start|>")
    _edit_json(tiny_dir / "config.json", eos_token_id=[EOS_ID, IM_END_ID], bos_token_id=7)
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok.eos_token_ids == [IM_END_ID, IM_START_ID, EOS_ID]
    assert tok.bos_token_id == BOS_ID  # the tokenizer's own bos_token wins over config.json


def test_ids_fall_back_to_config_files_without_tokenizer_config(tiny_dir: Path) -> None:
    (tiny_dir / "tokenizer_config.json").unlink()
    (tiny_dir / "generation_config.json").unlink()
    _edit_json(tiny_dir / "config.json", bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=0)
    tok = Tokenizer.from_dir(tiny_dir)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (BOS_ID, [EOS_ID], 0)
    assert tok.bos_token is None and tok.chat_template is None and tok.add_bos_default is False


def test_token_dicts_and_named_templates(tiny_dir: Path) -> None:
    _edit_json(
        tiny_dir / "tokenizer_config.json",
        bos_token={"content": "<|im_start|>", "lstrip": False},
        pad_token={"content": "<unk>"},
        add_bos_token=False,
        chat_template=[{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
    )
    tok = Tokenizer.from_dir(tiny_dir)
    assert (tok.bos_token, tok.bos_token_id, tok.pad_token_id) == ("<|im_start|>", IM_START_ID, 0)
    assert tok.add_bos_default is False
    assert tok.chat_template == "D"
    _edit_json(tiny_dir / "tokenizer_config.json", chat_template=[{"name": "a", "template": "A"}])
    assert Tokenizer.from_dir(tiny_dir).chat_template == "A"


def test_chat_template_file(tiny_dir: Path) -> None:
    (tiny_dir / "chat_template.jinja").write_text("FROM FILE")
    assert Tokenizer.from_dir(tiny_dir).chat_template == "FROM FILE"  # overrides the config, as in transformers
    _edit_json(tiny_dir / "tokenizer_config.json", chat_template=None)
    assert Tokenizer.from_dir(tiny_dir).chat_template == "FROM FILE"


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ExlqError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    "name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"]
)
def test_invalid_json_names_the_file(tiny_dir: Path, name: str) -> None:
    (tiny_dir / name).write_text("{not json")
    with pytest.raises(ExlqError, match=name):
        Tokenizer.from_dir(tiny_dir)


# --- encode / decode ------------------------------------------------------------------------------


def test_encode_special_tokens_flag(tiny: Tokenizer) -> None:
    text = "<|im_start|>user\nHi<|im_end|>"
    special = tiny.encode(text, encode_special_tokens=True)
    plain = tiny.encode(text, encode_special_tokens=False)
    assert special[0] == IM_START_ID and special[-1] == IM_END_ID
    assert IM_START_ID not in plain and IM_END_ID not in plain
    assert len(plain) > len(special)
    assert tiny.decode(plain) == tiny.decode(special) == text
    # the flag is set per call, not left over from the previous one
    assert tiny.encode(text, encode_special_tokens=True) == special
    assert tiny.encode(text) == plain


def test_add_bos(tiny: Tokenizer) -> None:
    ids = tiny.encode("Hello")
    assert ids[0] != BOS_ID
    assert tiny.encode("Hello", add_bos=True) == [BOS_ID, *ids]
    assert tiny.encode("<s>Hello", add_bos=True, encode_special_tokens=True) == [BOS_ID, *ids]
    assert tiny.encode("", add_bos=True) == [BOS_ID]


def test_post_processor_never_adds_specials(tiny_dir: Path) -> None:
    """A tokenizer.json that adds BOS itself (like Llama 3's) must not add it behind the caller's back."""
    data = json.loads((tiny_dir / "tokenizer.json").read_text())
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS_ID], "tokens": ["<s>"]}},
    }
    (tiny_dir / "tokenizer.json").write_text(json.dumps(data))
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok.encode("Hello")[0] != BOS_ID
    assert tok.encode("Hello", add_bos=True).count(BOS_ID) == 1
    # without add_bos_token in the config, the post-processor tells whether the model expects BOS
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    del cfg["add_bos_token"]
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(tiny_dir).add_bos_default is True


def test_decode_roundtrip_and_skip_special(tiny: Tokenizer) -> None:
    for text in SAMPLE_TEXTS:
        assert tiny.decode(tiny.encode(text, encode_special_tokens=True)) == text
    ids = tiny.encode("<|im_start|>Hi 日本<|im_end|>", add_bos=True, encode_special_tokens=True)
    assert tiny.decode(ids, skip_special_tokens=True) == "Hi 日本"
    torch = pytest.importorskip("torch")
    assert tiny.decode(torch.tensor(ids)) == "<s><|im_start|>Hi 日本<|im_end|>"


def test_token_id(tiny: Tokenizer) -> None:
    assert tiny.token_id("<|im_end|>") == IM_END_ID
    assert tiny.token_id("<s>") == BOS_ID
    assert tiny.token_id("no such token") is None


# --- real models against transformers -------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_model_matches_transformers(name: str) -> None:
    path = real_model_dir(name)
    tok, hf = Tokenizer.from_dir(path), hf_tokenizer(path)
    for text in SAMPLE_TEXTS:
        expected = hf(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text, encode_special_tokens=True) == expected, text
        assert tok.decode(expected) == hf.decode(expected)
        assert tok.decode(expected, skip_special_tokens=True) == hf.decode(expected, skip_special_tokens=True)
    assert tok.bos_token == hf.bos_token and tok.eos_token == hf.eos_token
    assert hf.eos_token_id in tok.eos_token_ids
    assert tok.chat_template == hf.chat_template
    assert tok.encode("<|im_start|>", encode_special_tokens=False) != [tok.token_id("<|im_start|>")]
