"""Building blocks of the decoder (Qwen3, Qwen2, Llama): linear maps, norms, embedding, RoPE, MLP and MoE.

Every block accepts plain weights or delta-mode weights, whose leaves lead with
a (Θ_I, Δ) axis of 2; a row b of a delta batch computes with Θ_I + λ_b·Δ
(DESIGN 2.2). Every parameter enters an op linear in it, so `f(x; Θ_I) +
λ_b·f(x; Δ)` is exactly the merged model for any mix of λ in one batch.

Linear maps have two forms, picked by the model's layout (models/kv_cache.py):
"readable" is one einsum whose spec names the axes ('BTD,NHD->BTNH': batch,
time, model dim, heads, head dim); "cpu" multiplies one 2-D (out, in) matrix,
which XLA:CPU runs faster (see Linear).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def row_lam(lam: jax.Array, ndim: int, dtype) -> jax.Array:
    """λ per row shaped to broadcast against a (B, ...) tensor of rank ndim."""
    return lam.astype(dtype).reshape(lam.shape + (1,) * (ndim - 1))


def delta_einsum(spec: str, x: jax.Array, w: jax.Array, lam: jax.Array | None) -> jax.Array:
    """einsum(spec, x, w); for delta weights (2, ...) each row b uses Θ_I + λ_b·Δ."""
    if lam is None:
        return jnp.einsum(spec, x, w)
    (x_axes, w_axes), out_axes = spec.split("->")[0].split(","), spec.split("->")[1]
    both = jnp.einsum(f"{x_axes},C{w_axes}->C{out_axes}", x, w)
    return both[0] + row_lam(lam, both.ndim - 1, both.dtype) * both[1]


def matmul_t(x: jax.Array, w: jax.Array, lam: jax.Array | None) -> jax.Array:
    """The cpu form: x (B, T, I) times Wᵀ for W (O, I), or delta weights (2, O, I)."""
    if lam is None:
        return jnp.einsum("bti,oi->bto", x, w)
    # (Θ_I; Δ) as one (2·O, I) matrix (a free reshape) in a single product: slicing
    # w[0], w[1] makes XLA copy both halves each step, and a dot batched over the
    # stacked axis ran 1.6x slower than this (benchmarks/interpolate.py, batch 8, CPU).
    o = w.shape[1]
    both = jnp.einsum("bti,oi->bto", x, w.reshape(2 * o, w.shape[2]))
    return both[..., :o] + row_lam(lam, 3, both.dtype) * both[..., o:]


def param(shape, dtype, delta, rngs, init):
    full = (2, *shape) if delta else tuple(shape)
    if rngs is None:  # shapes only: nothing traced, no key drawn (see qwen3.abstract_params)
        return nnx.Param(jax.ShapeDtypeStruct(full, jnp.dtype(dtype)))
    return nnx.Param(init(rngs.params(), full, dtype))


normal = nnx.initializers.normal(0.02)
_ones = nnx.initializers.ones
_zeros = nnx.initializers.zeros


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, delta: bool, dtype, rngs: nnx.Rngs | None, layout: str):
        del layout  # one form in both layouts; taken so every block is built with the same keywords
        self.eps = eps
        self.scale = param((dim,), dtype, delta, rngs, _ones)

    def __call__(self, x: jax.Array, lam: jax.Array | None) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        w = self.scale[...]
        if lam is None:
            return y * w
        return y * (w[0] + row_lam(lam, y.ndim, y.dtype) * w[1])


class Linear(nnx.Module):
    """y = einsum(spec, x, W) (+ b), W stored (*out_shape, prod(in_shape)) and b (prod(out_shape),)
    like HF's weight and bias.

    `spec` names the axes of x (B, T, *in), of W viewed as (*out, *in) and of y
    (B, T, *out), e.g. 'BTD,NHD->BTNH'. The cpu layout applies W as one 2-D
    (out, in) matrix instead: XLA:CPU transposes (copies) a kernel whose output
    axes it must split, at every call, and multiplies (out, in) with the
    contracted axis minor 1.7x faster than (in, out) at batch 16 decode shapes
    (benchmarks/dot_chain.py).
    """

    def __init__(self, spec: str, out_shape, in_shape, *, delta: bool, dtype, rngs: nnx.Rngs | None,
                 layout: str, bias: bool = False):
        self.spec, self.layout = spec, layout
        self.out_shape, self.in_shape = tuple(out_shape), tuple(in_shape)
        self.kernel = param((*self.out_shape, math.prod(self.in_shape)), dtype, delta, rngs, normal)
        self.bias = param((math.prod(self.out_shape),), dtype, delta, rngs, _zeros) if bias else None

    def __call__(self, x: jax.Array, lam: jax.Array | None) -> jax.Array:
        w = self.kernel[...]
        lead = w.shape[: w.ndim - len(self.out_shape) - 1]  # (2,) in delta mode
        if self.layout == "readable":
            y = delta_einsum(self.spec, x, w.reshape(*lead, *self.out_shape, *self.in_shape), lam)
        else:
            b, t = x.shape[:2]
            y = matmul_t(x.reshape(b, t, -1), w.reshape(*lead, -1, w.shape[-1]), lam)  # free reshapes
            y = y.reshape(b, t, *self.out_shape)
        if self.bias is None:
            return y
        bias = self.bias[...]
        if lam is None:
            return y + bias.reshape(self.out_shape)
        bias_bo = bias[0] + row_lam(lam, 2, bias.dtype) * bias[1]  # each row's Θ_I + λ_b·Δ
        return y + bias_bo.reshape(bias_bo.shape[0], 1, *self.out_shape)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, delta: bool, dtype, rngs: nnx.Rngs | None, layout: str):
        self.embedding = param((vocab, dim), dtype, delta, rngs, normal)
        self.layout = layout

    def __call__(self, tokens_bt: jax.Array, lam: jax.Array | None) -> jax.Array:
        table = self.embedding[...]
        if lam is None:
            return jnp.take(table, tokens_bt, axis=0)
        both = jnp.take(table, tokens_bt, axis=1)  # rows of Θ_I and Δ, no copy of the table halves
        return both[0] + row_lam(lam, both.ndim - 1, both.dtype) * both[1]

    def attend(self, x_btd: jax.Array, lam: jax.Array | None) -> jax.Array:
        """Tied lm_head: logits against the embedding table."""
        if self.layout == "readable":
            return delta_einsum("BTD,VD->BTV", x_btd, self.embedding[...], lam)
        return matmul_t(x_btd, self.embedding[...], lam)


def llama3_inv_freq(inv_freq: jax.Array, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_context: float) -> jax.Array:
    """Llama 3.1's RoPE scaling of the frequencies: a wavelength longer than
    original_context / low_freq_factor is stretched `factor` times, one shorter than
    original_context / high_freq_factor kept, and those between blended linearly in
    original_context / wavelength."""
    wavelen = 2 * math.pi / inv_freq
    keep = jnp.clip((original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor), 0, 1)
    return (1 - keep) * inv_freq / factor + keep * inv_freq


def mrope_axes(half: int, section: tuple[int, ...], interleaved: bool) -> np.ndarray:
    """M-RoPE: the position axis (0 T, 1 H, 2 W) of each of the `half` frequencies. Interleaved
    (Qwen3-VL): H on j % 3 == 1 and W on j % 3 == 2 within 3·section, T elsewhere; else
    (Qwen2.5-VL) three consecutive chunks of the section's sizes."""
    j = np.arange(half)
    if interleaved:
        return np.where((j % 3 == 1) & (j < 3 * section[1]), 1, np.where((j % 3 == 2) & (j < 3 * section[2]), 2, 0))
    return np.searchsorted(np.cumsum(section), j, side="right").clip(max=2)


def rope(x_btnh: jax.Array, pos_bt: jax.Array, theta: float, scaling: tuple[float, ...] = (),
         mrope: tuple | None = None) -> jax.Array:
    """Rotary embedding, HF's rotate_half convention (halves, not interleaved).

    `scaling`: the llama3 values (ModelConfig.rope_scaling), () for plain RoPE. pos_bt (B, T),
    or (3, B, T) (T, H, W) positions of Qwen3-VL's M-RoPE, with mrope = (mrope_section,
    interleaved) saying which axis each frequency reads.
    """
    h = x_btnh.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if scaling:
        inv_freq = llama3_inv_freq(inv_freq, *scaling)
    pos = pos_bt.astype(jnp.float32)
    if pos.ndim == 3:  # M-RoPE: each frequency reads its own axis's position
        freqs = jnp.moveaxis(pos, 0, -1)[..., mrope_axes(h // 2, *mrope)] * inv_freq  # (B, T, H/2)
    else:
        freqs = pos[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x_btnh.dtype), jnp.sin(emb).astype(x_btnh.dtype)
    x1, x2 = x_btnh[..., : h // 2], x_btnh[..., h // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_btnh * cos + rotated * sin


class MLP(nnx.Module):
    def __init__(self, d: int, f: int, bias: bool = False, **kw):
        self.gate_proj = Linear("BTD,FD->BTF", (f,), (d,), bias=bias, **kw)
        self.up_proj = Linear("BTD,FD->BTF", (f,), (d,), bias=bias, **kw)
        self.down_proj = Linear("BTF,DF->BTD", (d,), (f,), bias=bias, **kw)

    def __call__(self, x_btd, lam):
        h_btf = jax.nn.silu(self.gate_proj(x_btd, lam)) * self.up_proj(x_btd, lam)
        return self.down_proj(h_btf, lam)


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

    def __init__(self, d: int, f: int, num_experts: int, top_k: int, norm_topk_prob: bool, *,
                 delta: bool, dtype, rngs: nnx.Rngs | None, layout: str):
        self.router = Linear("BTD,ED->BTE", (num_experts,), (d,), delta=delta, dtype=dtype, rngs=rngs,
                             layout=layout)
        self.gate_proj = param((num_experts, d, f), dtype, delta, rngs, normal)
        self.up_proj = param((num_experts, d, f), dtype, delta, rngs, normal)
        self.down_proj = param((num_experts, f, d), dtype, delta, rngs, normal)
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def __call__(self, x_btd, lam):
        b, t, d = x_btd.shape
        probs_bte = jax.nn.softmax(self.router(x_btd, lam).astype(jnp.float32), axis=-1)
        top_w, top_e = jax.lax.top_k(probs_bte, self.top_k)  # (B, T, k)
        if self.norm_topk_prob:
            top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
        expert = top_e.reshape(-1)
        order = jnp.argsort(expert, stable=True)
        token = order // self.top_k  # flat (b*t) token of each sorted assignment
        group_sizes = jnp.bincount(expert, length=probs_bte.shape[-1]).astype(jnp.int32)
        xs = x_btd.reshape(b * t, d)[token]
        lam_s = None if lam is None else jnp.repeat(lam, t)[token]
        h = jax.nn.silu(_ragged(xs, self.gate_proj[...], group_sizes, lam_s))
        h = h * _ragged(xs, self.up_proj[...], group_sizes, lam_s)
        y = _ragged(h, self.down_proj[...], group_sizes, lam_s)
        y = y * top_w.reshape(-1)[order].astype(y.dtype)[:, None]
        return jnp.zeros((b * t, d), y.dtype).at[token].add(y).reshape(b, t, d)

