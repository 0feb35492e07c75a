"""Tokenizer for a Hugging Face model directory, built on the `tokenizers` library only.

Hugging Face spreads what a tokenizer needs over several files (tokenizer.json for the vocabulary and
merges, tokenizer_config.json for special tokens and the chat template, generation_config.json and
config.json for the ids generation stops on); `Tokenizer.from_dir` gathers them in one object so the rest
of exlq never has to know where each value came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from exlq.errors import ExlqError
from exlq.runtime.config import read_optional_json


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: either plain text or an AddedToken dict with `content`."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _ids(value: Any) -> list[int]:
    """`eos_token_id` and friends may be an int, a list of ints or null."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _first_id(*values: Any) -> int | None:
    """The first usable id among candidates given in order of preference."""
    for value in values:
        ids = _ids(value)
        if ids:
            return ids[0]
    return None


def _select_chat_template(value: Any) -> str | None:
    """tokenizer_config's `chat_template`: a string, or a list of {name, template} (use "default", else the first)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default", next(iter(named.values()), None))
        return chosen if isinstance(chosen, str) else None
    return None


def _dedup(ids: Iterable[int | None]) -> list[int]:
    """Drop Nones and repeats, keeping the first occurrence's position."""
    return list(dict.fromkeys(i for i in ids if i is not None))


class Tokenizer:
    """A HF fast tokenizer plus the special-token facts scattered over a model directory's config files."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        pad_token_id: int | None = None,
        add_bos_default: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.add_bos_default = add_bos_default
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json (required) and whatever of the other HF config files exist in `path`.

        Where files disagree, the tokenizer's own files win for what encoding does (bos token), and the EOS
        ids of all files are merged, since generation should stop on any of them.
        """
        directory = Path(path)
        backend = _load_backend(directory / "tokenizer.json")
        tok_cfg = read_optional_json(directory / "tokenizer_config.json") or {}
        gen_cfg = read_optional_json(directory / "generation_config.json") or {}
        model_cfg = read_optional_json(directory / "config.json") or {}

        def token_and_id(key: str) -> tuple[str | None, int | None]:
            text = _token_text(tok_cfg.get(key))
            return text, (backend.token_to_id(text) if text is not None else None)

        bos_token, bos_id = token_and_id("bos_token")
        eos_token, eos_id = token_and_id("eos_token")
        pad_token, pad_id = token_and_id("pad_token")
        unk_token, _ = token_and_id("unk_token")
        add_bos = tok_cfg.get("add_bos_token")
        return cls(
            backend,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            unk_token=unk_token,
            bos_token_id=_first_id(bos_id, gen_cfg.get("bos_token_id"), model_cfg.get("bos_token_id")),
            eos_token_ids=_dedup([*_ids(gen_cfg.get("eos_token_id")), eos_id, *_ids(model_cfg.get("eos_token_id"))]),
            pad_token_id=_first_id(pad_id, gen_cfg.get("pad_token_id"), model_cfg.get("pad_token_id")),
            add_bos_default=bool(add_bos) if add_bos is not None else _post_processor_adds(backend, bos_id),
            chat_template=_load_chat_template(directory, tok_cfg),
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may be larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool = False, encode_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; specials only where asked for, so the caller alone decides what the model sees.

        encode_special_tokens=True turns text like "<|im_start|>" into its special id (what a rendered chat
        prompt needs); False tokenizes it as plain text (what untrusted user text needs).
        """
        # The `tokenizers` flag means the opposite: True = encode special tokens' text as ordinary text.
        self.backend.encode_special_tokens = not encode_special_tokens
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, or anything iterable of integers such as a 1-D tensor)."""
        ids = ids if isinstance(ids, list) else [int(i) for i in ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        """Id of a single token given as text (e.g. "<|im_end|>"), or None if it is not in the vocabulary."""
        return self.backend.token_to_id(text)


def _load_backend(path: Path) -> tokenizers.Tokenizer:
    """The `tokenizers` object; exlq has no slow (sentencepiece/tiktoken) tokenizer fallback."""
    if not path.is_file():
        raise ExlqError(
            f"{path} not found: exlq needs a Hugging Face fast-tokenizer tokenizer.json in the model directory "
            "(if the model ships only a slow tokenizer, make one with transformers: "
            "AutoTokenizer.from_pretrained(model_dir).save_pretrained(model_dir))"
        )
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ExlqError(f"{path} could not be loaded as a tokenizer ({e}); fix or re-download the file") from e


def _load_chat_template(directory: Path, tok_cfg: dict[str, Any]) -> str | None:
    """chat_template.jinja if present (transformers lets it override tokenizer_config), else the config's."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    return _select_chat_template(tok_cfg.get("chat_template"))


def _post_processor_adds(backend: tokenizers.Tokenizer, bos_id: int | None) -> bool:
    """Whether tokenizer.json's post-processor adds BOS (e.g. Llama 3, whose config has no add_bos_token)."""
    if bos_id is None:
        return False
    backend.encode_special_tokens = True
    with_specials = backend.encode("a", add_special_tokens=True).ids
    return with_specials[:1] == [bos_id] and backend.encode("a", add_special_tokens=False).ids[:1] != [bos_id]
