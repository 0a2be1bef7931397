"""A self-contained check of a toy pair: greedy decoding over a λ grid.

Used by the trainer to record, beside the shipped checkpoints, what the pair
does: accuracy and tokens per difficulty, the share of outputs that think
(contain `</think>`), and what a per-query oracle over the λ grid would save.
It needs only `models.qwen3.apply` (the project's generate/ is not required),
and relies on the toy world's fixed-width prompts: all prompts have one length,
so no padding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dami_jax.config import ModelConfig
from dami_jax.models.kv_cache import KVCache
from dami_jax.models.qwen3 import apply
from dami_jax.toyworld import language as L


def interpolate(instruct, thinking, lam: float):
    """Θ(λ) = λ·Θ_T + (1 − λ)·Θ_I."""
    return jax.tree.map(lambda i, t: (1.0 - lam) * i + lam * t, instruct, thinking)


@functools.partial(jax.jit, static_argnums=(0, 3))
def greedy_decode(mcfg: ModelConfig, params, prompts_bp: jax.Array, max_new: int) -> jax.Array:
    """(B, max_new) greedy continuations of equal-length prompts; PAD after EOS."""
    b, p = prompts_bp.shape
    cache = KVCache.init(mcfg, b, p + max_new, jnp.float32)
    logits, cache = apply(mcfg, params, prompts_bp, jnp.ones_like(prompts_bp), cache=cache)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def step(carry, _):
        tok, cache, done = carry
        logits, cache = apply(mcfg, params, tok[:, None], jnp.ones((b, 1), jnp.int32), cache=cache)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, L.PAD_ID, nxt)
        return (nxt, cache, done | (nxt == L.EOS_ID)), nxt

    _, rest = jax.lax.scan(step, (first, cache, first == L.EOS_ID), None, length=max_new - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def output_lengths(out: np.ndarray) -> np.ndarray:
    """Generated tokens per row, EOS included (max_new when EOS never came)."""
    is_eos = out == L.EOS_ID
    return np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, out.shape[1])


def decode_problems(mcfg, params, problems, max_new: int = 88):
    """(texts, lengths) of greedy outputs for `problems`."""
    prompts = np.asarray([L.to_ids(L.prompt_tokens(p)) for p in problems], np.int32)
    out = np.asarray(greedy_decode(mcfg, params, jnp.asarray(prompts), max_new))
    return [L.decode(row) for row in out], output_lengths(out)


def evaluate_pair(mcfg, instruct, thinking, per_k: int, lams, seed: int, progress: bool = True) -> dict:
    """Per-λ accuracy / tokens / thinking share (overall and by k) and the oracle."""
    problems = L.sample_problems(per_k * L.MAX_OPS, seed)
    ks = np.asarray([p.k for p in problems])
    correct, tokens, by_lam = [], [], {}
    for lam in tqdm(lams, desc="toy eval (λ grid)", disable=not progress, dynamic_ncols=True):
        texts, lengths = decode_problems(mcfg, interpolate(instruct, thinking, float(lam)), problems)
        ok = np.asarray([L.grade(p, t) for p, t in zip(problems, texts)])
        think = np.asarray([L.THINK_END in t for t in texts])
        correct.append(ok)
        tokens.append(lengths)
        by_lam[f"{float(lam):.2f}"] = {
            "accuracy": float(ok.mean()), "mean_tokens": float(lengths.mean()),
            "think_share": float(think.mean()),
            "accuracy_by_k": [float(ok[ks == k].mean()) for k in range(1, L.MAX_OPS + 1)],
            "tokens_by_k": [float(lengths[ks == k].mean()) for k in range(1, L.MAX_OPS + 1)],
            "think_share_by_k": [float(think[ks == k].mean()) for k in range(1, L.MAX_OPS + 1)],
        }
    summary = {"per_k": per_k, **oracle(np.asarray(correct), np.asarray(tokens), lams)}
    return {"summary": summary, "by_lambda": by_lam}


def oracle(correct_lq: np.ndarray, tokens_lq: np.ndarray, lams) -> dict:
    """Per query, the cheapest correct λ of the grid (λ=1 when none is correct);
    savings are relative to the tokens of λ = max(lams)."""
    top = int(np.argmax(lams))
    cost = np.where(correct_lq, tokens_lq, np.inf).min(axis=0)
    any_ok = correct_lq.any(axis=0)
    cost = np.where(any_ok, cost, tokens_lq[top])
    return {
        "oracle_accuracy": float(any_ok.mean()),
        "oracle_mean_tokens": float(cost.mean()),
        "top_lambda_accuracy": float(correct_lq[top].mean()),
        "top_lambda_mean_tokens": float(tokens_lq[top].mean()),
        "oracle_token_savings": float(1.0 - cost.sum() / tokens_lq[top].sum()),
    }
