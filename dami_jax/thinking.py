"""Qwen3's thinking tags, and the one place an output is split into thinking and answer.

The Thinking-2507 chat template ends the generation prompt with `<think>\\n`
itself (DESIGN 2.3), so a decoded output holds only the closing `</think>`.
Everything that parses outputs uses `split_thinking`: `dj.split_thinking`,
grading (only the answer is graded), the server's non-streaming responses and
the toy world's answer parser. The toy vocabulary and the budget policy's
forced cut use these same tags.
"""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"


def split_thinking(text: str) -> tuple[str | None, str]:
    """(thinking, answer) of a decoded output, both stripped of surrounding whitespace.

    - thinking: the text before the *last* `</think>` (earlier ones stay in it),
      without a leading `<think>` (written by the model when a template does
      not insert it); "" when the output starts with `</think>`.
    - no `</think>` at all: thinking is None and the answer is the whole text
      (an Instruct reply, or thinking cut off by the token limit, `<think>` kept).
    """
    thinking, tag, answer = text.rpartition(THINK_END)
    if not tag:
        return None, text.strip()
    thinking = thinking.strip()
    if thinking.startswith(THINK_START):
        thinking = thinking[len(THINK_START):].strip()
    return thinking, answer.strip()
