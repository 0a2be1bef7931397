"""h(q): the frozen Instruct model's hidden state of a prompt, for the reward model.

`qwen3.apply` returns logits only, so `hidden_states` runs the NNX model's own
pieces (embed, decoder layers, final norm) on a merged module; the numerics are
the model's. Layer numbering follows HF `output_hidden_states`: 0 is the
embedding output, i the output of decoder layer i, and num_layers (or -1) the
last layer's output after the final norm.

`prompt_features` computes the pooled features of many prompts with one jitted
function per padded shape (length and batch buckets); under a mesh the batch is
sharded on the data axes and the backbone by its ShardingConfig rules.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dami_jax.generate.decode import bucket_length, left_pad
from dami_jax.models import qwen3
from dami_jax.models.sharding import batch_sharding, param_shardings


def resolve_layer(layer: int, num_layers: int) -> int:
    if not -(num_layers + 1) <= layer <= num_layers:
        raise ValueError(f"hidden_layer={layer} is outside [-{num_layers + 1}, {num_layers}] "
                         f"for a model of {num_layers} layers (0: embeddings, -1: final)")
    return layer % (num_layers + 1)


def hidden_states(cfg, params, tokens_bt, mask_bt, layer: int) -> jax.Array:
    """(B, T, D) hidden states after `layer` (HF numbering), left-padded prompts, no cache."""
    layer = resolve_layer(layer, cfg.num_layers)
    model = nnx.merge(qwen3._graphdef(cfg, False), params)
    mask = mask_bt.astype(bool)
    pos_bt = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
    allowed_bts = qwen3.allowed_keys(mask, jnp.arange(tokens_bt.shape[1]))
    x = model.embed(tokens_bt, None)
    for block in list(model.layers)[:layer]:
        x, _ = block(x, pos_bt, allowed_bts, None, 0, None)
    if layer == cfg.num_layers:
        x = model.final_norm(x, None)
    return x


def pool(h_btd, mask_bt, pooling: str) -> jax.Array:
    """(B, D) float32: the last position (prompts are left-padded) or the mean over real tokens."""
    h = h_btd.astype(jnp.float32)
    if pooling == "last":
        return h[:, -1]
    if pooling == "mean":
        m = mask_bt.astype(jnp.float32)[..., None]
        return jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "pooling"))
def _features(cfg, params, tokens_bt, mask_bt, *, layer: int, pooling: str):
    return pool(hidden_states(cfg, params, tokens_bt, mask_bt, layer), mask_bt, pooling)


def prompt_features(cfg, params, prompts: list[list[int]], layer: int = -1, pooling: str = "last",
                    batch: int = 256, mesh=None) -> np.ndarray:
    """(Q, D) float32 pooled hidden states of `prompts` (token-id lists) under `params`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompt_features needs a non-empty list of non-empty prompts")
    longest = max(len(p) for p in prompts)
    if longest > cfg.max_position_embeddings:
        raise ValueError(f"prompt of {longest} tokens exceeds the context of {cfg.max_position_embeddings}")
    resolve_layer(layer, cfg.num_layers)
    shards = 1
    if mesh is not None:
        shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
        params = jax.device_put(params, param_shardings(params, mesh))
    arch = qwen3_arch(cfg)
    out = []
    for start in range(0, len(prompts), batch):
        chunk = [list(map(int, p)) for p in prompts[start: start + batch]]
        rows = -(-min(bucket_length(len(chunk), batch), batch) // shards) * shards
        width = bucket_length(max(map(len, chunk)), cfg.max_position_embeddings)
        tokens, mask = left_pad(chunk + [chunk[-1]] * (rows - len(chunk)), width)
        if mesh is not None:
            tokens, mask = (jax.device_put(x, batch_sharding(mesh, 2)) for x in (tokens, mask))
        h = _features(arch, params, jnp.asarray(tokens), jnp.asarray(mask), layer=layer, pooling=pooling)
        out.append(np.asarray(jax.device_get(h))[: len(chunk)])
    return np.concatenate(out)


def qwen3_arch(cfg):
    """The config without generation ids, so pairs differing only there share compiles."""
    return dataclasses.replace(cfg, eos_token_ids=(), bos_token_id=None, pad_token_id=None)
