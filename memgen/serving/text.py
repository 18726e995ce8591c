"""Turning a choice's token stream into OpenAI text: incremental detokenisation and stop strings.

OpenAI returns the text *before* a stop string, so a streamed choice holds back its last
``longest stop - 1`` characters until they cannot begin a stop string, and a partial UTF-8
character until it decodes.
"""

from __future__ import annotations

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


def cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to the earliest stop string (the whole text if none occurs)."""
    hits = [text.find(s) for s in stops if s in text]
    return text[: min(hits)] if hits else text


class ChoiceText:
    """One choice's text as its tokens arrive; :meth:`push` returns the new text safe to send."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.tokens: list[int] = []
        self.sent = 0
        self.finish_reason: str | None = None
        self.insertions: list = []
        self.logprobs: list[tuple[int, float, list | None]] = []

    def text(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return cut_at_stop(text, self.stops) if self.stops else text

    def push(self, token_id: int, finish_reason: str | None) -> str:
        self.tokens.append(token_id)
        text = self.text()
        if finish_reason is None:
            safe = len(text) - self.hold
            while safe > self.sent and text[safe - 1] == "\ufffd":
                safe -= 1
        else:
            self.finish_reason = FINISH_REASONS.get(finish_reason, finish_reason)
            safe = len(text)
        if safe <= self.sent:
            return ""
        delta, self.sent = text[self.sent : safe], safe
        return delta
