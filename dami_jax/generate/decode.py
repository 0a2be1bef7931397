"""Lock-step batched generation: left-padded prompt buckets, one prefill call, one jitted
decode loop. The simple reference the engine is tested against (`dj.generate` runs on the
engine), and what `generate_pair`'s merged mode runs.

Rows advance in lock step. The decode loop is a `lax.while_loop` that stops when
every row is done, the step limit is hit, or the KV cache is full; the cache is
donated so XLA updates it in place, and params are an argument (not a closure)
so one compiled program serves any weights of the same shapes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dami_jax.config import ModelConfig
from dami_jax.generate.sampling import Greedy
from dami_jax.models import qwen3, qwen3_vl
from dami_jax.models.kv_cache import KVCache

MIN_BUCKET = 16


@dataclasses.dataclass
class GenerateOutput:
    tokens: np.ndarray  # (B, max_new_tokens) int32; row i valid up to lengths[i]
    lengths: np.ndarray  # (B,) generated tokens, a produced stop token included
    finish_reasons: list[str]  # "stop" (a stop token) or "length" (token limit or full cache)
    cache_full: bool = False  # the KV cache filled before every row stopped

    def token_lists(self) -> list[list[int]]:
        return [self.tokens[i, : self.lengths[i]].tolist() for i in range(len(self.lengths))]


@struct.dataclass
class _State:
    out: jax.Array  # (B, N) generated tokens
    last: jax.Array  # (B,) last emitted token
    done: jax.Array  # (B,) bool
    stopped: jax.Array  # (B,) bool: ended by a stop token
    lengths: jax.Array  # (B,)
    step: jax.Array  # () number of tokens emitted per row so far
    cache: KVCache


def bucket_length(n: int, limit: int) -> int:
    """Smallest power of two >= n (at least MIN_BUCKET), capped at `limit`."""
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return min(b, limit)


def left_pad(prompts: list[list[int]], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        if p:
            tokens[i, length - len(p):] = p
            mask[i, length - len(p):] = 1
    return tokens, mask


def stop_table(stop_tokens, batch: int) -> np.ndarray:
    """Stop ids as a (B, S) array padded with -1: one list for all rows, or one per row."""
    rows = [list(stop_tokens)] * batch if not stop_tokens or np.isscalar(stop_tokens[0]) else list(stop_tokens)
    if len(rows) != batch:
        raise ValueError(f"stop_tokens has {len(rows)} rows for a batch of {batch}")
    width = max([1] + [len(r) for r in rows])
    table = np.full((batch, width), -1, np.int32)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    return table


def _emit(state: _State, token, stops, max_new):
    is_stop = jnp.any(token[:, None] == stops, axis=-1)
    token = jnp.where(state.done, 0, token)
    out = jax.lax.dynamic_update_slice(state.out, token[:, None], (0, state.step))
    lengths = state.lengths + (~state.done).astype(jnp.int32)
    stopped = state.stopped | (~state.done & is_stop)
    done = state.done | is_stop | (state.step + 1 >= max_new)
    return state.replace(out=out, last=token, done=done, stopped=stopped, lengths=lengths, step=state.step + 1)


def _row_keys(key, row_ids, step):
    """Per-row keys from (seed, row id, step): draws do not depend on batch layout."""
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), step))(row_ids)


def _prefill_impl(cfg, params, tokens, mask, lam, stops, key, row_ids, vision=None, *, sampling, max_new,
                  cache_size):
    b = tokens.shape[0]
    dtype = jax.tree.leaves(params)[0].dtype
    cache = KVCache.init(cfg, b, cache_size, dtype)
    if vision is None:
        logits, cache = qwen3.apply(cfg, params, tokens, mask, cache=cache, lam=lam, last_only=True)
    else:  # Qwen3-VL: images spliced in; decoding then continues from each row's max position + 1
        logits, cache = qwen3_vl.apply(cfg, params, tokens, mask, vision, cache=cache, lam=lam, last_only=True)
    first = sampling.next_tokens(logits[:, -1], _row_keys(key, row_ids, 0))
    state = _State(
        out=jnp.zeros((b, max_new), jnp.int32), last=first, done=jnp.zeros((b,), bool),
        stopped=jnp.zeros((b,), bool), lengths=jnp.zeros((b,), jnp.int32),
        step=jnp.zeros((), jnp.int32), cache=cache,
    )
    return _emit(state, first, stops, max_new)


def _decode_impl(cfg, params, state, lam, stops, key, row_ids, *, sampling, max_new):
    def cond(s: _State):
        return ~jnp.all(s.done) & (s.step < max_new) & (s.cache.index < s.cache.size)

    def body(s: _State):
        ones = jnp.ones((s.last.shape[0], 1), jnp.int32)
        logits, cache = qwen3.apply(cfg, params, s.last[:, None], ones, cache=s.cache, lam=lam)
        token = sampling.next_tokens(logits[:, -1], _row_keys(key, row_ids, s.step))
        return _emit(s.replace(cache=cache), token, stops, max_new)

    return jax.lax.while_loop(cond, body, state)


@functools.lru_cache(maxsize=64)
def _compiled(cfg, sampling, max_new, cache_size, stacked: bool):
    """Jitted prefill and decode; `stacked` vmaps both over a leading model axis K."""
    prefill = functools.partial(_prefill_impl, cfg, sampling=sampling, max_new=max_new, cache_size=cache_size)
    decode = functools.partial(_decode_impl, cfg, sampling=sampling, max_new=max_new)
    if stacked:  # params, tokens, mask, lam, stops and row ids carry K; the seed is shared
        prefill = jax.vmap(prefill, in_axes=(0, 0, 0, 0, 0, None, 0, None))
        decode = jax.vmap(decode, in_axes=(0, 0, 0, 0, None, 0))
    return jax.jit(prefill), jax.jit(decode, donate_argnums=(1,))


def _check_prompts(cfg: ModelConfig, prompts, max_new_tokens: int, max_cache: int | None):
    """Validate prompts; returns (prompts as int lists, bucket width, cache size)."""
    if not prompts:
        raise ValueError("prompts is empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = [[int(t) for t in p] for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    context = cfg.max_position_embeddings if max_cache is None else min(max_cache, cfg.max_position_embeddings)
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise ValueError(
            f"prompt of {longest} tokens does not fit the context of {context} tokens "
            f"(max_position_embeddings={cfg.max_position_embeddings}) with room to generate"
        )
    bad = [t for p in prompts for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
    # Padding must leave room for max_new_tokens when the prompt itself does.
    width = bucket_length(longest, max(longest, context - max_new_tokens))
    return prompts, width, min(width + max_new_tokens, context)


def _output(state, max_new_tokens: int, cache_size: int) -> GenerateOutput:
    out, lengths, stopped, index = jax.device_get((state.out, state.lengths, state.stopped, state.cache.index))
    unfinished = ~(stopped | (lengths >= max_new_tokens))
    return GenerateOutput(tokens=np.asarray(out), lengths=np.asarray(lengths),
                          finish_reasons=["stop" if s else "length" for s in stopped],
                          cache_full=bool(int(index) >= cache_size and unfinished.any()))


def generate_lockstep(cfg: ModelConfig, params, prompts: list[list[int]], max_new_tokens: int,
             sampling=Greedy(), seed: int = 0, stop_tokens=None, lam=None,
             max_cache: int | None = None, row_ids=None, **pixel_inputs) -> GenerateOutput:
    """Generate up to `max_new_tokens` for each prompt (a list of token ids).

    stop_tokens: ids ending a row (one list, or one list per row); default
    none, so rows end at max_new_tokens (to stop at EOS pass `ModelPair.stop_tokens`
    or `GenerationIds.from_hf(model_dir).eos`). lam: one λ per row, for
    delta-mode params (DESIGN 2.2).
    max_cache: KV cache slots (default prompt bucket + max_new_tokens, at most
    the context length); a cache that fills ends every row with "length" and
    sets `cache_full`. row_ids: the id seeding each row's sampling (default
    0..B-1), so a row samples the same tokens whatever batch it is in.
    pixel_inputs: Qwen3-VL images / video as transformers takes them (pixel_values,
    image_grid_thw, pixel_values_videos, video_grid_thw), placeholders in the prompts.
    """
    prompts, width, cache_size = _check_prompts(cfg, prompts, max_new_tokens, max_cache)
    b = len(prompts)
    tokens, mask = left_pad(prompts, width)
    vision = qwen3_vl.batch_vision_inputs(cfg, tokens, mask, pixel_inputs)
    stops = stop_table(() if stop_tokens is None else stop_tokens, b)
    row_ids = np.arange(b) if row_ids is None else np.asarray(row_ids)
    if lam is not None:
        lam = jnp.asarray(np.broadcast_to(np.asarray(lam, np.float32), (b,)))
    prefill, decode = _compiled(cfg, sampling, max_new_tokens, cache_size, stacked=False)
    key = jax.random.key(seed)
    args = (jnp.asarray(stops), key, jnp.asarray(row_ids, jnp.int32))
    state = prefill(params, jnp.asarray(tokens), jnp.asarray(mask), lam, *args, vision)
    state = decode(params, state, lam, *args)
    return _output(state, max_new_tokens, cache_size)


def generate_stacked(cfg: ModelConfig, stacked_params, prompt_groups: list[list[list[int]]],
                     max_new_tokens: int, sampling=Greedy(), seed: int = 0, stop_tokens=None,
                     max_cache: int | None = None, row_id_groups=None) -> list[GenerateOutput]:
    """One compiled program for K models stacked on a leading axis (e.g. K values of λ).

    prompt_groups[k] is the batch for model k; groups are padded to one size
    (padding rows are dropped from the outputs). Returns one output per model.
    """
    k = len(prompt_groups)
    lead = {x.shape[0] for x in jax.tree.leaves(stacked_params)}
    if lead != {k}:
        raise ValueError(f"stacked params lead with {sorted(lead)}, expected {k} (one per prompt group)")
    sizes = [len(g) for g in prompt_groups]
    if min(sizes) == 0:
        raise ValueError("every prompt group needs at least one prompt")
    g = max(sizes)
    flat, width, cache_size = _check_prompts(cfg, [p for grp in prompt_groups for p in grp], max_new_tokens, max_cache)
    groups, pos = [], 0
    for size in sizes:
        rows = flat[pos: pos + size]
        groups.append(rows + [rows[0]] * (g - size))
        pos += size
    padded = [left_pad(rows, width) for rows in groups]
    tokens = np.stack([t for t, _ in padded])
    mask = np.stack([m for _, m in padded])
    stops = np.stack([stop_table(() if stop_tokens is None else stop_tokens, g)] * k)
    if row_id_groups is None:
        row_id_groups = [list(range(size)) for size in sizes]
    row_ids = np.stack([list(r) + [0] * (g - len(r)) for r in row_id_groups]).astype(np.int32)
    prefill, decode = _compiled(cfg, sampling, max_new_tokens, cache_size, stacked=True)
    key = jax.random.key(seed)
    state = prefill(stacked_params, jnp.asarray(tokens), jnp.asarray(mask), None, jnp.asarray(stops), key,
                    jnp.asarray(row_ids), None)
    state = decode(stacked_params, state, None, jnp.asarray(stops), key, jnp.asarray(row_ids))
    outs = []
    for i, size in enumerate(sizes):
        one = jax.tree.map(lambda x: x[i], state)
        o = _output(one, max_new_tokens, cache_size)
        outs.append(GenerateOutput(o.tokens[:size], o.lengths[:size], o.finish_reasons[:size], o.cache_full))
    return outs
