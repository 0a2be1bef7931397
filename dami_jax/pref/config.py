"""`PrefConfig`: every constant of DAMI-Pref (DESIGN 1.3) as one frozen dataclass.

The pair is named as every command names it (`toy` or a pair YAML): its config
carries the models, dtype, mesh, chat template, max_new_tokens and sampling.
`prompts` names a problem set as `dami eval --bench` does. configs/pref_toy.yaml
holds the toy-world values, configs/pref_qwen3_4b_2507.yaml the Qwen3-4B recipe;
`load_pref_config(path, overrides)` adds dotted `key=value` overrides. Unknown
keys and out-of-range values are `ConfigError`s naming the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

from dami_jax.config import ConfigError, load_yaml
from dami_jax.eval.problem_sets import ProblemSet

DEFAULT_GRID = tuple(round(0.1 * i, 1) for i in range(11))
POOLINGS = ("last", "mean", "probe")


@dataclasses.dataclass(frozen=True)
class PrefConfig:
    # The pair, as every command names it: `toy` or a configs/pair_*.yaml (models, dtype, mesh, chat
    # template, max_new_tokens, sampling), with dotted overrides of its fields (e.g. max_new_tokens=8192).
    pair: str = "toy"
    pair_overrides: tuple[str, ...] = ()
    # Rollout prompts, as `dami eval --bench` names a problem set (eval/problem_sets.py); a share of the
    # queries is held out for the reward model's pair accuracy (and the β calibration).
    prompts: ProblemSet | str | dict = ProblemSet("toy", limit=600, seed=1234)
    heldout_share: float = 0.2
    # Final check (null: none): pref against λ = 1 and λ = 0 on these problems, greedy.
    eval_prompts: ProblemSet | str | dict | None = ProblemSet("toy", limit=300, seed=20261127)
    # 1. Rollouts: n samples per (q, λ) on the grid, with the pair's sampling and max_new_tokens.
    lam_grid: tuple[float, ...] = DEFAULT_GRID
    n_samples: int = 4
    rollout_batch: int = 128  # prompts per `sweep` call (each runs every λ of the grid as engine rows)
    rollout_seed: int = 0
    # 2. Preferences.
    eps_acc: float = 0.0
    eps_cost: float = 0.1
    # 3. Reward model r(q, λ) = MLP([h(q); f(λ)]).
    hidden_layer: int = -1  # HF convention: 0 embeddings, i after layer i, -1 / num_layers final (normed)
    pooling: str = "last"  # "last" token, "mean" over all tokens, "probe": mean over the probe's tokens
    probe_tokens: int = 0  # > 0: h over prompt + the Instruct model's greedy answer of up to this many tokens
    feature_batch: int = 256
    fourier_features: int = 8  # f(λ) = [λ, sin(πkλ), cos(πkλ) for k = 1..n]
    mlp_widths: tuple[int, ...] = (128, 128)
    # 4. Training (AdamW, warmup + cosine), batches of preference pairs from (seed, step).
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    steps: int = 2000
    batch_size: int = 256
    seed: int = 0
    log_every: int = 50
    eval_every: int = 250
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    mesh_data: int = -1  # devices on the data axis (-1: all)
    # 5. Inference: argmax of r(q, ·) + β·λ over a fine grid of this many points on [0, 1]. β = 0
    # unless target_drop is set: then β is the smallest whose held-out accuracy is within target_drop
    # of λ = 1's (pref/calibrate.py), stored with the reward model.
    inference_points: int = 101
    target_drop: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "prompts", ProblemSet.of(self.prompts, "PrefConfig.prompts"))
        if self.eval_prompts is not None:
            object.__setattr__(self, "eval_prompts", ProblemSet.of(self.eval_prompts, "PrefConfig.eval_prompts"))
        grid = self.lam_grid
        checks = [
            (len(grid) >= 2, f"lam_grid needs at least 2 values, got {list(grid)}"),
            (all(isinstance(x, (int, float)) and not math.isnan(x) and 0.0 <= x <= 1.0 for x in grid),
             f"lam_grid values must be in [0, 1], got {list(grid)}"),
            (len(set(grid)) == len(grid), f"lam_grid has duplicates: {list(grid)}"),
            (self.n_samples >= 1, "n_samples must be >= 1"),
            (self.prompts.limit is None or self.prompts.limit >= 2, "prompts: limit must be >= 2"),
            (0.0 < self.heldout_share < 1.0, "heldout_share must be in (0, 1)"),
            (self.rollout_batch >= 1, "rollout_batch must be >= 1"),
            (0.0 <= self.eps_acc < 1.0, "eps_acc must be in [0, 1)"),
            (0.0 <= self.eps_cost < 1.0, "eps_cost must be in [0, 1)"),
            (self.pooling in POOLINGS, f"pooling must be one of {POOLINGS}, got {self.pooling!r}"),
            ((self.pooling == "probe") == (self.probe_tokens > 0) and self.probe_tokens >= 0,
             f"pooling 'probe' goes with probe_tokens > 0 and only with it, got pooling={self.pooling!r}, "
             f"probe_tokens={self.probe_tokens}"),
            (self.fourier_features >= 0, "fourier_features must be >= 0"),
            (all(w >= 1 for w in self.mlp_widths), "mlp_widths must be positive"),
            (self.lr > 0 and self.steps >= 1 and self.batch_size >= 1, "lr, steps, batch_size must be > 0"),
            (min(self.log_every, self.eval_every, self.checkpoint_every, self.keep_checkpoints) >= 1,
             "log_every, eval_every, checkpoint_every, keep_checkpoints must be >= 1"),
            (self.inference_points >= 2, "inference_points must be >= 2"),
            (self.target_drop is None or 0.0 <= self.target_drop <= 1.0, "target_drop must be in [0, 1] or null"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"PrefConfig: {msg}")

    def fingerprint(self, fields: tuple[str, ...]) -> str:
        """sha256 (12 hex) of the named fields: ties caches/checkpoints to the settings they used."""
        data = {f: getattr(self, f) for f in fields}
        text = json.dumps(data, sort_keys=True, default=dataclasses.asdict)  # ProblemSet fields as dicts
        return hashlib.sha256(text.encode()).hexdigest()[:12]


ROLLOUT_FIELDS = ("pair", "pair_overrides", "lam_grid", "n_samples", "rollout_seed")
FEATURE_FIELDS = ("hidden_layer", "pooling", "probe_tokens")
MODEL_FIELDS = FEATURE_FIELDS + ("fourier_features", "mlp_widths")
TRAIN_FIELDS = MODEL_FIELDS + ROLLOUT_FIELDS + (
    "prompts", "heldout_share", "eps_acc", "eps_cost", "lr", "weight_decay",
    "warmup_steps", "steps", "batch_size", "seed")


def load_pref_config(path: str | os.PathLike | None = None, overrides=()) -> PrefConfig:
    return load_yaml(PrefConfig, path, list(overrides))
