"""One answer's text as the engine interface promises it: deltas whose concatenation is the decoded answer, cut
before the first stop string; the same rules, and the same classes, as the transformers engine's.

Each generated token's text is what services.llm.engine.detokenize's `IncrementalDetokenizer` releases for it (held
back while it ends inside a multi-byte character), passed through `StopStrings` (held back while it may start a
stop string). The end-of-turn token adds no text. When the answer ends for another reason, whatever is held back is
the answer's end, unless it completes a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from services.contract.finish import FinishReason
from services.llm.engine.detokenize import IncrementalDetokenizer, StopStrings


class AnswerText:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_strings: Sequence[str], stop_token_id: int):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = StopStrings(stop_strings)
        self.stop_token_id = stop_token_id

    def add(self, token: int, ending: FinishReason | None) -> tuple[str, FinishReason | None]:
        """The text `token` completes and how the answer ends with it: `ending` is the engine's reason (the stop
        token, a length limit) when this is the last token, None otherwise; a stop string found makes it STOP."""
        text, hit = ("", False) if token == self.stop_token_id else self.stops.feed(self.detokenizer.add(token))
        if hit:
            return text, FinishReason.STOP
        if ending is not None:
            more, hit = self.stops.feed(self.detokenizer.flush())
            text += more if hit else more + self.stops.flush()
            ending = FinishReason.STOP if hit else ending
        return text, ending
