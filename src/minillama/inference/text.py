"""The text of a completion as its tokens arrive, released only where it can no longer change.

Two things make decoded text rewrite its own tail, so that sending `text[sent:]` as it grows loses characters:
- byte-fallback tokens: a character outside the vocabulary is spelled as its UTF-8 bytes, one token each, and
  SentencePiece decodes an incomplete sequence as one U+FFFD per byte until the last byte arrives;
- stop sequences: a tail that may be the start of one must wait until it is known not to be.
`TextStream` holds both back, so that the pieces it releases always concatenate to the final text: the
decode of the tokens (prompt and completion decoded together), cut before the first stop sequence.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from minillama.tokenizer import Tokenizer

MAX_STOP_STRINGS = 4  # stop strings per request, as OpenAI's API takes them


class TextStream:
    """A completion's text, fed one token at a time; `add` and `finish` return what became final."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self.tokenizer, self.prompt_ids, self.stop = tokenizer, list(prompt_ids), list(stop)
        self.prompt_text = tokenizer.decode(self.prompt_ids)
        self.tokens: list[int] = []
        self.sent = 0  # characters already released
        self.stopped = False  # a stop sequence was found; the text ends before it
        self.text = ""  # everything released so far

    def add(self, token_id: int) -> str:
        """Take the next token; the text that became final (possibly ""). After a stop sequence, nothing."""
        if self.stopped:
            return ""
        self.tokens.append(token_id)
        settled = len(self.tokens) - self._pending_bytes()
        text = self._decode(self.tokens[:settled])
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._release(text[:cut])
        return self._release(text[: len(text) - self._possible_stop_start(text)])

    def finish(self) -> str:
        """The rest of the text once no token follows: held-back bytes (as U+FFFD) and a tail that was not a stop."""
        if self.stopped:
            return ""
        text = self._decode(self.tokens)
        cut = self._first_stop(text)
        self.stopped = cut is not None
        return self._release(text if cut is None else text[:cut])

    def _release(self, text: str) -> str:
        new = text[self.sent :]
        self.sent = max(self.sent, len(text))
        self.text += new
        return new

    def _decode(self, tokens: list[int]) -> str:
        return completion_text(self.tokenizer, self.prompt_ids, tokens, self.prompt_text)

    def _pending_bytes(self) -> int:
        """How many of the last tokens are byte tokens that start a UTF-8 character still missing bytes."""
        trailing = bytearray()
        for token in reversed(self.tokens[-4:]):  # a UTF-8 character is at most 4 bytes
            if not self.tokenizer.is_byte(token):
                break
            trailing.insert(0, self.tokenizer.byte_value(token))
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(bytes(trailing), final=False)
        return len(decoder.getstate()[0])  # bytes it keeps waiting for the rest of a character

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _possible_stop_start(self, text: str) -> int:
        """The length of the longest tail of `text` that a stop sequence starts with."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)


def completion_text(tokenizer: Tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int], prompt_text: str | None = None) -> str:
    """The text the new tokens add to the prompt (whose decoded text may be passed if known). Decoded together
    with the prompt, because SentencePiece drops a leading space when a piece like '▁word' is decoded on its own."""
    prompt_text = tokenizer.decode(prompt_ids) if prompt_text is None else prompt_text
    full = tokenizer.decode([*prompt_ids, *new_ids])
    return full[len(prompt_text) :] if full.startswith(prompt_text) else tokenizer.decode(new_ids)
