"""Qwen3 dense and MoE decoder in Flax NNX, numerically matching HF transformers.

Params are a plain nested dict (the pure-dict form of the NNX state):

    embed/embedding                    (V, D)
    layers/{i}/input_norm/scale        (D,)
    layers/{i}/attn/q_proj/kernel      (N, H, D)     N query heads, H head_dim
    layers/{i}/attn/k_proj/kernel      (K, H, D)     K key/value heads (GQA)
    layers/{i}/attn/v_proj/kernel      (K, H, D)
    layers/{i}/attn/o_proj/kernel      (D, N·H)
    layers/{i}/attn/q_norm/scale       (H,)
    layers/{i}/attn/k_norm/scale       (H,)
    layers/{i}/post_attn_norm/scale    (D,)
    layers/{i}/mlp/{gate,up}_proj/kernel   (F, D)      dense layer
    layers/{i}/mlp/down_proj/kernel        (D, F)
    layers/{i}/mlp/router/kernel           (E, D)      MoE layer
    layers/{i}/mlp/{gate,up}_proj          (E, D, F)   stacked experts (ragged_dot's layout)
    layers/{i}/mlp/down_proj               (E, F, D)
    final_norm/scale                   (D,)
    lm_head/kernel                     (V, D)        absent when embeddings are tied

Dense kernels are (out, in) like HF's: the contracted axis is minor, which
XLA:CPU multiplies 1.7x faster than (in, out) at batch 16 decode shapes (equal
at batch 1; benchmarks/dot_chain.py); it also makes loading HF tensors a plain copy.

Delta mode (DESIGN 2.2): every leaf gains a leading axis of 2 holding (Θ_I, Δ),
and each row b of the batch computes with Θ_I + λ_b·Δ. Every parameter enters an
op linear in it, so `y = f(x; W_I) + λ_b·f(x; Δ)` reproduces the merged model for
any mix of λ in one batch.

Norms and softmax run in float32; everything else in the params' dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dami_jax.config import ModelConfig
from dami_jax.models.kv_cache import KVCache

Params = dict


# ---------------------------------------------------------------------------
# Ops that accept plain or delta (stacked Θ_I, Δ) weights.

def _row_lam(lam: jax.Array, ndim: int, dtype) -> jax.Array:
    """λ per row shaped to broadcast against a (B, ...) tensor of rank ndim."""
    return lam.astype(dtype).reshape(lam.shape + (1,) * (ndim - 1))


def _matmul_t(x: jax.Array, w: jax.Array, lam: jax.Array | None) -> jax.Array:
    """x (B, T, I) times Wᵀ for W (O, I), or for delta weights (2, O, I): Θ_I + λ_b·Δ per row."""
    if lam is None:
        return jnp.einsum("bti,oi->bto", x, w)
    # (Θ_I; Δ) as one (2·O, I) matrix (a free reshape) in a single product: slicing
    # w[0], w[1] makes XLA copy both halves each step, and a dot batched over the
    # stacked axis ran 1.6x slower than this (benchmarks/interpolate.py, batch 8, CPU).
    o = w.shape[1]
    both = jnp.einsum("bti,oi->bto", x, w.reshape(2 * o, w.shape[2]))
    return both[..., :o] + _row_lam(lam, 3, both.dtype) * both[..., o:]


def _param(shape, dtype, delta, rngs, init):
    full = (2, *shape) if delta else tuple(shape)
    if rngs is None:  # shapes only: nothing traced, no key drawn (see abstract_params)
        return nnx.Param(jax.ShapeDtypeStruct(full, jnp.dtype(dtype)))
    return nnx.Param(init(rngs.params(), full, dtype))


_normal = nnx.initializers.normal(0.02)
_ones = nnx.initializers.ones


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, delta: bool, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = _param((dim,), dtype, delta, rngs, _ones)

    def __call__(self, x: jax.Array, lam: jax.Array | None) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        w = self.scale[...]
        if lam is None:
            return y * w
        return y * (w[0] + _row_lam(lam, y.ndim, y.dtype) * w[1])


class Linear(nnx.Module):
    """y = x·Wᵀ, W stored (*out_shape, in_features) like HF's weight.

    Applied as one 2-D (out, in) matrix: XLA:CPU transposes (copies) a kernel
    whose output axes it must split, at every call.
    """

    def __init__(self, out_shape, in_features: int, *, delta: bool, dtype, rngs: nnx.Rngs):
        self.out_shape = tuple(out_shape)
        self.kernel = _param((*self.out_shape, in_features), dtype, delta, rngs, _normal)

    def __call__(self, x: jax.Array, lam: jax.Array | None) -> jax.Array:
        w = self.kernel[...]
        w = w.reshape(*w.shape[: w.ndim - len(self.out_shape) - 1], -1, w.shape[-1])  # a free reshape
        y = _matmul_t(x, w, lam)
        return y.reshape(*y.shape[:2], *self.out_shape)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, delta: bool, dtype, rngs: nnx.Rngs):
        self.embedding = _param((vocab, dim), dtype, delta, rngs, _normal)

    def __call__(self, tokens: jax.Array, lam: jax.Array | None) -> jax.Array:
        table = self.embedding[...]
        if lam is None:
            return jnp.take(table, tokens, axis=0)
        both = jnp.take(table, tokens, axis=1)  # rows of Θ_I and Δ, no copy of the table halves
        return both[0] + _row_lam(lam, both.ndim - 1, both.dtype) * both[1]

    def attend(self, x: jax.Array, lam: jax.Array | None) -> jax.Array:
        """Tied lm_head: logits against the embedding table."""
        return _matmul_t(x, self.embedding[...], lam)


def rope(x_btnh: jax.Array, pos_bt: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, HF's rotate_half convention (halves, not interleaved)."""
    h = x_btnh.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    freqs = pos_bt.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x_btnh.dtype), jnp.sin(emb).astype(x_btnh.dtype)
    x1, x2 = x_btnh[..., : h // 2], x_btnh[..., h // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_btnh * cos + rotated * sin


def allowed_keys(key_valid_bs: jax.Array, q_slot_t: jax.Array) -> jax.Array:
    """(B, T, S) bool: query t may attend key slot s (a valid key at or before its own slot)."""
    k_slot = jnp.arange(key_valid_bs.shape[1])
    return key_valid_bs[:, None, :] & (k_slot[None, None, :] <= q_slot_t[None, :, None])


def attend(q_nqh: jax.Array, k_nsh: jax.Array, v_nhs: jax.Array, allowed_bts: jax.Array) -> jax.Array:
    """Softmax attention over the cache slots S: (N, H, G·T) for the query rows (G, T) of
    each (row, kv head) n = b·K + j (row g·T + t), keys/values in KVCache's layouts,
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
    scores = jnp.where(allowed_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_nhs.dtype).reshape(n, -1, s)
    return jnp.einsum("nhs,nqs->nhq", v_nhs, probs)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, delta: bool, dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(delta=delta, dtype=dtype, rngs=rngs)
        self.q_proj = Linear((n, h), d, **kw)
        self.k_proj = Linear((k, h), d, **kw)
        self.v_proj = Linear((k, h), d, **kw)
        self.o_proj = Linear((d,), n * h, **kw)  # HF's (D, N·H): heads flattened on the input side
        self.q_norm = RMSNorm(h, cfg.rms_norm_eps, **kw)
        self.k_norm = RMSNorm(h, cfg.rms_norm_eps, **kw)
        self.rope_theta = cfg.rope_theta
        self.groups = n // k

    def __call__(self, x, pos_bt, allowed_bts, kv, index, lam):
        b, t, _ = x.shape
        q = rope(self.q_norm(self.q_proj(x, lam), lam), pos_bt, self.rope_theta)
        k = rope(self.k_norm(self.k_proj(x, lam), lam), pos_bt, self.rope_theta)
        v = self.v_proj(x, lam)
        # Keys (B·K, T, H) and values (B·K, H, T): the layouts of KVCache, where
        # both attention dots contract their minor axis (see KVCache for why).
        nk, h, g = k.shape[2], k.shape[3], self.groups
        k = k.transpose(0, 2, 1, 3).reshape(b * nk, t, h)
        v = v.transpose(0, 2, 3, 1).reshape(b * nk, h, t)
        if kv is not None:  # write this chunk into the cache, attend over all slots
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0))
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, 0, index))
        q_nqh = q.reshape(b, t, nk, g, h).transpose(0, 2, 3, 1, 4).reshape(b * nk, g * t, h)
        out = attend(q_nqh, k, v, allowed_bts).reshape(b, nk, h, g, t)
        return self.o_proj(out.transpose(0, 4, 1, 3, 2).reshape(b, t, nk * g * h), lam), (k, v)


class MLP(nnx.Module):
    def __init__(self, d: int, f: int, *, delta: bool, dtype, rngs: nnx.Rngs):
        kw = dict(delta=delta, dtype=dtype, rngs=rngs)
        self.gate_proj = Linear((f,), d, **kw)
        self.up_proj = Linear((f,), d, **kw)
        self.down_proj = Linear((d,), f, **kw)

    def __call__(self, x, lam):
        return self.down_proj(jax.nn.silu(self.gate_proj(x, lam)) * self.up_proj(x, lam), lam)


def _ragged(x_md, w_edf, group_sizes, lam_m):
    if lam_m is None:
        return jax.lax.ragged_dot(x_md, w_edf, group_sizes)
    # Θ_I and Δ experts as 2E groups of one ragged_dot over [x; x] (no copy of the halves).
    s, e = w_edf.shape[:2]
    m = x_md.shape[0]
    out = jax.lax.ragged_dot(jnp.concatenate([x_md, x_md]), w_edf.reshape(s * e, *w_edf.shape[2:]),
                             jnp.concatenate([group_sizes, group_sizes]))
    return out[:m] + lam_m.astype(out.dtype)[:, None] * out[m:]


class MoE(nnx.Module):
    """Top-k routed experts; tokens sorted by expert and multiplied with ragged_dot."""

    def __init__(self, cfg: ModelConfig, *, delta: bool, dtype, rngs: nnx.Rngs):
        d, f, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        kw = dict(delta=delta, dtype=dtype, rngs=rngs)
        self.router = Linear((e,), d, **kw)
        self.gate_proj = _param((e, d, f), dtype, delta, rngs, _normal)
        self.up_proj = _param((e, d, f), dtype, delta, rngs, _normal)
        self.down_proj = _param((e, f, d), dtype, delta, rngs, _normal)
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob

    def __call__(self, x, lam):
        b, t, d = x.shape
        probs = jax.nn.softmax(self.router(x, lam).astype(jnp.float32), axis=-1)
        top_w, top_e = jax.lax.top_k(probs, self.top_k)  # (B, T, k)
        if self.norm_topk_prob:
            top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
        num_experts = probs.shape[-1]
        expert = top_e.reshape(-1)
        order = jnp.argsort(expert, stable=True)
        token = order // self.top_k  # flat (b*t) token of each sorted assignment
        group_sizes = jnp.bincount(expert, length=num_experts).astype(jnp.int32)
        xs = x.reshape(b * t, d)[token]
        lam_s = None if lam is None else jnp.repeat(lam, t)[token]
        h = jax.nn.silu(_ragged(xs, self.gate_proj[...], group_sizes, lam_s))
        h = h * _ragged(xs, self.up_proj[...], group_sizes, lam_s)
        y = _ragged(h, self.down_proj[...], group_sizes, lam_s)
        y = y * top_w.reshape(-1)[order].astype(y.dtype)[:, None]
        return jnp.zeros((b * t, d), y.dtype).at[token].add(y).reshape(b, t, d)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, delta: bool, dtype, rngs: nnx.Rngs):
        kw = dict(delta=delta, dtype=dtype, rngs=rngs)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.attn = Attention(cfg, **kw)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        if cfg.is_moe_layer(layer):
            self.mlp = MoE(cfg, **kw)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, **kw)

    def __call__(self, x, pos_bt, allowed_bts, kv, index, lam):
        h, kv = self.attn(self.input_norm(x, lam), pos_bt, allowed_bts, kv, index, lam)
        x = x + h
        return x + self.mlp(self.post_attn_norm(x, lam), lam), kv


class Qwen3(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, delta: bool = False, dtype=jnp.float32, rngs: nnx.Rngs | None):
        kw = dict(delta=delta, dtype=dtype, rngs=rngs)
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.layers = nnx.List([DecoderLayer(cfg, i, **kw) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear((cfg.vocab_size,), cfg.hidden_size, **kw)
        self.tied = cfg.tie_word_embeddings

    def __call__(self, tokens_bt, mask_bt, cache: KVCache | None = None, lam=None, last_only: bool = False):
        b, t = tokens_bt.shape
        mask_bt = mask_bt.astype(bool)
        offset = jnp.cumsum(mask_bt, axis=1, dtype=jnp.int32) - 1
        if cache is None:
            pos_bt = jnp.maximum(offset, 0)
            key_valid = mask_bt
            q_slot, index = jnp.arange(t), 0
        else:
            pos_bt = cache.next_pos[:, None] + jnp.maximum(offset, 0)
            key_valid = jax.lax.dynamic_update_slice(cache.valid, mask_bt, (0, cache.index))
            q_slot, index = cache.index + jnp.arange(t), cache.index
        allowed_bts = allowed_keys(key_valid, q_slot)

        x = self.embed(tokens_bt, lam)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, (k, v) = layer(x, pos_bt, allowed_bts, kv, index, lam)
            new_k.append(k)
            new_v.append(v)
        if last_only:  # a prefill needs only the next token's logits: skip T-1 rows of the lm_head
            x = x[:, -1:]
        x = self.final_norm(x, lam)
        logits = self.embed.attend(x, lam) if self.tied else self.lm_head(x, lam)
        if cache is not None:
            cache = KVCache(
                k=tuple(new_k), v=tuple(new_v), valid=key_valid, index=cache.index + t,
                next_pos=cache.next_pos + jnp.sum(mask_bt, axis=1, dtype=jnp.int32),
            )
        return logits.astype(jnp.float32), cache


# ---------------------------------------------------------------------------
# Functional surface: params pytree in, arrays out.

@functools.lru_cache(maxsize=None)
def _graphdef(cfg: ModelConfig, delta: bool) -> nnx.GraphDef:
    return nnx.split(Qwen3(cfg, delta=delta, rngs=None))[0]


def abstract_params(cfg: ModelConfig, dtype=jnp.float32, delta: bool = False) -> Params:
    """The params pytree as ShapeDtypeStructs (shapes for loading and sharding)."""
    # Built with rngs=None rather than nnx.eval_shape of the random init, whose
    # tracing cost grows quadratically with the number of leaves (1.2 s for 28 layers).
    return nnx.to_pure_dict(nnx.state(Qwen3(cfg, delta=delta, dtype=jnp.dtype(dtype), rngs=None)))


def init_params(cfg: ModelConfig, key: int | jax.Array = 0, dtype=jnp.float32) -> Params:
    """Random params (normal 0.02, unit norms), for tests and benchmarks."""
    seed = key if isinstance(key, int) else int(jax.random.randint(key, (), 0, 2**31 - 1))
    # Eager on purpose: one jitted init of every leaf took 2 min to compile for Qwen3-4B on an
    # H100 (32 s on CPU for 0.6B, against 13 s eager); eagerly each initializer compiles once per shape.
    return nnx.to_pure_dict(nnx.state(Qwen3(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed))))


def is_delta(params: Params) -> bool:
    """Delta-mode params carry a leading (Θ_I, Δ) axis on every leaf."""
    return params["embed"]["embedding"].ndim == 3


def apply(cfg: ModelConfig, params: Params, tokens_bt, mask_bt, cache=None, lam=None, last_only: bool = False):
    """One model call (not jitted): logits (B, T, V) float32 and the updated cache.

    `lam` (B,) is required for delta-mode params and refused for plain ones.
    `last_only`: logits of the last column only, (B, 1, V) (left padding puts
    every row's last token there).
    """
    delta = is_delta(params)
    if delta != (lam is not None):
        raise ValueError(
            "delta-mode params need a per-row lam (B,)" if delta
            else "lam was given but params are not in delta mode (see dami_jax.interpolate.delta_params)"
        )
    model = nnx.merge(_graphdef(cfg, delta), params)
    return model(tokens_bt, mask_bt, cache=cache, lam=lam, last_only=last_only)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, mask, lam):
    return apply(cfg, params, tokens, mask, lam=lam)[0]


def forward(cfg: ModelConfig, params: Params, tokens, attention_mask=None, lam=None) -> jax.Array:
    """Logits (B, T, V) in float32 for a full sequence, no cache (DESIGN 2.1).

    attention_mask: (B, T) with 1 for real tokens and 0 for (left) padding.
    """
    if not isinstance(tokens, jax.core.Tracer):
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < 0 or arr.max() >= cfg.vocab_size):
            bad = arr.min() if arr.min() < 0 else arr.max()
            raise ValueError(f"token id {int(bad)} outside the vocabulary [0, {cfg.vocab_size})")
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, seq), got shape {tokens.shape}")
    if attention_mask is None:
        attention_mask = jnp.ones_like(tokens)
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != tokens shape {tokens.shape}")
    if tokens.shape[1] > cfg.max_position_embeddings:
        raise ValueError(
            f"sequence of {tokens.shape[1]} tokens exceeds max_position_embeddings={cfg.max_position_embeddings}"
        )
    if lam is not None:
        lam = jnp.broadcast_to(jnp.asarray(lam, jnp.float32), (tokens.shape[0],))
    return _forward(cfg, params, tokens, attention_mask, lam)
