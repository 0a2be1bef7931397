"""One choice's text as its tokens arrive: detokenization, stop strings, reasoning/answer split.

Non-streaming responses use `split_thinking` (DESIGN 2.3: thinking is everything
before the last `</think>`). A stream cannot look ahead, so it follows a rule:
when the request's λ is at least `reasoning_lambda` (the phase transition where
outputs start thinking), text is streamed as reasoning until the first
`</think>`, then as content; below it, everything is content. Whitespace around
each part is trimmed as `split_thinking` does (trailing whitespace is held back
until more text follows), so when the output holds one `</think>` (or none and
λ is below the threshold) the streamed deltas add up to the non-streamed fields.

Text that could still become a stop string, a partial UTF-8 character or a
partial `</think>` is held back until the next token settles it.
"""

from __future__ import annotations

from dami_jax.thinking import THINK_END, split_thinking

THINK = "<think>"


class ChoiceText:
    def __init__(self, tokenizer, stop_ids=(), stops=(), *, think_first: bool = False, split: bool = True):
        """think_first: stream text before `</think>` as reasoning (may be set until the first delta)."""
        # The Rust tokenizer directly: transformers' decode() wrapper costs more than the decoding.
        self._decode = getattr(tokenizer, "backend_tokenizer", None) or tokenizer
        self.stop_ids = set(stop_ids)
        self.stops = [s for s in stops if s]
        self.hold = max([len(s) for s in self.stops] + [1]) - 1
        self.think_first, self.split = think_first, split
        self.ids: list[int] = []
        self.text = ""
        # Incremental detokenization: ids[:_read] are in self.text; decoding restarts at _prefix
        # (the previous settle point) so that the window's first token keeps its context (a
        # leading-space rule, bytes of one character). Decoding all ids per token was O(n²).
        self._prefix = self._read = 0
        self.stopped = False  # a stop string ended the text
        self._sent = {"reasoning": 0, "content": 0}

    def add(self, token: int) -> bool:
        """Take a token; True when a stop string now ends the text (the choice should stop)."""
        if self.stopped or token in self.stop_ids:
            return self.stopped
        self.ids.append(int(token))
        settled = self._decode.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        window = self._decode.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(window) <= len(settled) or window.endswith("\ufffd"):  # nothing new, or a partial UTF-8 character
            return False
        start = max(0, len(self.text) - self.hold)
        self.text += window[len(settled):]
        self._prefix, self._read = self._read, len(self.ids)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
        return self.stopped

    def result(self) -> tuple[str | None, str]:
        """(reasoning, content) of the whole text, as a non-streamed response gives them."""
        return split_thinking(self.text) if self.split else (None, self.text)

    def deltas(self, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) text not yet streamed; `final` releases everything held back."""
        text = self.text if (final or self.stopped) else self.text[: len(self.text) - self.hold]
        if not self.split:
            return "", self._take("content", text)
        reasoning, content, closed = "", "", True
        if self.think_first:
            cut = text.find(THINK_END)
            if cut >= 0:
                reasoning, content = text[:cut], text[cut + len(THINK_END):]
            else:
                closed = final or self.stopped
                reasoning = text if closed else text[: len(text) - _partial_tag(text, THINK_END)]
            reasoning = reasoning.lstrip()
            if reasoning.startswith(THINK):
                reasoning = reasoning[len(THINK):]
            elif THINK.startswith(reasoning) and not closed:
                reasoning = ""  # maybe a `<think>` still arriving
            reasoning = _trim(reasoning)
        else:
            content = text
        content = _trim(content)
        return self._take("reasoning", reasoning), self._take("content", content)

    def _take(self, part: str, target: str) -> str:
        sent = self._sent[part]
        if len(target) <= sent:
            return ""
        self._sent[part] = len(target)
        return target[sent:]


def _trim(s: str) -> str:
    """Whitespace around a part never shows (trailing whitespace of an open part waits for more text)."""
    return s.strip()


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that begins `tag` (a tag maybe still arriving)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0

