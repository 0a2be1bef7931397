"""h(q): the frozen Instruct model's hidden state of a prompt, for the reward model.

`hidden_states` is the model's own (`qwen3.hidden_states`), numbered as HF's
`output_hidden_states`: 0 is the embedding output, i the output of decoder
layer i, and num_layers (or -1) the last layer's output after the final norm.

`prompt_features` computes the pooled features of many prompts with one jitted
function per padded shape (length and batch buckets); under a mesh the batch is
sharded on the data axes and the backbone by its ShardingConfig rules.

With `probe_tokens` > 0 the Instruct model first answers each prompt greedily
for up to that many tokens (its stop token included) and h is taken over prompt
+ probe; pooling "probe" averages the probe's positions. This goes beyond
DESIGN 1.3's prompt-only h(q): the model's own first answer tokens carry its
uncertainty, which the prompt alone does not show (benchmarks/pref_features.py).

Prompts with images (Qwen3-VL) take their pixel inputs as `generate_pair` does; the probe
and h see them (`qwen3_vl.hidden_states`: HF's numbering, a layer's output before deepstack).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dami_jax.engine.offline import generate
from dami_jax.generate.decode import bucket_length
from dami_jax.models import qwen3_vl
from dami_jax.models.qwen3 import hidden_states, resolve_layer
from dami_jax.models.sharding import batch_sharding, param_shardings
from dami_jax.policies.base import padded_chunk, pixel_inputs_of
from dami_jax.pref.config import POOLINGS


def pool(h_btd, mask_bt, pooling: str, tail_b=None) -> jax.Array:
    """(B, D) float32: the last position (rows are left-padded), the mean over real tokens, or
    ("probe") the mean over each row's last tail_b[i] positions."""
    h = h_btd.astype(jnp.float32)
    if pooling == "last":
        return h[:, -1]
    if pooling == "mean":
        m = mask_bt.astype(jnp.float32)
    elif pooling == "probe":
        m = (jnp.arange(h.shape[1]) >= h.shape[1] - tail_b[:, None]).astype(jnp.float32)
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return jnp.sum(h * m[..., None], axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)[:, None]


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "pooling"))
def _features(cfg, params, tokens_bt, mask_bt, tail_b, vision=None, *, layer: int, pooling: str):
    if vision is None:
        h_btd = hidden_states(cfg, params, tokens_bt, mask_bt, layer)
    else:
        h_btd = qwen3_vl.hidden_states(cfg, params, tokens_bt, mask_bt, vision, layer)
    return pool(h_btd, mask_bt, pooling, tail_b)


def with_probe(cfg, params, prompts: list[list[int]], probe_tokens: int, batch: int, stop_tokens=None,
               **pixel_inputs):
    """(prompt + the greedy answer of `params`, up to probe_tokens tokens or a stop id, per prompt;
    probe lengths). One engine, `batch` rows at a time."""
    out = generate(cfg, params, prompts, probe_tokens, stop_tokens=stop_tokens, max_rows=batch, **pixel_inputs)
    return [p + ids for p, ids in zip(prompts, out.token_lists())], out.lengths.astype(np.int32)


def prompt_features(cfg, params, prompts: list[list[int]], layer: int = -1, pooling: str = "last",
                    batch: int = 256, mesh=None, probe_tokens: int = 0, stop_tokens=None,
                    **pixel_inputs) -> np.ndarray:
    """(Q, D) float32 pooled hidden states of `prompts` (token-id lists) under `params`, after a
    greedy probe of up to `probe_tokens` tokens when that is > 0, ended early by any of
    `stop_tokens` (the pair's `stop_tokens`; see the module docstring). pixel_inputs: Qwen3-VL
    images / video of the prompts, as `generate_pair` takes them."""
    pixels = pixel_inputs_of(pixel_inputs)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompt_features needs a non-empty list of non-empty prompts")
    if pooling not in POOLINGS or probe_tokens < 0 or (pooling == "probe") != (probe_tokens > 0):
        raise ValueError(f"pooling must be one of {POOLINGS} and 'probe' exactly when probe_tokens > 0, "
                         f"got pooling={pooling!r}, probe_tokens={probe_tokens}")
    longest = max(len(p) for p in prompts) + probe_tokens
    if longest > cfg.max_position_embeddings:
        raise ValueError(f"prompt + probe of {longest} tokens exceeds the context of {cfg.max_position_embeddings}")
    resolve_layer(layer, cfg.num_layers)
    prompts = [list(map(int, p)) for p in prompts]
    tails = np.zeros(len(prompts), np.int32)
    if probe_tokens:  # before any resharding: the probe runs on the params as given
        prompts, tails = with_probe(cfg, params, prompts, probe_tokens, batch, stop_tokens, **pixels)
    shards = 1
    if mesh is not None:
        shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
        params = jax.device_put(params, param_shardings(params, mesh))
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start: start + batch]
        rows = -(-min(bucket_length(len(chunk), batch), batch) // shards) * shards
        width = bucket_length(max(map(len, chunk)), cfg.max_position_embeddings)
        tokens, mask, vision = padded_chunk(cfg, prompts, start, len(chunk), rows, width, pixels)
        tail = np.pad(tails[start: start + batch], (0, rows - len(chunk)), mode="edge")  # rows as padded
        if mesh is not None:
            tokens, mask = (jax.device_put(x, batch_sharding(mesh, 2)) for x in (tokens, mask))
            tail = jax.device_put(tail, batch_sharding(mesh, 1))
        h = _features(cfg, params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(tail), vision, layer=layer,
                      pooling=pooling)
        out.append(np.asarray(jax.device_get(h))[: len(chunk)])
    return np.concatenate(out)
