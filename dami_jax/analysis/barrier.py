"""Structural connectivity: the loss of texts along the interpolation path, and its barrier.

L(λ) is the mean negative log-likelihood per scored token of a set of texts
under Θ(λ). The barrier is the largest excess over the straight line between
the endpoints,

    B = max_λ  L(λ) − [(1 − λ)·L(0) + λ·L(1)],

0 when the path is never worse than that line (the models are linearly
connected), positive when a ridge separates them. With a λ schedule
(schedule.py: attention-only, MLP-only, a layer range) the path is
Θ_I + λ·s·Δ and its endpoints are that path's own.

The NLL runs like the hidden states (states.py): delta-mode params for the
schedule, the λ grid vmapped over one batch, `lam_chunk` λ at a time (the
(λ, B, T, V) logits are what bounds memory on a real vocabulary).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dami_jax.analysis.batching import mesh_of, padded_batches
from dami_jax.errors import InputError
from dami_jax.interpolate import check_lam, delta_params
from dami_jax.models.qwen3 import apply
from dami_jax.schedule import Schedule


def barrier_profile(lams, losses) -> np.ndarray:
    """L(λ) − [(1 − λ)·L(0) + λ·L(1)] at each grid point (0 at the endpoints)."""
    lams = np.asarray(lams, np.float64)
    losses = np.asarray(losses, np.float64)
    if lams.ndim != 1 or lams.shape != losses.shape:
        raise InputError(f"lams and losses must be 1-D of one length, got shapes {lams.shape} and {losses.shape}")
    if not (np.isfinite(lams).all() and np.isfinite(losses).all()):
        raise InputError("lams and losses must be finite")
    ends = [np.nonzero(lams == v)[0] for v in (0.0, 1.0)]
    if any(e.size != 1 for e in ends):
        raise InputError(f"the λ grid must hold 0 and 1 exactly once each, got {lams.tolist()}")
    l0, l1 = losses[ends[0][0]], losses[ends[1][0]]
    return losses - ((1.0 - lams) * l0 + lams * l1)


def loss_barrier(lams, losses) -> float:
    """The barrier height max_λ L(λ) − [(1 − λ)·L(0) + λ·L(1)] over a grid holding 0 and 1 (>= 0)."""
    return float(np.max(barrier_profile(lams, losses)))


@functools.partial(jax.jit, static_argnames="cfg")
def _nll_sums(cfg, delta, tokens_bt, mask_bt, targets_bt, weights_bt, lams_k):
    """(K,) summed NLL of the weighted target tokens under Θ_I + λ_k·Δ."""
    def at(lam):
        logits_btv, _ = apply(cfg, delta, tokens_bt, mask_bt, lam=jnp.full(tokens_bt.shape[:1], lam, jnp.float32))
        logp_btv = jax.nn.log_softmax(logits_btv, axis=-1)
        nll_bt = -jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
        return jnp.sum(nll_bt * weights_bt)

    return jax.vmap(at)(lams_k)


def scored_rows(texts: list[tuple[list[int], list[int]]]) -> tuple[list, list, list]:
    """(inputs, targets, weights) of (context, continuation) token lists: the model reads
    context + continuation but the last token, and each continuation token is scored."""
    inputs, targets, weights = [], [], []
    for i, (context, continuation) in enumerate(texts):
        if not context or not continuation:
            raise InputError(f"text {i}: needs a non-empty context and continuation "
                             f"(got {len(context)} and {len(continuation)} tokens)")
        seq = list(context) + list(continuation)
        inputs.append(seq[:-1])
        targets.append(seq[1:])
        weights.append([0] * (len(context) - 1) + [1] * len(continuation))
    return inputs, targets, weights


def mean_nll(pair, texts: list[tuple[list[int], list[int]]], lams, *, schedule: Schedule | None = None,
             batch: int = 16, lam_chunk: int | None = None, progress: bool = True) -> np.ndarray:
    """(K,) mean NLL per continuation token of the texts ((context, continuation) token lists)
    under Θ(λ) along the schedule's path, for each λ of the grid."""
    lams = check_lam(lams, what="λ grid")
    inputs, targets, weights = scored_rows(texts)
    context = pair.cfg.max_position_embeddings
    if max(map(len, inputs)) > context:
        raise InputError(f"a text of {max(map(len, inputs)) + 1} tokens exceeds the context of {context}")
    delta = pair.delta if schedule is None else delta_params(pair.instruct, pair.thinking, schedule=schedule)
    chunk = lam_chunk or lams.size
    sums = np.zeros(lams.size)
    batches = padded_batches(inputs, batch, context, mesh_of(delta), columns=(targets, weights))
    for count, (tokens, mask, tgt, w) in tqdm(batches, total=-(-len(inputs) // batch), desc="NLL",
                                              disable=not progress, leave=False):
        w = w * (jnp.arange(w.shape[0]) < count)[:, None]  # the batch's filler rows are not scored
        for k in range(0, lams.size, chunk):
            sums[k: k + chunk] += np.asarray(_nll_sums(pair.cfg, delta, tokens, mask, tgt, w.astype(jnp.float32),
                                                       jnp.asarray(lams[k: k + chunk])))
    return sums / sum(map(sum, weights))
