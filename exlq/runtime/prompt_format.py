"""Turning chat messages into the prompt text a model was trained on.

The model's own jinja chat template is the reference (rendered the way transformers' apply_chat_template
does); the built-in formats are for models without a template or to override a wrong one. Built-in formats
never write the BOS token as text: the caller adds it as a token (see prompt_encoding), so it cannot be
doubled or tokenized wrongly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import jinja2.utils

from exlq.errors import ExlqError
from exlq.runtime.tokenizer import Tokenizer

Message = dict[str, Any]

FORMATS = ("auto", "chat_template", "raw", "llama2", "llama3", "chatml", "mistral")
ROLES = ("system", "user", "assistant")

_STOP_STRINGS = {
    "chatml": ["<|im_end|>"],
    "llama3": ["<|eot_id|>"],
    "llama2": ["[INST]"],
    "mistral": ["[INST]"],
}


def resolve_format(format_name: str, tokenizer: Tokenizer) -> str:
    """The concrete format for `format_name`: "auto" means the model's chat template if it has one, else raw."""
    if format_name not in FORMATS:
        raise ExlqError(f"unknown prompt format {format_name!r}; choose one of: {', '.join(FORMATS)}")
    if format_name == "auto":
        return "chat_template" if tokenizer.chat_template else "raw"
    return format_name


def format_prompt(
    messages: list[Message], format_name: str, tokenizer: Tokenizer, add_generation_prompt: bool = True
) -> str:
    """Render `messages` ([{role, content}], roles system/user/assistant) as prompt text in `format_name`."""
    name = resolve_format(format_name, tokenizer)
    if name == "chat_template":
        return render_chat_template(messages, tokenizer, add_generation_prompt)
    _check_messages(messages)
    return _BUILTIN[name](messages, add_generation_prompt)


def prompt_encoding(format_name: str, tokenizer: Tokenizer, prompt: str | None = None) -> tuple[bool, bool]:
    """Default (add_bos, encode_special_tokens) for encoding a prompt made with `format_name`.

    - raw: (tokenizer.add_bos_default, False): plain text, so special-token text in it stays plain text.
    - llama2, llama3, mistral: (True, True): their text omits BOS and uses special-token markers.
    - chatml: (False, True): ChatML models start without BOS.
    - chat_template: (False, True) like transformers, where templates write "{{ bos_token }}" themselves;
      but (True, True) when the tokenizer adds BOS by default and the rendered prompt does not begin with
      the BOS text. `prompt` is that rendered prompt; when omitted, a one-message chat is rendered to check.
    """
    name = resolve_format(format_name, tokenizer)
    if name == "raw":
        return tokenizer.add_bos_default, False
    if name == "chatml":
        return False, True
    if name != "chat_template":
        return True, True
    if not tokenizer.add_bos_default or not tokenizer.bos_token:
        return False, True
    if prompt is None:
        prompt = render_chat_template([{"role": "user", "content": "Hello"}], tokenizer, True)
    return not prompt.startswith(tokenizer.bos_token), True


def stop_strings_for(format_name: str) -> list[str]:
    """Extra stop strings for a built-in format (turn markers the model may write instead of EOS)."""
    return list(_STOP_STRINGS.get(format_name, []))


# --- chat templates -------------------------------------------------------------------------------


def render_chat_template(messages: list[Message], tokenizer: Tokenizer, add_generation_prompt: bool = True) -> str:
    """Render the tokenizer's jinja chat template with the variables transformers gives it."""
    if not tokenizer.chat_template:
        raise ExlqError(
            "the model has no chat template (none in tokenizer_config.json or chat_template.jinja); "
            f"choose a built-in prompt format instead: {', '.join(f for f in FORMATS if f != 'chat_template')}"
        )
    template = _compile(tokenizer.chat_template)
    specials = {
        "bos_token": tokenizer.bos_token or "",
        "eos_token": tokenizer.eos_token or "",
        "unk_token": tokenizer.unk_token or "",
        "pad_token": tokenizer.pad_token or "",
    }
    try:
        return template.render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **specials
        )
    except ExlqError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError) as e:
        raise ExlqError(f"the model's chat template failed to render these messages: {e}") from e


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace() refusing underscore names, as in transformers: templates are untrusted code."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # signature trick as in jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message: str) -> None:
    """Templates call raise_exception(...) to reject conversations they cannot render (e.g. wrong role order)."""
    raise ExlqError(f"the model's chat template rejected the messages: {message}")


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    """jinja's own tojson escapes HTML characters and non-ASCII text; chat templates expect plain JSON."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    """Compile in the same sandboxed environment transformers uses, so templates render identically."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ExlqError(f"the model's chat template is not valid jinja (line {e.lineno}: {e.message})") from e


# --- built-in formats -----------------------------------------------------------------------------


def _check_messages(messages: list[Message]) -> None:
    """Built-in formats know only system/user/assistant messages with text content."""
    if not messages:
        raise ExlqError("no messages to format: give at least one user message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ExlqError(
                f"message {i} must be a dict with 'role' in {ROLES} and string 'content', got {m!r}"
            )


def _raw(messages: list[Message], add_generation_prompt: bool) -> str:
    """Plain completion text: each system message + "\\n\\n"; each user message, preceded by "\\n" when a user
    or assistant message came before it; assistant messages appended exactly as they are.

    A single user message is therefore passed through unchanged. add_generation_prompt has no effect.
    """
    out = ""
    seen_turn = False
    for m in messages:
        if m["role"] == "system":
            out += m["content"] + "\n\n"
        elif m["role"] == "user":
            out += ("\n" if seen_turn else "") + m["content"]
            seen_turn = True
        else:
            out += m["content"]
            seen_turn = True
    return out


def _inst_turns(
    messages: list[Message], wrap_user: Callable[[str, str | None, bool], str], answer: Callable[[str], str]
) -> str:
    """Shared shape of llama2 and mistral: "[INST] ... [/INST]" per user turn, system text folded into the
    next user turn, assistant turns rendered by `answer`.

    wrap_user(user, system or None, whether an assistant turn came just before) renders one user turn.
    """
    out = ""
    system: str | None = None
    after_answer = False
    for m in messages:
        if m["role"] == "system":
            system = m["content"] if system is None else system + "\n\n" + m["content"]
        elif m["role"] == "user":
            out += wrap_user(m["content"], system, after_answer)
            system, after_answer = None, False
        else:
            out += answer(m["content"])
            after_answer = True
    return out


def _llama2(messages: list[Message], add_generation_prompt: bool) -> str:
    """Llama 2 chat: "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] ..."

    BOS of the first turn is left to the caller; later turns carry "<s>" as text (encoded as a special).
    The prompt always ends ready for the answer, so add_generation_prompt has no effect.
    """
    def wrap_user(user: str, system: str | None, after_answer: bool) -> str:
        bos = "<s>" if after_answer else ""
        sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system is not None else ""
        return f"{bos}[INST] {sys_block}{user} [/INST]"

    return _inst_turns(messages, wrap_user, lambda answer: f" {answer} </s>")


def _mistral(messages: list[Message], add_generation_prompt: bool) -> str:
    """Mistral instruct: "[INST] {system}\\n\\n{user} [/INST] {answer}</s>[INST] {user} [/INST]"

    The space before the answer is what SentencePiece yields for the model's own answer tokens. BOS is left to
    the caller; add_generation_prompt has no effect.
    """

    def wrap_user(user: str, system: str | None, after_answer: bool) -> str:
        return f"[INST] {system}\n\n{user} [/INST]" if system is not None else f"[INST] {user} [/INST]"

    return _inst_turns(messages, wrap_user, lambda answer: f" {answer}</s>")


def _header_format(open_role: Callable[[str], str], close: str) -> Callable[[list[Message], bool], str]:
    """Formats where every message is "{open_role(role)}{content}{close}" (llama3, chatml)."""

    def render(messages: list[Message], add_generation_prompt: bool) -> str:
        out = "".join(open_role(m["role"]) + m["content"] + close for m in messages)
        return out + (open_role("assistant") if add_generation_prompt else "")

    return render


_BUILTIN: dict[str, Callable[[list[Message], bool], str]] = {
    "raw": _raw,
    "llama2": _llama2,
    "llama3": _header_format(lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"),
    "chatml": _header_format(lambda role: f"<|im_start|>{role}\n", "<|im_end|>\n"),
    "mistral": _mistral,
}
