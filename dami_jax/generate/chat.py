"""Chat templates through transformers.AutoTokenizer (outputs are split by `dami_jax.thinking`)."""

from __future__ import annotations

import os


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

