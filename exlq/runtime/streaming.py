"""Turning generated token ids into text piece by piece, and cutting it at stop strings.

Decoding each token on its own is wrong twice over: a token may hold only part of a UTF-8 character, and
many decoders change a token's text depending on what precedes it (leading-space rules). StreamDecoder
decodes a short window of recent tokens instead and emits what the newest token added to it.
"""

from __future__ import annotations

from typing import Protocol

_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str: ...


class StreamDecoder:
    """Incremental detokenizer: all pushes plus flush() equal tokenizer.decode(all ids).

    Uses the prefix/read offsets of vLLM and HF TextStreamer: `_prefix` marks the start of a window of
    already-emitted tokens kept as context, `_read` the end of what has been emitted. Text is emitted once the
    window's decoding grows and does not end in U+FFFD (an unfinished UTF-8 sequence that later tokens may
    complete); at a complete character the earlier text can no longer change, so the window can move on.
    """

    def __init__(self, tokenizer: _Decoder, *, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._parts: list[str] = []

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def _advance(self, force: bool) -> str:
        """Emit the window's new text if it is complete (or `force`), and move the window forward."""
        prefix_text = self._decode(self._prefix, self._read)
        full_text = self._decode(self._prefix, len(self._ids))
        if len(full_text) <= len(prefix_text) or (full_text.endswith(_REPLACEMENT) and not force):
            return ""
        new_text = full_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._parts.append(new_text)
        return new_text

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (often "", never half a character)."""
        self._ids.append(int(token_id))
        return self._advance(force=False)

    def flush(self) -> str:
        """At the end of generation: return the text still held back (e.g. an unfinishable byte sequence)."""
        return self._advance(force=True)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._parts)

    @property
    def token_ids(self) -> list[int]:
        """All tokens pushed so far."""
        return list(self._ids)


class StopStrings:
    """Cuts streamed text at the first stop string, holding back text that may be a stop string's start.

    push() returns (text safe to show now, whether a stop string was hit). Once stopped, the text before the
    stop string has been returned, `matched` names the stop string, and further pushes return ("", True).
    Empty stop strings are ignored; with none left, text passes straight through.
    """

    def __init__(self, stop_strings: list[str] | tuple[str, ...] = ()) -> None:
        self.stop_strings = [s for s in dict.fromkeys(stop_strings) if s]
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def push(self, text: str) -> tuple[str, bool]:
        """Add newly generated text; return what can be emitted and whether generation should stop."""
        if self.stopped:
            return "", True
        buffer = self._held + text
        hit = self._first_match(buffer)
        if hit is not None:
            index, self.matched = hit
            self.stopped = True
            self._held = ""
            return buffer[:index], True
        keep = self._partial_match_length(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """At the end of generation: release the held-back text (it never became a stop string)."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, buffer: str) -> tuple[int, str] | None:
        """(position, stop string) of the earliest complete stop string in `buffer`, if any."""
        found = [(buffer.find(s), s) for s in self.stop_strings]
        found = [(i, s) for i, s in found if i >= 0]
        return min(found, default=None)

    def _partial_match_length(self, buffer: str) -> int:
        """Length of the longest end of `buffer` that begins some stop string (text that must wait)."""
        longest = max((len(s) for s in self.stop_strings), default=0)
        for length in range(min(longest - 1, len(buffer)), 0, -1):
            tail = buffer[-length:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return length
        return 0
