"""Sampling: one per-row function, `sample_rows`, and the frozen dataclasses `generate` takes.

Order as in HF transformers: temperature, then top-k, then top-p. `sample_rows` reads
each row's settings from (B,) arrays, so one batch can mix requests (the server);
`Sample` is the case of one setting for every row and `Greedy` that of temperature 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

_NEG = -jnp.inf


def top_p_cut(top_p) -> np.ndarray:
    """1 − top_p, computed on the host in float64 and then stored as float32: tokens whose
    ascending cumulative probability is <= this are dropped (0: top-p off)."""
    return (1.0 - np.asarray(top_p, np.float64)).astype(np.float32)


def filter_rows(x_bv: jax.Array, top_k_b: jax.Array, top_p_cut_b: jax.Array) -> jax.Array:
    """Top-k, then top-p (HF rule: the most likely token always stays) of each row of
    temperature-scaled float32 logits; removed entries are -inf. top_k_b 0 and
    top_p_cut_b 0 turn a row's filters off.

    One ascending sort serves both filters: the entries top-k removes are the smallest,
    so setting them to -inf in the sorted row gives the sorted top-k-filtered row.
    """
    b, v = x_bv.shape
    order = jnp.argsort(x_bv, axis=-1)  # ascending, stable
    asc = jnp.take_along_axis(x_bv, order, axis=-1)
    by_k = top_k_b[:, None] > 0
    kth = jnp.take_along_axis(asc, jnp.clip(v - top_k_b, 0, v - 1)[:, None], axis=-1)
    asc = jnp.where(by_k & (asc < kth), _NEG, asc)
    cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
    drop_sorted = (cum <= top_p_cut_b[:, None]).at[:, -1].set(False)
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(b)[:, None], order].set(drop_sorted)
    return jnp.where((by_k & (x_bv < kth)) | ((top_p_cut_b[:, None] > 0) & drop), _NEG, x_bv)


def sample_rows(logits_bv: jax.Array, keys_b: jax.Array, temperature_b: jax.Array, top_k_b: jax.Array,
                top_p_cut_b: jax.Array) -> jax.Array:
    """Next token (B,) int32 of each row with its own temperature, top-k and top-p cut
    (`top_p_cut`); a row of temperature <= 0 takes the argmax. One key per row, so a row's
    draws do not depend on the rest of the batch. The draw is skipped when every row is
    greedy (on the CPU it costs more than a small model's step), the sort when no row filters."""
    logits_bv = logits_bv.astype(jnp.float32)
    greedy = temperature_b <= 0
    argmax = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    def draw(x):
        x = x / jnp.where(greedy, 1.0, temperature_b)[:, None]
        filters = jnp.any(~greedy & ((top_k_b > 0) | (top_p_cut_b > 0)))
        x = jax.lax.cond(filters, lambda x: filter_rows(x, top_k_b, top_p_cut_b), lambda x: x, x)
        return jax.vmap(jax.random.categorical)(keys_b, x).astype(jnp.int32)

    sampled = jax.lax.cond(jnp.all(greedy), lambda x: argmax, draw, logits_bv)
    return jnp.where(greedy, argmax, sampled)


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Temperature 0: the argmax (what `sample_rows` does for such a row, without the draw)."""

    def settings(self) -> tuple[float, int, float]:
        """This setting as one row of `sample_rows`'s arrays: temperature, top-k, top-p cut."""
        return 0.0, 0, 0.0

    def next_tokens(self, logits_bv: jax.Array, keys_b: jax.Array) -> jax.Array:
        del keys_b
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sample:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (use Greedy() for argmax), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def settings(self) -> tuple[float, int, float]:
        """This setting as one row of `sample_rows`'s arrays: temperature, top-k, top-p cut."""
        return self.temperature, self.top_k, float(top_p_cut(self.top_p))

    def rows(self, b: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """This setting as `sample_rows`'s (B,) arrays: temperature, top-k, top-p cut."""
        return tuple(jnp.full((b,), v, dtype) for v, dtype in zip(self.settings(), (jnp.float32, jnp.int32,
                                                                                     jnp.float32)))

    def filtered_logits(self, logits_bv: jax.Array) -> jax.Array:
        """Logits after temperature, top-k and top-p; removed entries are -inf."""
        temperature_b, top_k_b, top_p_cut_b = self.rows(logits_bv.shape[0])
        return filter_rows(logits_bv.astype(jnp.float32) / temperature_b[:, None], top_k_b, top_p_cut_b)

    def next_tokens(self, logits_bv: jax.Array, keys_b: jax.Array) -> jax.Array:
        return sample_rows(logits_bv, keys_b, *self.rows(logits_bv.shape[0]))


# Qwen3 2507 recommended decoding (DESIGN 2.3).
THINKING_DEFAULT = Sample(temperature=0.6, top_k=20, top_p=0.95)
INSTRUCT_DEFAULT = Sample(temperature=0.7, top_k=20, top_p=0.8)
