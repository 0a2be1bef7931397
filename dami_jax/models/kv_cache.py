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
    k: tuple[jax.Array, ...]  # per layer (B, S, K, H)
    v: tuple[jax.Array, ...]  # per layer (B, S, K, H)
    valid: jax.Array  # (B, S) bool
    index: jax.Array  # () int32, next slot to write
    next_pos: jax.Array  # (B,) int32

    @property
    def size(self) -> int:
        return self.valid.shape[1]

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, size: int, dtype) -> "KVCache":
        shape = (batch, size, cfg.num_kv_heads, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(
            k=zeros,
            v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            valid=jnp.zeros((batch, size), bool),
            index=jnp.zeros((), jnp.int32),
            next_pos=jnp.zeros((batch,), jnp.int32),
        )
