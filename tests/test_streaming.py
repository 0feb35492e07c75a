"""StreamDecoder (incremental detokenization) and StopStrings (cutting streamed text at stop strings)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from exlq.runtime.streaming import StopStrings, StreamDecoder
from exlq.runtime.tokenizer import Tokenizer
from conftest import REAL_MODELS, real_model_dir
from tiny_models import write_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    directory = tmp_path_factory.mktemp("tiny_tok")
    write_tiny_tokenizer(directory)
    return Tokenizer.from_dir(directory)


def stream(tokenizer, ids: list[int], **options) -> tuple[list[str], StreamDecoder]:
    """Push all `ids`; return each push's output plus the flush, and the decoder."""
    decoder = StreamDecoder(tokenizer, **options)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return pieces, decoder


def check_stream_equals_decode(tokenizer, ids: list[int], **options) -> None:
    pieces, decoder = stream(tokenizer, ids, **options)
    expected = tokenizer.decode(ids, **options)
    assert "".join(pieces) == expected, ids
    assert decoder.text == expected


# --- StreamDecoder --------------------------------------------------------------------------------


def test_multibyte_text_is_never_split(tiny: Tokenizer) -> None:
    text = "日本語🙂 crème brûlée, 中文也有一点。🚀"
    ids = tiny.encode(text)
    pieces, decoder = stream(tiny, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # the tokenizer really splits characters over tokens, so some pushes must have held text back
    assert len(ids) > len(text) - text.count(" ") and "" in pieces[:-1]
    assert decoder.token_ids == ids


def test_random_token_sequences(tiny: Tokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(300):
        ids = [rng.randrange(tiny.vocab_size) for _ in range(rng.randint(1, 40))]
        check_stream_equals_decode(tiny, ids)
        check_stream_equals_decode(tiny, ids, skip_special_tokens=True)


def test_skip_special_tokens(tiny: Tokenizer) -> None:
    ids = tiny.encode("<|im_start|>assistant\nSalut 🙂<|im_end|>", encode_special_tokens=True)
    assert "".join(stream(tiny, ids, skip_special_tokens=True)[0]) == "assistant\nSalut 🙂"
    assert "".join(stream(tiny, ids)[0]) == "<|im_start|>assistant\nSalut 🙂<|im_end|>"


def test_incomplete_sequence_is_released_by_flush(tiny: Tokenizer) -> None:
    ids = tiny.encode("a🙂")
    decoder = StreamDecoder(tiny)
    pushed = "".join(decoder.push(i) for i in ids[:-1])
    assert pushed == "a"  # the emoji's bytes are incomplete: held back
    tail = decoder.flush()
    assert tail.endswith("\ufffd") and pushed + tail == tiny.decode(ids[:-1])


class _SpaceStrippingDecoder:
    """Like SentencePiece decoders: tokens carry a leading space, which is dropped at the start of the text."""

    pieces = [" Hello", " world", "!", " How", " are", " you", "?"]

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        return "".join(self.pieces[i] for i in ids).removeprefix(" ")


def test_context_dependent_decoding() -> None:
    """Decoding each token alone would lose the spaces; decoding a window and diffing keeps them."""
    decoder = _SpaceStrippingDecoder()
    ids = list(range(len(decoder.pieces)))
    pieces, _ = stream(decoder, ids)
    assert pieces[:3] == ["Hello", " world", "!"]
    assert "".join(pieces) == "Hello world! How are you?"


@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_tokenizer(name: str) -> None:
    tok = Tokenizer.from_dir(real_model_dir(name))
    text = "日本語のテキスト🙂 and some code:\n    return a + b  # ✓ ünïcödé\n"
    ids = tok.encode(text)
    pieces, _ = stream(tok, ids)
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    rng = random.Random(7)
    for _ in range(100):
        check_stream_equals_decode(tok, [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))])


# --- StopStrings ----------------------------------------------------------------------------------


def feed(stops: StopStrings, chunks: list[str]) -> tuple[list[str], bool]:
    outputs, stopped = [], False
    for chunk in chunks:
        text, stopped = stops.push(chunk)
        outputs.append(text)
        if stopped:
            break
    return outputs, stopped


def test_no_stop_strings_pass_through() -> None:
    stops = StopStrings([])
    assert feed(stops, ["<|im", "_end|>", " x"]) == (["<|im", "_end|>", " x"], False)
    assert stops.flush() == ""
    assert StopStrings(["", ""]).push("abc") == ("abc", False)


def test_stop_in_one_push() -> None:
    stops = StopStrings(["<|im_end|>"])
    assert stops.push("Hello<|im_end|>more") == ("Hello", True)
    assert stops.matched == "<|im_end|>"
    assert stops.push("anything") == ("", True)
    assert stops.flush() == ""


def test_stop_spanning_pushes() -> None:
    stops = StopStrings(["<|im_end|>"])
    outputs, stopped = feed(stops, ["Hel", "lo <|im", "_e", "nd|> after"])
    assert outputs == ["Hel", "lo ", "", ""] and stopped


def test_false_alarm_is_released() -> None:
    stops = StopStrings(["<|im_end|>"])
    assert stops.push("a <|im") == ("a ", False)
    assert stops.push("_start|>b") == ("<|im_start|>b", False)
    assert stops.push("c<") == ("c", False)
    assert stops.flush() == "<"
    assert stops.flush() == ""


def test_earliest_stop_wins() -> None:
    stops = StopStrings(["World", "lo W", "\n\n"])
    assert stops.push("Hello World\n\n") == ("Hel", True)
    assert stops.matched == "lo W"


def test_random_splits_match_reference() -> None:
    rng = random.Random(99)
    stop_list = ["</s>", "\nUser:", "ab"]
    alphabet = ["a", "b", "c", "<", "/", "s", ">", "\n", "U", "ser:", " "]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        stops = StopStrings(stop_list)
        outputs, stopped = feed(stops, chunks)
        emitted = "".join(outputs) + ("" if stopped else stops.flush())
        hits = [i for i in (text.find(s) for s in stop_list) if i >= 0]
        assert stopped == bool(hits), (text, chunks)
        assert emitted == (text[: min(hits)] if hits else text), (text, chunks)
