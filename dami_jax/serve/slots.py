"""Pure jitted functions of the continuous-batching engine: prefill, insert, step.

The decode batch is B fixed *slots*. Each slot owns one row of a slot cache of
S positions with its own write index and RoPE position, so rows need not move
in lock step (the model's `KVCache` shares one index across rows). The model
is called on every row as a batch of one and the call is vmapped over slots:

    cache.k[l]: (B, K, S, H)   cache.v[l]: (B, K, H, S)
    valid: (B, S)   index: (B,)   next_pos: (B,)

(slot b's (K, S, H) keys are the model's `KVCache` layout for a batch of one).

Under vmap the per-row `dynamic_update_slice` at the row's own index becomes
one scatter, and the params (unbatched) are shared by all rows: a step is one
batched matmul per weight, like lock-step decoding. In delta mode every row
computes with its own λ (DESIGN 2.2), so any mix of λ shares one step.

Sampling per row (`generate.sampling.sample_rows`: temperature, top-k, top-p as
(B,) arrays; temperature 0 is greedy) in HF order, with the key of row r at step
t = fold_in(fold_in(key(seed), r), t): the scheme of `generate`, so a request
reproduces `generate_pair`.

A row with a thinking budget (`budget:<n>`, policies/budget.py) that has written n
tokens without closing its thinking gets the forced tokens (`</think>` and the
separator after it) in place of its samples, inside the step, then samples on:
`generate_budget`'s rule, without a second prefill.
A slot holding no request keeps computing garbage that nobody reads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from dami_jax.config import ModelConfig
from dami_jax.generate.sampling import sample_rows
from dami_jax.models import qwen3
from dami_jax.models.kv_cache import KVCache


@struct.dataclass
class SlotState:
    cache: KVCache  # index and next_pos are (B,): one per slot
    last: jax.Array  # (B,) int32 last sampled token (the next step's input)
    step: jax.Array  # (B,) int32 tokens emitted so far (the sampling key's step)
    keys: jax.Array  # (B, 2) uint32 raw key data of fold_in(key(seed), row id)
    think: jax.Array  # (B,) int32 thinking-budget phase (see `apply_budget`)


def init_state(cfg: ModelConfig, slots: int, size: int, dtype) -> SlotState:
    cache = KVCache.init(cfg, slots, size, dtype)
    k, v = (tuple(x.reshape(slots, -1, *x.shape[1:]) for x in xs) for xs in (cache.k, cache.v))
    cache = cache.replace(k=k, v=v, index=jnp.zeros((slots,), jnp.int32))  # distinct buffers: all are donated
    return SlotState(cache=cache, last=jnp.zeros((slots,), jnp.int32), step=jnp.zeros((slots,), jnp.int32),
                     keys=jnp.zeros((slots, 2), jnp.uint32), think=jnp.full((slots,), -1, jnp.int32))


def apply_budget(token_b, step_b, think_b, budget_b, forced_f):
    """The thinking budget's rule at one step: (token (B,), new think (B,)).

    think_b: -1 no budget or thinking closed; 0 thinking; k >= 1: k of the forced
    tokens written. step_b: tokens the row has emitted (this token's index).
    forced_f: (F,) the forced tokens, `</think>` first.
    """
    f = forced_f.shape[0]
    forcing = ((think_b == 0) & (step_b >= budget_b)) | ((think_b > 0) & (think_b < f))
    token = jnp.where(forcing, forced_f[jnp.clip(think_b, 0, f - 1)], token_b)
    closed = (think_b == 0) & ~forcing & (token == forced_f[0])  # the row wrote `</think>` itself
    return token, jnp.where(forcing, think_b + 1, jnp.where(closed, -1, think_b))


def _step_keys(raw_b2, step_b):
    return jax.vmap(lambda k, s: jax.random.fold_in(jax.random.wrap_key_data(k), s))(raw_b2, step_b)


def _row_call(cfg, params, k, v, valid, index, next_pos, token, lam):
    """One slot as a batch of one: its (K, S, H) keys and (K, H, S) values per layer in,
    logits (V,) and the row's cache out."""
    cache = KVCache(k=tuple(k), v=tuple(v), valid=valid[None], index=index, next_pos=next_pos[None])
    logits, cache = qwen3.apply(cfg, params, token.reshape(1, 1), jnp.ones((1, 1), jnp.int32),
                                cache=cache, lam=lam[None])
    return logits[0, -1], cache.k, cache.v, cache.valid[0], cache.index, cache.next_pos[0]


def _step(cfg, params, state: SlotState, lam_b, temp_b, top_k_b, top_p_cut_b, budget_b, forced_f):
    c = state.cache
    row = functools.partial(_row_call, cfg, params)
    logits, k, v, valid, index, next_pos = jax.vmap(row)(c.k, c.v, c.valid, c.index, c.next_pos,
                                                         state.last, lam_b)
    token = sample_rows(logits, _step_keys(state.keys, state.step), temp_b, top_k_b, top_p_cut_b)
    token, think = apply_budget(token, state.step, state.think, budget_b, forced_f)
    cache = KVCache(k=k, v=v, valid=valid, index=index, next_pos=next_pos)
    return state.replace(cache=cache, last=token, step=state.step + 1, think=think), token


def _steps(cfg, k, params, state: SlotState, lam_b, temp_b, top_k_b, top_p_cut_b, budget_b, forced_f):
    """k decode steps in one call (one host round trip): tokens (k, B).

    A row that ends inside the call computes on; the host drops its extra tokens.
    A row whose cache fills inside the call writes its last slot again (the write
    index is clamped), but the host has ended it with "length" by then.
    """
    def body(st, _):
        return _step(cfg, params, st, lam_b, temp_b, top_k_b, top_p_cut_b, budget_b, forced_f)

    return jax.lax.scan(body, state, None, length=k)


def _prefill(cfg, params, tokens_gw, mask_gw, lam_g):
    """G prompts left padded to one bucket W (rows without a prompt are all padding):
    last logits (G, V) and a cache of W positions."""
    dtype = jax.tree.leaves(params)[0].dtype
    cache = KVCache.init(cfg, tokens_gw.shape[0], tokens_gw.shape[1], dtype)
    logits, cache = qwen3.apply(cfg, params, tokens_gw, mask_gw, cache=cache, lam=lam_g, last_only=True)
    return logits[:, -1], cache


def _insert(state: SlotState, pcache: KVCache, logits_gv, row, slot, raw_key, temp, top_k, top_p_cut, budget,
            think_end):
    """Copy row `row` of a prefilled batch into `slot` and sample its first token (step 0).
    budget > 0: the row thinks under that budget (`think_end`: the id of `</think>`)."""
    c, w, size = state.cache, pcache.size, state.cache.valid.shape[1]

    def take(x):  # row `row`, keeping a batch axis of 1
        return jax.lax.dynamic_slice_in_dim(x, row, 1, axis=0)

    def take_kv(x):  # row `row`'s K heads of a (G·K, ...) prefill cache, as (1, K, ...)
        heads = c.k[0].shape[1]
        return jax.lax.dynamic_slice_in_dim(x, row * heads, heads, axis=0)[None]

    def put(big, small):
        return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), (slot,) + (0,) * (big.ndim - 1))

    first = sample_rows(take(logits_gv), _step_keys(raw_key[None], jnp.zeros((1,), jnp.int32)),
                        temp[None], top_k[None], top_p_cut[None])[0]
    valid_row = jnp.zeros((1, size), bool).at[:, :w].set(take(pcache.valid))
    cache = KVCache(k=tuple(put(b, take_kv(x)) for b, x in zip(c.k, pcache.k)),
                    v=tuple(put(b, take_kv(x)) for b, x in zip(c.v, pcache.v)),
                    valid=put(c.valid, valid_row), index=c.index.at[slot].set(w),
                    next_pos=c.next_pos.at[slot].set(take(pcache.next_pos)[0]))
    think = jnp.where((budget > 0) & (first != think_end), 0, -1)
    return state.replace(cache=cache, last=state.last.at[slot].set(first), step=state.step.at[slot].set(1),
                         keys=state.keys.at[slot].set(raw_key), think=state.think.at[slot].set(think)), first


@functools.lru_cache(maxsize=8)
def compiled(cfg: ModelConfig, steps: int = 1):
    """(prefill, insert, step) jitted; insert and step donate the slot state; step makes
    `steps` tokens per slot per call, returned as (steps, B)."""
    return (jax.jit(functools.partial(_prefill, cfg)),
            jax.jit(_insert, donate_argnums=(0,)),
            jax.jit(functools.partial(_steps, cfg, steps), donate_argnums=(1,)))


@jax.jit
def row_key(seed, row_id) -> jax.Array:
    """Raw data of fold_in(key(seed), row id): the per-row key `generate` uses (seed < 2**32)."""
    return jax.random.key_data(jax.random.fold_in(jax.random.key(seed), row_id))
