"""The toy world: a small System-1/System-2 pair trained by dami_jax itself.

Real Qwen weights cannot be used in tests, so dami_jax ships its own pair of
Hugging Face Qwen3 checkpoints (`assets/pair/{instruct,thinking}`) trained on
chained mod-10 arithmetic, and a second pair of world v2 (`assets/pair_v2`, a
Thinking model with room above it: docs/toyworld_v2.md):

- `language`: vocabulary, problems with difficulty k, direct answers and
  thinking traces, `parse_answer` / `grade`;
- `tokenizer`: the matching HF tokenizer and Qwen-like chat template;
- `train`: the trainer (`train_pair`, `ToyTrainConfig`, recipe in configs/toyworld.yaml);
- `demo`: the static λ sweep (`dami demo`); the trainer records the same check beside the pair.

Where the shipped pair lives (`PAIR_DIR`, `default_pair_dirs`) and how far it
generates (`MAX_NEW_TOKENS`) are defined here, so eval, serve and pref find the
pair without importing the demo.
"""

from __future__ import annotations

import os

from dami_jax.toyworld.language import Problem, grade, parse_answer, sample_problems

PAIR_DIR = os.path.join(os.path.dirname(__file__), "assets", "pair")
PAIR_DIRS = {"v1": PAIR_DIR, "v2": os.path.join(os.path.dirname(__file__), "assets", "pair_v2")}  # by world
MAX_NEW_TOKENS = 96  # the toy pair's generation limit: its longest thinking trace (k = 6) is 80 tokens


def default_pair_dirs(root: str | None = None) -> tuple[str, str]:
    """(instruct, thinking) directories of a toy pair: the shipped one, or one `dami toyworld train` wrote."""
    root = root or PAIR_DIR
    dirs = (os.path.join(root, "instruct"), os.path.join(root, "thinking"))
    for d in dirs:
        if not os.path.isfile(os.path.join(d, "config.json")):
            raise FileNotFoundError(f"{d}: no toy checkpoint (train one with `dami toyworld train --out DIR`)")
    return dirs


__all__ = ["MAX_NEW_TOKENS", "PAIR_DIR", "PAIR_DIRS", "Problem", "default_pair_dirs", "grade", "parse_answer",
           "sample_problems"]
