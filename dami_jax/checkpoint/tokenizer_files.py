"""The tokenizer and generation files that travel with a checkpoint.

`dami convert` and `dami merge` copy them from the source model, so their output
loads with `AutoTokenizer` and keeps the source's chat template and generation
defaults. The list covers both tokenizer kinds transformers saves: fast
(`tokenizer.json`) and slow BPE (`vocab.json`, `merges.txt`, `added_tokens.json`)
or SentencePiece (`tokenizer.model`). Only the files present are copied.
"""

from __future__ import annotations

import os
import shutil

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt",
                   "tokenizer.model")


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copy the TOKENIZER_FILES present in `src` into `dst`; returns their names."""
    copied = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(src, name))]
    for name in copied:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return copied
