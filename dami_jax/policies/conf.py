"""DAMI-Conf (DESIGN 1.2): λ from the Instruct model's uncertainty and the pair's disagreement.

`conf_signals` is the whole scoring as one jitted function of (params_I, params_T,
tokens, mask). The Instruct model greedily writes a probe of P tokens y_1..y_P;
the Thinking model is teacher-forced on the same tokens in lock step (both hold
a KV cache), so position j has p_I = P_I(·|prompt, y_<j) and p_T likewise —
exactly the distributions of teacher forcing on prompt + probe. Per position:
  A = H(p_I)/log|V|,  D = JS(p_I, p_T)/log 2,  M = 1 − max p_I.
Position j is content iff y_j (the token it predicts; y_j = argmax p_I since the
probe is greedy) is not a format token and the probe has not ended before j.
The EOS position itself is a format position. Format tokens: the stop ids, the
tokenizer's special and added tokens and `exclude_tokens` (configurable). The
signals are aggregated (mean or max) over content positions, 0 when there is
none (`n_content` = 0 flags it), and
  s = w_A·A + w_D·D + w_M·M,  λ = λ_min + (λ_max − λ_min)·σ((s − μ)/τ).
μ and τ come from a `Calibration` (calibration.py), which this policy requires.
With w_D = 0 (the toy pair's setting) the Thinking model does not enter s, so its teacher-forced
pass is skipped (about half the scoring's work) and D is reported as NaN; callers that
want D anyway (the supervised fit, the signal benchmark) ask for it with `with_js`.
Image prompts (Qwen3-VL): each model's prefill is the VL one (its own tower's rows spliced in,
M-RoPE positions), which leaves its cache's next position at the row's max position + 1, so
the probe's steps are the text steps, as in generation (generate/decode.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dami_jax.errors import InputError
from dami_jax.generate.decode import bucket_length
from dami_jax.models import qwen3_vl
from dami_jax.models.kv_cache import KVCache
from dami_jax.models.qwen3 import apply
from dami_jax.policies.base import Policy, PolicyResult, padded_chunk, pixel_inputs_of, register_policy
from dami_jax.policies.calibration import resolve_calibration
from dami_jax.policies.conf_config import ConfConfig, load_conf_config  # noqa: F401 (re-exported)

INFO = ("score", "entropy", "js", "maxprob", "n_content", "probe_len")


@struct.dataclass
class ScoreCoeffs:
    """The numbers that turn signals into s and λ, all traced: recalibrating (μ, τ), new weights or
    switching mean/max aggregation reuse the compiled scoring. The flag is traced too because both
    aggregations of a (B, P) array cost nothing next to the probe."""

    w_entropy: jax.Array  # w_A
    w_js: jax.Array  # w_D (left out of s when D is not measured)
    w_maxprob: jax.Array  # w_M
    mu: jax.Array
    tau: jax.Array
    lam_min: jax.Array
    lam_max: jax.Array
    max_aggregate: jax.Array  # bool: max over content positions, else mean

    @classmethod
    def of(cls, cfg: ConfConfig, mu: float = 0.0, tau: float = 1.0) -> "ScoreCoeffs":
        f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
        return cls(w_entropy=f32(cfg.w_entropy), w_js=f32(cfg.w_js), w_maxprob=f32(cfg.w_maxprob),
                   mu=f32(mu), tau=f32(tau), lam_min=f32(cfg.lam_min), lam_max=f32(cfg.lam_max),
                   max_aggregate=jnp.asarray(cfg.aggregate == "max"))


# ---------------------------------------------------------------------------
# The jitted scoring.

def position_signals(logits_i, logits_t=None):
    """(A, D, M) at one position from (..., V) float32 logits of both models (D = 0 without logits_t)."""
    lp_i = jax.nn.log_softmax(logits_i, -1)
    p_i = jnp.exp(lp_i)
    ent = -jnp.sum(p_i * lp_i, -1) / math.log(logits_i.shape[-1])
    if logits_t is None:
        return ent, jnp.zeros_like(ent), 1.0 - jnp.max(p_i, -1)
    lp_t = jax.nn.log_softmax(logits_t, -1)
    lp_m = jnp.logaddexp(lp_i, lp_t) - math.log(2.0)
    js = 0.5 * jnp.sum(p_i * (lp_i - lp_m), -1) + 0.5 * jnp.sum(jnp.exp(lp_t) * (lp_t - lp_m), -1)
    return ent, jnp.clip(js / math.log(2.0), 0.0, 1.0), 1.0 - jnp.max(p_i, -1)


@functools.partial(jax.jit, static_argnames=("cfg", "probe_len", "with_js"))
def conf_signals(cfg, params_i, params_t, tokens_bt, mask_bt, exclude_ids, stop_ids, coeffs: ScoreCoeffs,
                 vision: qwen3_vl.VisionInputs | None = None, *, probe_len: int, with_js: bool = True) -> dict:
    """Probe, per-position and aggregated signals, score and λ for a left-padded batch.

    exclude_ids / stop_ids: 1-D int arrays (-1 padded). coeffs: a `ScoreCoeffs` (traced).
    vision: the batch's images (`qwen3_vl.batch_vision_inputs`), None for text prompts.
    with_js=False: the Thinking model is not run, D is NaN and left out of s.
    """
    b, t = tokens_bt.shape
    models = (params_i, params_t) if with_js else (params_i,)
    caches = [KVCache.init(cfg, b, t + probe_len, jax.tree.leaves(p)[0].dtype) for p in models]

    def prefill(params, cache):
        if vision is None:
            return apply(cfg, params, tokens_bt, mask_bt, cache=cache, last_only=True)
        return qwen3_vl.apply(cfg, params, tokens_bt, mask_bt, vision, cache=cache, last_only=True)

    first = [prefill(p, c) for p, c in zip(models, caches)]

    def emit(logits, ended):  # the probe token at this position and its signals
        tok = jnp.where(ended, 0, jnp.argmax(logits[0], -1).astype(jnp.int32))
        return tok, (tok, ~ended, *position_signals(*logits)), ended | jnp.isin(tok, stop_ids)

    def step(carry):
        i, tok, caches, ended, bufs = carry
        ones = jnp.ones((b, 1), jnp.int32)
        stepped = [apply(cfg, p, tok[:, None], ones, cache=c) for p, c in zip(models, caches)]
        tok, out, ended = emit([lg[:, -1] for lg, _ in stepped], ended)
        bufs = tuple(buf.at[:, i].set(x) for buf, x in zip(bufs, out))
        return i + 1, tok, [c for _, c in stepped], ended, bufs

    def running(carry):  # positions after a row's stop token are invalid: stop once every row has one
        return (carry[0] < probe_len) & ~jnp.all(carry[3])

    tok, out, ended = emit([lg[:, -1] for lg, _ in first], jnp.zeros((b,), bool))
    bufs = tuple(jnp.zeros((b, probe_len), x.dtype).at[:, 0].set(x) for x in out)
    init = (1, tok, [c for _, c in first], ended, bufs)
    *_, (probe, valid, ent, js, maxp) = jax.lax.while_loop(running, step, init)
    ent, js, maxp = (jnp.where(valid, x, 0.0) for x in (ent, js, maxp))  # a row's positions after its end: 0
    content = valid & ~jnp.isin(probe, exclude_ids)
    n = jnp.sum(content, 1)

    def agg(x):
        x = jnp.where(content, x, 0.0)
        return jnp.where(coeffs.max_aggregate, jnp.max(x, 1), jnp.sum(x, 1) / jnp.maximum(n, 1))

    a, d, m = agg(ent), agg(js), agg(maxp)
    score = coeffs.w_entropy * a + coeffs.w_maxprob * m
    if with_js:
        score = score + coeffs.w_js * d
    else:  # D was not measured
        js, d = jnp.full_like(js, jnp.nan), jnp.full_like(d, jnp.nan)
    lam = coeffs.lam_min + (coeffs.lam_max - coeffs.lam_min) * jax.nn.sigmoid((score - coeffs.mu) / coeffs.tau)
    return dict(probe=probe, probe_len=jnp.sum(valid, 1), content=content, entropy_pos=ent, js_pos=js,
                maxprob_pos=maxp, entropy=a, js=d, maxprob=m, n_content=n, score=score, lam=lam)


# ---------------------------------------------------------------------------
# Host side: format-token ids, batching.

def format_token_ids(pair, cfg: ConfConfig) -> list[int]:
    """Ids whose positions are excluded: stop ids, `exclude_ids`, and from the
    tokenizer (when the pair has one) special/added tokens and `exclude_tokens`."""
    ids = set(int(i) for i in cfg.exclude_ids) | set(int(i) for i in pair.stop_tokens)
    tok = pair.tokenizer
    if tok is not None:
        if cfg.exclude_special:  # declared special tokens and added tokens flagged special
            ids |= set(tok.all_special_ids)
            ids |= {i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        if cfg.exclude_added:
            ids |= set(tok.get_added_vocab().values())
        vocab = tok.get_vocab()
        ids |= {vocab[s] for s in cfg.exclude_tokens if s in vocab}
    return sorted(i for i in ids if 0 <= i < pair.cfg.vocab_size)


def _padded_ids(ids) -> jax.Array:
    """-1 padded to a power of two (>= 16), so id sets of similar size share one compile."""
    ids = list(ids)
    return jnp.asarray(ids + [-1] * (bucket_length(len(ids), 1 << 30) - len(ids)), jnp.int32)


def padded_rows(n: int, batch_size: int) -> int:
    """Rows `score_prompts` scores for a chunk of n prompts: a power of two (few batch shapes to
    compile), not the sequence-length buckets' minimum of 16, so one request scores one row."""
    return min(batch_size, 1 << (n - 1).bit_length())


def score_prompts(pair, prompts, cfg: ConfConfig, mu: float = 0.0, tau: float = 1.0,
                  with_js: bool | None = None, **pixel_inputs) -> dict:
    """`conf_signals` over `prompts` in batches of cfg.batch_size; numpy arrays, one row per prompt.
    with_js: run the Thinking model for D (default: only when w_D ≠ 0). pixel_inputs: Qwen3-VL
    images / video of the prompts, as `generate_pair` takes them."""
    pixels = pixel_inputs_of(pixel_inputs)
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("conf scoring needs a non-empty list of non-empty prompts")
    context, probe = pair.cfg.max_position_embeddings, cfg.probe_tokens
    if max(map(len, prompts)) + probe > context:
        raise InputError(f"prompt of {max(map(len, prompts))} tokens + a probe of {probe} exceeds the "
                         f"context of {context} tokens")
    excl, stops = _padded_ids(format_token_ids(pair, cfg)), _padded_ids(pair.stop_tokens)
    coeffs = ScoreCoeffs.of(cfg, mu, tau)
    outs = []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start: start + cfg.batch_size]
        rows = padded_rows(len(chunk), cfg.batch_size)
        width = bucket_length(max(map(len, chunk)), context - probe)
        tokens, mask, vision = padded_chunk(pair.cfg, prompts, start, len(chunk), rows, width, pixels)
        out = conf_signals(pair.cfg, pair.instruct, pair.thinking, jnp.asarray(tokens), jnp.asarray(mask),
                           excl, stops, coeffs, vision, probe_len=probe,
                           with_js=cfg.w_js != 0 if with_js is None else with_js)
        outs.append({k: np.asarray(v)[: len(chunk)] for k, v in jax.device_get(out).items()})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def finished_probes(out: dict, stop_ids) -> tuple:
    """Per row of `score_prompts`' output: the probe's tokens if they end in a stop id (the
    Instruct model's whole greedy answer), else None."""
    stops = set(int(s) for s in stop_ids)
    rows = (out["probe"][i, : out["probe_len"][i]].tolist() for i in range(len(out["probe_len"])))
    return tuple(r if r and r[-1] in stops else None for r in rows)


# ---------------------------------------------------------------------------
# The policy.

class ConfPolicy(Policy):
    """λ per query from a calibration (its ConfConfig is the policy's config)."""

    def __init__(self, calibration, path: str | None = None):
        self.calibration = calibration
        self.spec = f"conf:{path}" if path else "conf"

    def __call__(self, prompts, pair, **pixel_inputs) -> PolicyResult:
        cal = self.calibration
        cal.check(pair)
        out = score_prompts(pair, prompts, cal.conf, cal.mu, cal.tau, **pixel_inputs)
        return PolicyResult(out["lam"], {k: out[k] for k in INFO}, finished_probes(out, pair.stop_tokens))


def make_conf(pair=None, calibration: str | None = None, config: str | None = None) -> ConfPolicy:
    cal, path = resolve_calibration(calibration, config, pair)
    return ConfPolicy(cal, path)


register_policy("conf", make_conf, lambda args: {"calibration": ":".join(args)})
