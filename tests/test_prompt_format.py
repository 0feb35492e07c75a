"""Prompt formats: built-in formats' exact text, chat-template rendering (checked against transformers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from exlq.errors import ExlqError
from exlq.runtime.prompt_format import FORMATS, format_prompt, prompt_encoding, resolve_format, stop_strings_for
from exlq.runtime.tokenizer import Tokenizer
from conftest import REAL_MODELS, hf_tokenizer, real_model_dir
from tiny_models import BOS_ID, IM_END_ID, IM_START_ID, write_tiny_tokenizer

SYSTEM = {"role": "system", "content": "Be brief."}
CHAT = [
    SYSTEM,
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    CHAT,
    CHAT[1:],
    [SYSTEM, {"role": "user", "content": "日本語で答えて 🙂"}],
]


def make_tokenizer(directory: Path, chat_template: str | None = None, **config) -> Tokenizer:
    """The tiny tokenizer, with its ChatML template unless another (or none, with "") is given."""
    kwargs = {} if chat_template is None else {"chat_template": chat_template or None}
    write_tiny_tokenizer(directory, **kwargs)
    tok = Tokenizer.from_dir(directory)
    for key, value in config.items():
        setattr(tok, key, value)
    return tok


@pytest.fixture
def tiny(tmp_path: Path) -> Tokenizer:
    return make_tokenizer(tmp_path)


@pytest.fixture
def no_template(tmp_path: Path) -> Tokenizer:
    return make_tokenizer(tmp_path, chat_template="")


# --- built-in formats -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("raw", "Be brief.\n\nHiHello!\nWhat is 2+2?"),
        (
            "llama2",
            "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] What is 2+2? [/INST]",
        ),
        (
            "llama3",
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        (
            "chatml",
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n",
        ),
        ("mistral", "[INST] Be brief.\n\nHi [/INST] Hello!</s>[INST] What is 2+2? [/INST]"),
    ],
)
def test_builtin_formats(tiny: Tokenizer, name: str, expected: str) -> None:
    assert format_prompt(CHAT, name, tiny) == expected


@pytest.mark.parametrize(
    "name, expected",
    [
        ("raw", "Hi"),
        ("llama2", "[INST] Hi [/INST]"),
        ("llama3", "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"),
        ("chatml", "<|im_start|>user\nHi<|im_end|>\n"),
        ("mistral", "[INST] Hi [/INST]"),
    ],
)
def test_single_user_message_without_generation_prompt(tiny: Tokenizer, name: str, expected: str) -> None:
    assert format_prompt([{"role": "user", "content": "Hi"}], name, tiny, add_generation_prompt=False) == expected


def test_bad_messages(tiny: Tokenizer) -> None:
    with pytest.raises(ExlqError, match="role"):
        format_prompt([{"role": "robot", "content": "x"}], "chatml", tiny)
    with pytest.raises(ExlqError, match="content"):
        format_prompt([{"role": "user"}], "llama3", tiny)
    with pytest.raises(ExlqError, match="no messages"):
        format_prompt([], "raw", tiny)


def test_unknown_format_lists_choices(tiny: Tokenizer) -> None:
    with pytest.raises(ExlqError) as excinfo:
        format_prompt(CHAT, "alpaca", tiny)
    assert "alpaca" in str(excinfo.value) and all(name in str(excinfo.value) for name in FORMATS)


def test_auto(tiny: Tokenizer, no_template: Tokenizer) -> None:
    assert resolve_format("auto", tiny) == "chat_template"
    assert resolve_format("auto", no_template) == "raw"
    assert format_prompt(CHAT, "auto", no_template) == format_prompt(CHAT, "raw", no_template)
    assert format_prompt(CHAT, "auto", tiny) == format_prompt(CHAT, "chatml", tiny)


# --- chat templates -------------------------------------------------------------------------------


def test_tiny_chat_template_encodes_to_special_ids(tiny: Tokenizer) -> None:
    prompt = format_prompt(CHAT[1:2], "chat_template", tiny)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    add_bos, special = prompt_encoding("chat_template", tiny, prompt)
    ids = tiny.encode(prompt, add_bos=add_bos, encode_special_tokens=special)
    assert ids[:2] == [BOS_ID, IM_START_ID] and ids.count(IM_END_ID) == 1


def test_missing_template(no_template: Tokenizer) -> None:
    with pytest.raises(ExlqError, match="no chat template"):
        format_prompt(CHAT, "chat_template", no_template)


def test_template_environment(tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{{ m | tojson }}{% endfor %}|{{ bos_token }}|{{ eos_token }}|{{ tools is none }}|"
        "{{ strftime_now('%Y') | length }}|{% set ns = namespace(n=0) %}{% set ns.n = 3 %}{{ ns.n }}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    tok = make_tokenizer(tmp_path, chat_template=template)
    messages = [SYSTEM, {"role": "user", "content": "日本 <b>"}]
    assert format_prompt(messages, "chat_template", tok) == (
        '{"role": "user", "content": "日本 <b>"}|<s>|</s>|True|4|3>'
    )
    tok.bos_token = None
    assert format_prompt(messages, "chat_template", tok, add_generation_prompt=False).endswith("||</s>|True|4|3")


def test_template_whitespace_control(tmp_path: Path) -> None:
    """trim_blocks/lstrip_blocks as in transformers: block tags on their own lines leave no whitespace."""
    template = (
        "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    )
    tok = make_tokenizer(tmp_path, chat_template=template)
    assert format_prompt(CHAT, "chat_template", tok) == "[Hi]\n[What is 2+2?]\n"


def test_template_errors(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ExlqError, match="roles must alternate"):
        format_prompt(CHAT, "chat_template", tok)
    tok.chat_template = "{% for m in messages %}"
    with pytest.raises(ExlqError, match="not valid jinja"):
        format_prompt(CHAT, "chat_template", tok)
    for failing in ("{{ nothing.here }}", "{% set ns = namespace() %}{% set ns._x = 1 %}", "{{ 1 + 'a' }}"):
        tok.chat_template = failing
        with pytest.raises(ExlqError, match="failed to render"):
            format_prompt(CHAT, "chat_template", tok)


@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_chat_template_matches_transformers(name: str) -> None:
    path = real_model_dir(name)
    tok, hf = Tokenizer.from_dir(path), hf_tokenizer(path)
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert format_prompt(messages, "chat_template", tok, add_generation_prompt) == expected
        prompt = format_prompt(messages, "auto", tok)
        add_bos, special = prompt_encoding("auto", tok, prompt)
        assert (add_bos, special) == (False, True)
        assert tok.encode(prompt, add_bos=add_bos, encode_special_tokens=special) == hf(
            prompt, add_special_tokens=False
        )["input_ids"]


# --- encoding defaults and stop strings -----------------------------------------------------------


def test_prompt_encoding(tiny: Tokenizer, tmp_path: Path) -> None:
    assert prompt_encoding("raw", tiny) == (True, False)
    assert prompt_encoding("chatml", tiny) == (False, True)
    for name in ("llama2", "llama3", "mistral"):
        assert prompt_encoding(name, tiny) == (True, True)
    # tiny's ChatML template has no BOS text but the tokenizer adds BOS by default
    assert prompt_encoding("chat_template", tiny) == (True, True)
    assert prompt_encoding("auto", tiny) == (True, True)
    tiny.add_bos_default = False
    assert prompt_encoding("chat_template", tiny) == (False, True)
    assert prompt_encoding("raw", tiny) == (False, False)
    writes_bos = make_tokenizer(tmp_path / "bos", chat_template="{{ bos_token }}{{ messages[0]['content'] }}")
    assert writes_bos.add_bos_default is True
    assert prompt_encoding("chat_template", writes_bos) == (False, True)
    with pytest.raises(ExlqError, match="unknown prompt format"):
        prompt_encoding("nope", tiny)


def test_stop_strings_for() -> None:
    assert stop_strings_for("chatml") == ["<|im_end|>"]
    assert stop_strings_for("llama3") == ["<|eot_id|>"]
    assert stop_strings_for("llama2") == stop_strings_for("mistral") == ["[INST]"]
    assert stop_strings_for("raw") == []
    stop_strings_for("chatml").append("x")  # callers get a copy
    assert stop_strings_for("chatml") == ["<|im_end|>"]
