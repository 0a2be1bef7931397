"""Sampling methods: tiny frozen dataclasses sharing `next_tokens(logits, keys)`.

Order as in HF transformers: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_NEG = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Greedy:
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

    def filtered_logits(self, logits_bv: jax.Array) -> jax.Array:
        """Logits after temperature, top-k and top-p; removed entries are -inf."""
        x = logits_bv.astype(jnp.float32) / self.temperature
        if self.top_k:
            kth = jax.lax.top_k(x, min(self.top_k, x.shape[-1]))[0][..., -1:]
            x = jnp.where(x < kth, _NEG, x)
        if self.top_p < 1.0:
            x = top_p_filter(x, self.top_p)
        return x

    def next_tokens(self, logits_bv: jax.Array, keys_b: jax.Array) -> jax.Array:
        """One key per row, so a row's draws do not depend on the rest of the batch."""
        x = self.filtered_logits(logits_bv)
        return jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys_b, x).astype(jnp.int32)


def top_p_filter(x_bv: jax.Array, top_p: float) -> jax.Array:
    """HF rule: drop the tokens whose ascending cumulative probability is <= 1 - top_p
    (the most likely token always stays)."""
    order = jnp.argsort(x_bv, axis=-1)  # ascending
    sorted_x = jnp.take_along_axis(x_bv, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_x, axis=-1), axis=-1)
    remove_sorted = cum <= 1.0 - top_p
    remove_sorted = remove_sorted.at[..., -1].set(False)
    remove = jnp.zeros_like(remove_sorted).at[
        jnp.arange(x_bv.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where(remove, _NEG, x_bv)


# Qwen3 2507 recommended decoding (DESIGN 2.3).
THINKING_DEFAULT = Sample(temperature=0.6, top_k=20, top_p=0.95)
INSTRUCT_DEFAULT = Sample(temperature=0.7, top_k=20, top_p=0.8)
