"""DAMI-Pref step 3 (DESIGN 1.3): r_φ(q, λ) = MLP([h(q); f(λ)]) and the Bradley–Terry loss.

h(q) is a cached feature vector (features.py), standardized with statistics of
the training queries that live in the model as `Stat` variables (saved with it,
never trained). f(λ) = [λ, sin(πkλ), cos(πkλ) for k = 1..n] are Fourier features.

    model = RewardModel(d_feat, fourier=8, widths=(128, 128), rngs=nnx.Rngs(0))
    r = model(h_bd, lam_b)                       # (B,)
    loss, acc = bt_loss(model, h_bd, lam_win_b, lam_lose_b)   # −log σ(r_w − r_l), pair accuracy
    model.grid_scores(h_bd, lams_k)              # (B, K)

`save_reward_model` / `load_reward_model` write a directory: reward_model.json
(architecture + caller metadata) and params.npz (every variable, by path).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dami_jax.config import ConfigError
from dami_jax.tree import path_keys

FORMAT = "dami-pref-reward-model/1"


class Stat(nnx.Variable):
    """Feature standardization statistics: part of the model's state, not trained."""


def fourier_features(lam, n: int) -> jax.Array:
    """(..., 1 + 2n) features of λ ∈ [0, 1]."""
    lam = jnp.asarray(lam, jnp.float32)[..., None]
    k = jnp.arange(1, n + 1, dtype=jnp.float32) * jnp.pi
    return jnp.concatenate([lam, jnp.sin(k * lam), jnp.cos(k * lam)], axis=-1)


class RewardModel(nnx.Module):
    def __init__(self, d_feat: int, fourier: int = 8, widths=(128, 128), *, rngs: nnx.Rngs):
        self.d_feat, self.fourier, self.widths = int(d_feat), int(fourier), tuple(int(w) for w in widths)
        self.feat_mean = Stat(jnp.zeros((d_feat,), jnp.float32))
        self.feat_std = Stat(jnp.ones((d_feat,), jnp.float32))
        dims = (self.d_feat + 1 + 2 * self.fourier, *self.widths)
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims, dims[1:])])
        self.head = nnx.Linear(dims[-1], 1, rngs=rngs)

    def set_stats(self, feats_qd) -> None:
        """Standardize features with the mean and std of these (training) queries."""
        f = np.asarray(feats_qd, np.float64)
        self.feat_mean[...] = jnp.asarray(f.mean(0), jnp.float32)
        self.feat_std[...] = jnp.asarray(np.maximum(f.std(0), 1e-6), jnp.float32)

    def __call__(self, h_bd: jax.Array, lam_b: jax.Array) -> jax.Array:
        """r(q, λ) for matching leading shapes: h (..., D), λ (...) -> (...)."""
        if h_bd.shape[-1] != self.d_feat:
            raise ValueError(f"reward model expects features of size {self.d_feat}, got {h_bd.shape}")
        h = (h_bd.astype(jnp.float32) - self.feat_mean[...]) / self.feat_std[...]
        x = jnp.concatenate([h, fourier_features(lam_b, self.fourier)], axis=-1)
        for layer in self.hidden:
            x = jax.nn.gelu(layer(x))
        return self.head(x)[..., 0]

    def grid_scores(self, h_bd: jax.Array, lams_k: jax.Array) -> jax.Array:
        """(B, K) r(q_b, λ_k) for every query and grid point."""
        b, k = h_bd.shape[0], lams_k.shape[0]
        h = jnp.broadcast_to(h_bd[:, None, :], (b, k, h_bd.shape[-1]))
        return self(h, jnp.broadcast_to(lams_k[None, :], (b, k)))


def bt_loss(model: RewardModel, h_bd, lam_win_b, lam_lose_b, weight_b=None):
    """Bradley–Terry BCE −log σ(r(q, λ_w) − r(q, λ_l)) (weighted mean) and pair accuracy."""
    margin = model(h_bd, lam_win_b) - model(h_bd, lam_lose_b)
    w = jnp.ones_like(margin) if weight_b is None else weight_b.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(w), 1.0)
    loss = jnp.sum(w * jax.nn.softplus(-margin)) / denom
    acc = jnp.sum(w * (margin > 0)) / denom
    return loss, acc


# ---------------------------------------------------------------------------
# Export: a small directory readable without Orbax.

def _flat(state) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))
    return {"/".join(path_keys(p)): np.asarray(v) for p, v in leaves}


def save_reward_model(model: RewardModel, directory: str | os.PathLike, meta: dict) -> str:
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    np.savez(os.path.join(directory, "params.npz"), **_flat(nnx.state(model)))
    spec = {"format": FORMAT, "d_feat": model.d_feat, "fourier": model.fourier, "widths": list(model.widths),
            **meta}
    with open(os.path.join(directory, "reward_model.json"), "w") as f:  # last: marks the directory complete
        json.dump(spec, f, indent=1)
    return directory


def load_reward_model(directory: str | os.PathLike) -> tuple[RewardModel, dict]:
    directory = os.fspath(directory)
    spec_path = os.path.join(directory, "reward_model.json")
    if not os.path.isfile(spec_path):
        raise ConfigError(f"{directory}: no reward_model.json (train one with train_pref.py --out DIR)")
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("format") != FORMAT:
        raise ConfigError(f"{spec_path}: format {spec.get('format')!r}, expected {FORMAT!r}")
    model = RewardModel(spec["d_feat"], spec["fourier"], spec["widths"], rngs=nnx.Rngs(0))
    state = nnx.state(model)
    with np.load(os.path.join(directory, "params.npz")) as z:
        saved = dict(z)
    want = _flat(state)
    if set(saved) != set(want) or any(saved[k].shape != want[k].shape for k in want):
        raise ConfigError(f"{directory}/params.npz does not match reward_model.json "
                          f"(keys {sorted(saved)} vs {sorted(want)})")
    nnx.update(model, _unflat(state, saved))
    return model, spec


def _unflat(state, flat: dict):
    def one(path, _):
        return jnp.asarray(flat["/".join(path_keys(path))])

    pure = jax.tree_util.tree_map_with_path(one, nnx.to_pure_dict(state))
    new = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(new, pure)
    return new
