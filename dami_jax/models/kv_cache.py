"""KV cache for batched, left-padded decoding.

Slot j of row b holds the key/value of column j of that row's (padded) sequence.
`valid` marks slots holding real tokens, so left padding and per-row lengths
need no special cases in attention. `index` is the next slot to write (shared by
all rows, since rows advance in lock step); `next_pos` the next RoPE position
of each row (real tokens only, as HF computes position ids from the mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dami_jax.config import ModelConfig


@struct.dataclass
class KVCache:
    # Laid out as the attention dots read them, each contracting its minor axis:
    # scores = q·kᵀ over H, out = p·vᵀ over S. With any other layout XLA:CPU
    # copies (transposes) the whole cache of every layer at every decode step.
    # Rows and kv heads share one axis (row b, head j at b·K + j), the dots' one
    # batch axis: with (B, K) kept apart, XLA:CPU merged them for the dots by a
    # bitcast of the updated cache and, at B = 1, copied every layer's cache four
    # times a step to keep that view and the in-place update apart.
    k: tuple[jax.Array, ...]  # per layer (B·K, S, H)
    v: tuple[jax.Array, ...]  # per layer (B·K, H, S)
    valid: jax.Array  # (B, S) bool
    index: jax.Array  # () int32, next slot to write
    next_pos: jax.Array  # (B,) int32

    @property
    def size(self) -> int:
        return self.valid.shape[1]

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, size: int, dtype) -> "KVCache":
        bk, h, n = batch * cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
        return cls(
            k=tuple(jnp.zeros((bk, size, h), dtype) for _ in range(n)),
            v=tuple(jnp.zeros((bk, h, size), dtype) for _ in range(n)),
            valid=jnp.zeros((batch, size), bool),
            index=jnp.zeros((), jnp.int32),
            next_pos=jnp.zeros((batch,), jnp.int32),
        )
