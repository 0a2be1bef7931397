"""Chat templates through transformers.AutoTokenizer, and thinking/answer parsing."""

from __future__ import annotations

import os

THINK_END = "</think>"


def load_tokenizer(path_or_id: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(path_or_id))


def chat_prompt(tokenizer, question_or_messages, **template_kwargs) -> list[int]:
    """Token ids of a chat prompt ending with the assistant's generation prompt."""
    messages = question_or_messages
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **template_kwargs)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def split_thinking(text: str) -> tuple[str | None, str]:
    """(thinking, answer): thinking is everything before the last `</think>`.

    Thinking-2507 templates insert `<think>` themselves, so outputs hold only
    `</think>`; a stray leading `<think>` is stripped too. No `</think>`: no thinking.
    """
    cut = text.rfind(THINK_END)
    if cut < 0:
        return None, text.strip()
    thinking = text[:cut].strip()
    if thinking.startswith("<think>"):
        thinking = thinking[len("<think>"):].strip()
    return thinking, text[cut + len(THINK_END):].strip()
