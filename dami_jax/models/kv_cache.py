"""KV cache for batched, left-padded decoding, and the layout switch.

Slot j of row b holds the key/value of column j of that row's (padded) sequence.
`valid` marks slots holding real tokens, so left padding and per-row lengths
need no special cases in attention. `index` is the next slot to write (shared by
all rows, since rows advance in lock step); `next_pos` the next RoPE position
of each row (real tokens only, as HF computes position ids from the mask).

Layouts (`ModelConfig.layout`, resolved by `resolve_layout`):
  readable  k, v (B, S, K, H): batch, slot, kv head, head dim; the attention is
            plain einsums (models/attention.py). The default off CPU.
  cpu       k (B·K, S, H), v (B·K, H, S), as XLA:CPU's attention dots read them,
            each contracting its minor axis (scores = q·kᵀ over H, out = p·vᵀ
            over S); with any other layout XLA:CPU copies (transposes) the whole
            cache of every layer at every decode step. Rows and kv heads share
            one axis (row b, head j at b·K + j), the dots' one batch axis: with
            (B, K) kept apart, XLA:CPU merged them for the dots by a bitcast of
            the updated cache and, at B = 1, copied every layer's cache four
            times a step to keep that view and the in-place update apart.
With `scan_layers` the per-layer arrays are stacked on a leading layer axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dami_jax.config import ModelConfig


def resolve_layout(layout: str) -> str:
    """'auto' -> 'cpu' on the CPU backend, 'readable' elsewhere (TPU, GPU).

    Resolved when a model or cache is built (at trace time, from the default
    backend), so one process keeps one layout per config.
    """
    if layout == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "readable"
    if layout not in ("cpu", "readable"):
        raise ValueError(f"layout={layout!r}: expected 'auto', 'cpu' or 'readable'")
    return layout


def cache_shapes(cfg: ModelConfig, batch: int, size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of one layer's keys and values in the config's layout."""
    k, h = cfg.num_kv_heads, cfg.head_dim
    if resolve_layout(cfg.layout) == "cpu":
        return (batch * k, size, h), (batch * k, h, size)
    return (batch, size, k, h), (batch, size, k, h)


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...] | jax.Array  # per layer, or (L, ...) stacked when scan_layers
    v: tuple[jax.Array, ...] | jax.Array
    valid: jax.Array  # (B, S) bool
    index: jax.Array  # () int32, next slot to write
    next_pos: jax.Array  # (B,) int32

    @property
    def size(self) -> int:
        return self.valid.shape[1]

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, size: int, dtype) -> "KVCache":
        k_shape, v_shape = cache_shapes(cfg, batch, size)
        n = cfg.num_layers
        if cfg.scan_layers:
            k, v = jnp.zeros((n, *k_shape), dtype), jnp.zeros((n, *v_shape), dtype)
        else:
            k = tuple(jnp.zeros(k_shape, dtype) for _ in range(n))
            v = tuple(jnp.zeros(v_shape, dtype) for _ in range(n))
        return cls(k=k, v=v, valid=jnp.zeros((batch, size), bool), index=jnp.zeros((), jnp.int32),
                   next_pos=jnp.zeros((batch,), jnp.int32))
