"""Grouped-query attention over a KV cache, in the readable and the XLA:CPU-tuned layout.

Query head n = j·G + g reads kv head j (G = N / K query heads per kv head), as
HF's repeat_kv. Both layouts compute the same thing; models/kv_cache.py says
what each cache layout is and why the cpu one exists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dami_jax.config import ModelConfig
from dami_jax.engine.paged_attention import paged_attention, write_kv
from dami_jax.engine.pages import RaggedBatch
from dami_jax.models.layers import Linear, RMSNorm, rope
from dami_jax.models.sharding import ACTIVATIONS, constrain

_MASKED = jnp.finfo(jnp.float32).min


def allowed_keys(key_valid_bs: jax.Array, q_slot_t: jax.Array) -> jax.Array:
    """(B, T, S) bool: query t may attend key slot s (a valid key at or before its own slot)."""
    k_slot = jnp.arange(key_valid_bs.shape[1])
    return key_valid_bs[:, None, :] & (k_slot[None, None, :] <= q_slot_t[None, :, None])


def attend(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, allowed_bts: jax.Array) -> jax.Array:
    """Softmax attention (B, T, N, H) of queries over S key/value slots (readable layout)."""
    b, t, n, h = q_btnh.shape
    kv_heads = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, kv_heads, n // kv_heads, h)
    scores_bkgts = jnp.einsum("BTKGH,BSKH->BKGTS", q_btkgh, k_bskh, preferred_element_type=jnp.float32)
    scores_bkgts = jnp.where(allowed_bts[:, None, None], scores_bkgts * h**-0.5, _MASKED)
    probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(v_bskh.dtype)
    out_btkgh = jnp.einsum("BKGTS,BSKH->BTKGH", probs_bkgts, v_bskh)
    return out_btkgh.reshape(b, t, n, h)


def attend_cpu(q_nqh: jax.Array, k_nsh: jax.Array, v_nhs: jax.Array, allowed_bts: jax.Array) -> jax.Array:
    """Softmax attention over the cache slots S: (N, H, G·T) for the query rows (G, T) of
    each (row, kv head) n = b·K + j (row g·T + t), keys/values in the cpu cache layout,
    allowed_bts from allowed_keys.

    The cache is each dot's left operand (its S slots the product's rows, the few query rows
    its columns), and the barrier keeps XLA from folding the small transpose of the scores
    into the first dot. With the query rows first, XLA:CPU ran decode attention 1.2-3.2x slower
    (benchmarks/attention_dots.py).
    """
    n, s, h = k_nsh.shape
    b, t = allowed_bts.shape[:2]
    scores = jnp.einsum("nsh,nqh->nsq", k_nsh, q_nqh, preferred_element_type=jnp.float32)
    scores = jax.lax.optimization_barrier(scores).swapaxes(1, 2)
    scores = (scores * (h ** -0.5)).reshape(b, n // b, -1, t, s)
    scores = jnp.where(allowed_bts[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_nhs.dtype).reshape(n, -1, s)
    return jnp.einsum("nhs,nqs->nhq", v_nhs, probs)


def _readable(q_btnh, k_btkh, v_btkh, allowed_bts, kv, index):
    if kv is not None:  # write this chunk into the cache, attend over all slots
        k_btkh = jax.lax.dynamic_update_slice(kv[0], k_btkh.astype(kv[0].dtype), (0, index, 0, 0))
        v_btkh = jax.lax.dynamic_update_slice(kv[1], v_btkh.astype(kv[1].dtype), (0, index, 0, 0))
        k_btkh, v_btkh = constrain(k_btkh, ACTIVATIONS.heads), constrain(v_btkh, ACTIVATIONS.heads)
    return attend(q_btnh, k_btkh, v_btkh, allowed_bts), (k_btkh, v_btkh)


def _cpu(q_btnh, k_btkh, v_btkh, allowed_bts, kv, index):
    b, t, n, h = q_btnh.shape
    nk = k_btkh.shape[2]
    g = n // nk
    k = k_btkh.transpose(0, 2, 1, 3).reshape(b * nk, t, h)
    v = v_btkh.transpose(0, 2, 3, 1).reshape(b * nk, h, t)
    if kv is not None:
        k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0))
        v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, 0, index))
    q_nqh = q_btnh.reshape(b, t, nk, g, h).transpose(0, 2, 3, 1, 4).reshape(b * nk, g * t, h)
    out = attend_cpu(q_nqh, k, v, allowed_bts).reshape(b, nk, h, g, t)
    return out.transpose(0, 4, 1, 3, 2).reshape(b, t, n, h), (k, v)


def _paged(q_btnh, k_btkh, v_btkh, kv, batch: RaggedBatch, kernel: str):
    """The flat batch (T, 1): write this step's keys/values into the pools kv (k_pool, v_pool),
    then attend over each row's pages (with `kernel` when every row decodes; on the CPU a
    Pallas kernel runs in Pallas's interpreter, as in the tests)."""
    k_pool, v_pool = write_kv(*kv, k_btkh[:, 0], v_btkh[:, 0], batch.slot_ids)
    impl = kernel if batch.decode_only else "xla"
    out_thd = paged_attention(q_btnh[:, 0], k_pool, v_pool, batch.cu_q_lens, batch.kv_lens, batch.page_table,
                              impl=impl, decode_only=batch.decode_only,
                              interpret=impl != "xla" and jax.default_backend() == "cpu")
    return out_thd[:, None], (k_pool, v_pool)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, delta: bool, dtype, rngs: nnx.Rngs | None, layout: str):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(delta=delta, dtype=dtype, rngs=rngs, layout=layout)
        self.q_proj = Linear("BTD,NHD->BTNH", (n, h), (d,), bias=cfg.qkv_bias, **kw)
        self.k_proj = Linear("BTD,KHD->BTKH", (k, h), (d,), bias=cfg.qkv_bias, **kw)
        self.v_proj = Linear("BTD,KHD->BTKH", (k, h), (d,), bias=cfg.qkv_bias, **kw)
        self.o_proj = Linear("BTNH,DNH->BTD", (d,), (n, h), bias=cfg.o_bias, **kw)  # HF's (D, N·H)
        self.q_norm = RMSNorm(h, cfg.rms_norm_eps, **kw) if cfg.qk_norm else None
        self.k_norm = RMSNorm(h, cfg.rms_norm_eps, **kw) if cfg.qk_norm else None
        self.rope_theta, self.rope_scaling = cfg.rope_theta, cfg.rope_scaling
        self.mrope = None if cfg.vl is None else (cfg.vl.mrope_section, cfg.vl.mrope_interleaved)
        self.layout = layout
        self.paged_kernel = cfg.paged_attention

    def __call__(self, x_btd, pos_bt, allowed_bts, kv, index, lam):
        """Attention output (B, T, D) and this layer's keys/values: the updated cache
        `kv` (k, v) written at slot `index`, or this chunk's own without a cache.
        Paged (the engine's step): `index` is a RaggedBatch, x the flat batch (T, 1, D) and
        `kv` this layer's pools (k_pool, v_pool), returned updated."""
        q_btnh, k_btkh = self.q_proj(x_btd, lam), self.k_proj(x_btd, lam)
        if self.q_norm is not None:
            q_btnh, k_btkh = self.q_norm(q_btnh, lam), self.k_norm(k_btkh, lam)
        q_btnh = rope(q_btnh, pos_bt, self.rope_theta, self.rope_scaling, self.mrope)
        k_btkh = rope(k_btkh, pos_bt, self.rope_theta, self.rope_scaling, self.mrope)
        v_btkh = self.v_proj(x_btd, lam)
        q_btnh, k_btkh, v_btkh = (constrain(a, ACTIVATIONS.heads) for a in (q_btnh, k_btkh, v_btkh))
        if isinstance(index, RaggedBatch):
            out_btnh, kv = _paged(q_btnh, k_btkh, v_btkh, kv, index, self.paged_kernel)
        else:
            run = _readable if self.layout == "readable" else _cpu
            out_btnh, kv = run(q_btnh, k_btkh, v_btkh, allowed_bts, kv, index)
        return self.o_proj(out_btnh, lam), kv
