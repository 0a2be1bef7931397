"""Hidden states of Θ(λ) for a grid of λ at once: every layer, pooled per prompt or per token.

One jitted function per batch shape: the pair's delta-mode params (Θ_I, Δ) with
the batch's λ vmapped over the grid, so K models cost one set of 2× weights, not
K merged copies; each λ is a whole batch at that λ (delta mode's per-row λ).
All layers come from one pass (`qwen3.hidden_states(..., layer=None)`),
numbered as HF's output_hidden_states: 0 the embeddings, L after the final norm.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dami_jax.analysis.batching import mesh_of, padded_batches
from dami_jax.errors import InputError
from dami_jax.interpolate import check_lam
from dami_jax.models.qwen3 import hidden_states
from dami_jax.pref.features import pool

POOLINGS = ("mean", "last", "tokens")  # mean / last prompt token per prompt, or every real token


@functools.partial(jax.jit, static_argnames=("cfg", "pooling"))
def _states(cfg, delta, tokens_bt, mask_bt, lams_k, *, pooling: str):
    def at(lam):
        lam_b = jnp.full(tokens_bt.shape[:1], lam, jnp.float32)
        h_lbtd = hidden_states(cfg, delta, tokens_bt, mask_bt, None, lam=lam_b).astype(jnp.float32)
        if pooling == "tokens":
            return h_lbtd
        return jax.vmap(lambda h_btd: pool(h_btd, mask_bt, pooling))(h_lbtd)

    return jax.vmap(at)(lams_k)  # (K, L + 1, B, D) or (K, L + 1, B, T, D)


def layer_states(pair, prompts: list[list[int]], lams, *, pooling: str = "mean", batch: int = 64,
                 progress: bool = True) -> np.ndarray:
    """(K, L + 1, n, D) float32 hidden states of the prompts under Θ(λ_k) for each λ of the grid;
    n is the number of prompts, or with pooling "tokens" their total number of tokens."""
    if pooling not in POOLINGS:
        raise InputError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    lams = jnp.asarray(check_lam(lams, what="λ grid"))
    longest = max(map(len, prompts))
    if longest > pair.cfg.max_position_embeddings:
        raise InputError(f"a prompt of {longest} tokens exceeds the context of {pair.cfg.max_position_embeddings}")
    delta = pair.delta
    out = []
    batches = padded_batches(prompts, batch, pair.cfg.max_position_embeddings, mesh_of(delta))
    for count, (tokens, mask) in tqdm(batches, total=-(-len(prompts) // batch), desc="hidden states",
                                      disable=not progress, leave=False):
        h = np.asarray(jax.device_get(_states(pair.cfg, delta, tokens, mask, lams, pooling=pooling)))[:, :, :count]
        if pooling == "tokens":  # every real token is one input
            h = h[:, :, np.asarray(mask, bool)[:count]]
        out.append(h)
    return np.concatenate(out, axis=2)
