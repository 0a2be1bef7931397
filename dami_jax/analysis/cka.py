"""Linear CKA (centered kernel alignment) between two representations of the same n inputs.

For features x (n, d1) and y (n, d2) with linear kernels K = x·xᵀ, L = y·yᵀ,

    CKA = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)),

1 for representations that differ by an orthogonal map and an isotropic scale,
near 0 for unrelated ones. `debiased` uses the unbiased HSIC estimator (Song et
al. 2012), whose CKA is not inflated when n is small against the width (the
biased one tends to 1 as d/n grows). Both are computed from d×d feature
products, never n×n Gram matrices, so thousands of tokens cost little: with
k_i = |x_i|² and s = Σ x_i,

    tr(K̃ L̃) = |xᵀy|² − Σ k_i l_i,   1ᵀK̃1 = |s|² − Σ k_i,   K̃1 = x·s − k

(K̃: K with its diagonal zeroed). Features are centered first: the biased form
needs it, the unbiased one is invariant to it and gains float32 accuracy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dami_jax.errors import InputError

_HIGHEST = jax.lax.Precision.HIGHEST  # TPU/GPU default matmuls round to bf16/tf32; CKA differences are small


def _hsic(x, y, debiased: bool):
    """HSIC of the linear kernels of centered x, y (n, d) up to a factor shared by its three uses."""
    xty = jnp.matmul(x.T, y, precision=_HIGHEST)
    if not debiased:
        return jnp.sum(xty * xty)
    n = x.shape[0]
    k, l = jnp.sum(x * x, axis=1), jnp.sum(y * y, axis=1)
    sx, sy = jnp.sum(x, axis=0), jnp.sum(y, axis=0)
    trace = jnp.sum(xty * xty) - jnp.dot(k, l)
    sum_k, sum_l = jnp.dot(sx, sx) - jnp.sum(k), jnp.dot(sy, sy) - jnp.sum(l)
    row_k = jnp.matmul(x, sx, precision=_HIGHEST) - k
    row_l = jnp.matmul(y, sy, precision=_HIGHEST) - l
    return trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * jnp.dot(row_k, row_l) / (n - 2)


def cka(x_nd, y_ne, debiased: bool = False) -> jax.Array:
    """Linear CKA of x (n, d) and y (n, e) as a float32 scalar: a pure function to jit and vmap
    (over layers, over λ). A constant representation has no alignment: NaN."""
    x = x_nd.astype(jnp.float32)
    y = y_ne.astype(jnp.float32)
    x = x - jnp.mean(x, axis=0)
    y = y - jnp.mean(y, axis=0)
    xy, xx, yy = _hsic(x, y, debiased), _hsic(x, x, debiased), _hsic(y, y, debiased)
    return xy / jnp.sqrt(xx * yy)


_cka_jit = jax.jit(cka, static_argnames="debiased")


def check_pair_shapes(x_shape, y_shape, debiased: bool) -> None:
    if len(x_shape) != 2 or len(y_shape) != 2:
        raise InputError(f"linear_cka expects 2-D (n, d) arrays, got shapes {tuple(x_shape)} and {tuple(y_shape)}")
    if x_shape[0] != y_shape[0]:
        raise InputError(f"linear_cka: x and y must hold the same n inputs, got n={x_shape[0]} and n={y_shape[0]}")
    need = 4 if debiased else 2
    if x_shape[0] < need:
        raise InputError(f"linear_cka needs n >= {need} inputs{' (debiased)' if debiased else ''}, got {x_shape[0]}")


def linear_cka(x, y, debiased: bool = False) -> float:
    """Linear CKA of x (n, d1) and y (n, d2), rows the same n inputs: a float in [0, 1] (debiased:
    it can dip slightly below 0 for unrelated representations)."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    check_pair_shapes(x.shape, y.shape, debiased)
    return float(_cka_jit(x, y, debiased=debiased))


@functools.partial(jax.jit, static_argnames="debiased")
def cka_along_lam(feats_klnd, debiased: bool = False) -> dict[str, jax.Array]:
    """CKA of every (λ, layer) representation against λ's first and last grid point and its
    neighbour: feats (K, L, n, d), the λ grid sorted with Θ(0) first and Θ(1) last. Returns
    (K, L) arrays "vs_instruct", "vs_thinking" and (K − 1, L) "vs_next" (λ_k against λ_k+1)."""
    per_layer = jax.vmap(functools.partial(cka, debiased=debiased))  # over L
    per_pair = jax.vmap(per_layer)  # over λ
    first = jnp.broadcast_to(feats_klnd[0], feats_klnd.shape)
    last = jnp.broadcast_to(feats_klnd[-1], feats_klnd.shape)
    return {"vs_instruct": per_pair(feats_klnd, first), "vs_thinking": per_pair(feats_klnd, last),
            "vs_next": per_pair(feats_klnd[:-1], feats_klnd[1:])}

