"""The toy world's Hugging Face tokenizer, loadable with `transformers.AutoTokenizer`.

Word-level over `language.VOCAB`: every character is its own token except the
multi-character words (`\\boxed{`, role names, template and think tokens), which
are added tokens so they are matched whole before the per-character split (and
so the DAMI-Conf policy, which skips added tokens, treats them as format).
Spaces are dropped (they carry nothing in this language). Decoding concatenates,
so `decode(encode(text)) == text` for text in the language.

The chat template is Qwen-like (`<|im_start|>role\\n...<|im_end|>\\n`); like
Qwen3-Thinking-2507 its generation prompt ends with `<think>\\n`, so model outputs
contain only `</think>`. Earlier assistant turns keep only their answer part.
"""

from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from dami_jax.toyworld import language as L

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)

MODEL_MAX_LENGTH = 128


def build_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(L.VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=L.UNK))
    tok.normalizer = normalizers.Replace(" ", "")
    # Any one character, newline included ("." would skip "\n").
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    multi_char = [w for w in L.WORDS if len(w) > 1]
    tok.add_tokens([AddedToken(w, normalized=False, special=False) for w in multi_char])
    tok.add_special_tokens([AddedToken(w, normalized=False, special=True) for w in L.SPECIAL])
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": L.EOS,
        "pad_token": L.PAD,
        "unk_token": L.UNK,
        "additional_special_tokens": [L.IM_START, L.IM_END],  # all_special_ids, as in Qwen
        "bos_token": None,
        "add_bos_token": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "left",  # generation pads prompts on the left
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer(out_dir: str | os.PathLike) -> dict[str, str]:
    """Write tokenizer.json and tokenizer_config.json; returns {file name: path}."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    files = {"tokenizer.json": os.path.join(out_dir, "tokenizer.json"),
             "tokenizer_config.json": os.path.join(out_dir, "tokenizer_config.json")}
    build_tokenizer().save(files["tokenizer.json"])
    with open(files["tokenizer_config.json"], "w") as f:
        json.dump(tokenizer_config(), f, indent=2)
    return files
