"""Text out of a growing list of token ids, a piece at a time, with stop strings.

Two problems, one layer each:

- A token is not a piece of text. Byte-fallback and byte-level tokens can hold part of a UTF-8 character, and
  SentencePiece drops the leading space of the first token it decodes. `IncrementalDetokenizer` decodes a short
  window of tokens twice, with and without the newest ones, and emits the difference only when it does not end in
  U+FFFD (an incomplete character). The window starts inside the prompt, so the first generated word gets the
  space in front of it, and both decodes drop the same leading space. (The same scheme as Hugging Face's
  text-generation-inference and vLLM: prefix and read offsets.)
- A stop string can arrive split over several tokens. `StopStrings` never emits text that could still turn out to
  be the start of a stop string: it holds back the longest suffix of the text that is a prefix of one. When a stop
  string appears, the text up to it is emitted and the stop string is not.

`TextStream` puts the two together for one sequence. The concatenation of what it emits is the sequence's text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHARACTER = "\ufffd"  # what decoding an incomplete UTF-8 sequence gives
PROMPT_CONTEXT_TOKENS = 6  # prompt tokens decoded with the first generated ones (enough for a leading space)


class IncrementalDetokenizer:
    """Decodes tokens appended one or a few at a time into stable pieces of text."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # the window starts here
        self.read_offset = len(self.ids)  # text of ids[prefix_offset:read_offset] has been emitted

    def push(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the text they complete (possibly "")."""
        self.ids.extend(token_ids)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHARACTER):
            return ""  # nothing new, or the last character is not complete yet
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """The text not emitted yet, complete or not (the sequence has ended)."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]


class StopStrings:
    """Emits text that cannot be the start of a stop string; finds the first stop string as text arrives."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(stop)
        self.held = ""  # received, not emitted: a suffix that some stop string starts with
        self.matched: str | None = None  # the stop string found, once found

    def push(self, text: str) -> str:
        """Receive text; return what can be emitted. After a match, nothing more is emitted."""
        if self.matched is not None:
            return ""
        self.held += text
        if not self.stop:
            out, self.held = self.held, ""
            return out
        # Emitted text never ends in a prefix of a stop string, so any match starts inside `held`.
        found = [(self.held.find(s), -len(s), s) for s in self.stop if s in self.held]
        if found:
            start, _, self.matched = min(found)  # the earliest; at equal starts the longest
            out, self.held = self.held[:start], ""
            return out
        keep = max((n for s in self.stop for n in range(min(len(s) - 1, len(self.held)), 0, -1)
                    if self.held.endswith(s[:n])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        """The held text (the sequence ended for another reason: it is not a stop string after all)."""
        out, self.held = ("" if self.matched is not None else self.held), ""
        return out


class TextStream:
    """One sequence's text: `push(token_ids)` returns the new stable text, and whether a stop string ended it."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), stop: Sequence[str] = ()) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = StopStrings(stop)

    @property
    def matched(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self.stops.matched

    def push(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        text = self.stops.push(self.detokenizer.push(token_ids))
        return text, self.stops.matched is not None

    def finish(self) -> str:
        """The rest of the text when the sequence ends (EOS, a stop token, length). A stop string may still be
        found in text that was waiting for its character to complete."""
        text = self.stops.push(self.detokenizer.flush())
        return text + self.stops.flush()


__all__ = ["IncrementalDetokenizer", "StopStrings", "TextStream"]
