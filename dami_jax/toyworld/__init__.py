"""The toy world: a small System-1/System-2 pair trained by dami_jax itself.

Real Qwen weights cannot be used in tests, so dami_jax ships its own pair of
Hugging Face Qwen3 checkpoints (`assets/pair/{instruct,thinking}`) trained on
chained mod-10 arithmetic:

- `language`: vocabulary, problems with difficulty k, direct answers and
  thinking traces, `parse_answer` / `grade`;
- `tokenizer`: the matching HF tokenizer and Qwen-like chat template;
- `train`: the trainer (`train_pair`, `ToyTrainConfig`, recipe in configs/toyworld.yaml);
- `demo`: the static λ sweep (`dami demo`); the trainer records the same check beside the pair.
"""

import os

from dami_jax.toyworld.language import Problem, grade, parse_answer, sample_problems

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
PAIR_DIR = os.path.join(ASSETS, "pair")
INSTRUCT_DIR = os.path.join(PAIR_DIR, "instruct")
THINKING_DIR = os.path.join(PAIR_DIR, "thinking")

__all__ = ["Problem", "grade", "parse_answer", "sample_problems", "PAIR_DIR", "INSTRUCT_DIR", "THINKING_DIR"]
