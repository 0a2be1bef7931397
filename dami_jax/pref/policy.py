"""`pref` / `pref:DIR`: DAMI-Pref inference, λ(q) = argmax of r_φ(q, λ) + β·λ over a fine grid (DESIGN 1.3).

    policy = PrefPolicy.from_dir("dami_jax/pref/assets/toy", pair)   # or build_policy("pref:DIR")
    result = policy(prompts, pair)      # result.lam (B,); info: reward (B,) at the chosen λ

β is the risk knob: β > 0 tilts the choice toward Thinking (more accuracy, more
tokens), β < 0 toward Instruct; a larger β never picks a smaller λ. β = 0 is the
plain argmax. The default is the β stored with the reward model (set by the
calibration of pref/calibrate.py, 0 without one); `pref:DIR:beta=0.5` or
`{name: pref, path: DIR, beta: 0.5}` sets it.

A reward-model directory (written by `train_pref.py`) records the pair it was
trained for; another pair is refused. h(q) is computed on the pair's Instruct
params with the layer, pooling and probe length recorded there.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dami_jax.config import ConfigError
from dami_jax.policies.base import Policy, PolicyResult, pair_fingerprint, register_policy
from dami_jax.pref.features import prompt_features
from dami_jax.pref.reward_model import load_reward_model

DEFAULT_DIR = os.path.join(os.path.dirname(__file__), "assets", "toy")


def tilted_choice(scores_bk, grid_k, beta):
    """Index of argmax_k scores[b, k] + β·grid[k] per row (the first of ties); numpy or jax arrays."""
    xp = jnp if isinstance(scores_bk, jax.Array) else np
    return xp.argmax(scores_bk + beta * grid_k, axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _best(graphdef, state, h_bd, grid_k, beta):
    scores = nnx.merge(graphdef, state).grid_scores(h_bd, grid_k)
    best = tilted_choice(scores, grid_k, beta)
    return grid_k[best], jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0]


class PrefPolicy(Policy):
    def __init__(self, model, spec: dict, path: str | None = None, beta: float | None = None):
        self.model, self.meta, self.path = model, spec, path
        self.graphdef, self.state = nnx.split(model)
        self.grid = jnp.linspace(0.0, 1.0, int(spec.get("inference_points", 101)), dtype=jnp.float32)
        given = spec.get("beta", 0.0) if beta is None else beta
        if isinstance(given, bool) or not isinstance(given, (int, float)) or not np.isfinite(given):
            raise ConfigError(f"pref policy: beta must be a finite number, got {given!r}")
        self.beta = float(given)
        tilt = f":beta={self.beta:g}" if beta is not None else ""
        self.spec = (f"pref:{path}" if path else "pref") + tilt
        self._checked = None

    @classmethod
    def from_dir(cls, path: str | os.PathLike, pair=None, beta: float | None = None) -> "PrefPolicy":
        path = os.fspath(path)
        model, spec = load_reward_model(path)
        policy = cls(model, spec, path, beta)
        if pair is not None:
            policy.check(pair)
        return policy

    def check(self, pair) -> None:
        """Refuse a pair other than the one the reward model was trained on (once per pair object)."""
        key = (id(pair.instruct), id(pair.thinking))
        if self._checked == key:
            return
        found = pair_fingerprint(pair)
        if found != self.meta.get("fingerprint"):
            raise ConfigError(f"reward model {self.path or ''} was trained for pair {self.meta.get('fingerprint')}, "
                              f"but this pair is {found}; train one for it with train_pref.py")
        self._checked = key

    def features(self, prompts, pair, **pixel_inputs) -> np.ndarray:
        """h(q) of each prompt, its images included (pixel_inputs as `generate_pair` takes them)."""
        return prompt_features(pair.cfg, pair.instruct, prompts, layer=int(self.meta["hidden_layer"]),
                               pooling=self.meta["pooling"], batch=int(self.meta.get("feature_batch", 256)),
                               probe_tokens=int(self.meta.get("probe_tokens", 0)),
                               stop_tokens=pair.stop_tokens, **pixel_inputs)

    def __call__(self, prompts, pair, **pixel_inputs) -> PolicyResult:
        if pair is None:
            raise ConfigError("the pref policy needs the pair (its Instruct model computes h(q))")
        self.check(pair)
        lam, reward = self.lam_from_features(self.features(prompts, pair, **pixel_inputs))
        return PolicyResult(lam, {"reward": reward})

    def lam_from_features(self, feats_bd) -> tuple[np.ndarray, np.ndarray]:
        lam, reward = _best(self.graphdef, self.state, jnp.asarray(feats_bd, jnp.float32), self.grid,
                            jnp.float32(self.beta))
        return np.asarray(lam, np.float32), np.asarray(reward, np.float32)

    def grid_scores(self, feats_bd) -> np.ndarray:
        """(B, K) r(q, λ) on the inference grid, untilted (what the β calibration reads)."""
        return np.asarray(self.model.grid_scores(jnp.asarray(feats_bd, jnp.float32), self.grid), np.float32)

    def __repr__(self) -> str:
        return f"PrefPolicy(path={self.path!r}, grid={self.grid.shape[0]} points, beta={self.beta:g})"


def make_pref(pair=None, path: str | None = None, beta: float | None = None) -> PrefPolicy:
    path = path or DEFAULT_DIR
    if not os.path.isdir(path):
        raise ConfigError(f"pref policy: no reward model directory {path} (train one with train_pref.py --out DIR)")
    return PrefPolicy.from_dir(path, pair, beta)


def parse_pref_args(args: list[str]) -> dict:
    """`pref:DIR`, `pref:DIR:beta=X`, `pref:beta=X` (a trailing beta=X; the rest is the path)."""
    out = {}
    if args and args[-1].startswith("beta="):
        out["beta"] = float(args[-1][len("beta="):])
        args = args[:-1]
    if args:
        out["path"] = ":".join(args)
    return out


register_policy("pref", make_pref, parse_pref_args)
