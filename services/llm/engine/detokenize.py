"""Streaming text out of generated token ids, and stop strings.

`IncrementalDetokenizer` is TGI's offset scheme: decode a short window of recent tokens twice (without and with the
new ones) and emit the difference, holding text back while it ends inside a multi-byte character. Special tokens are
skipped, as the original decodes its answer with `skip_special_tokens=True`; the concatenated deltas, with `flush()`
at the end, equal `tokenizer.decode(generated, skip_special_tokens=True)` up to a stop string.

`StopStrings` finds the first stop string in the text and holds back any tail that could still grow into one, so the
stop string itself is never sent.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        """Appends one token; returns the text it completes (possibly "")."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """The text `add` still holds back, replacement characters included, for when the sequence ends.

        With it, the deltas equal `tokenizer.decode(ids, skip_special_tokens=True)` even when the ids end inside a
        multi-byte character (or on a token that decodes to U+FFFD itself).
        """
        if self.read_offset == len(self.ids):
            return ""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]


class StopStrings:
    """Accumulates text; `feed` returns (text safe to send now, whether a stop string was reached)."""

    def __init__(self, stop_strings: Sequence[str]):
        self.stop_strings = tuple(stop_strings)
        self.longest = max((len(s) for s in self.stop_strings), default=0)
        self.text = ""
        self.sent = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self.stop_strings:
            self.text += delta
            self.sent = len(self.text)
            return delta, False
        search_from = max(0, len(self.text) - self.longest + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop_strings) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.sent:end]
            self.text, self.sent = self.text[:end], end
            return out, True
        safe = len(self.text) - self._partial_tail()
        out = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out, False

    def flush(self) -> str:
        """Text held back as a possible stop-string start, sent when generation ends for another reason."""
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out

    def _partial_tail(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        for length in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-length:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return length
        return 0
