"""Qwen3 dense and MoE decoder in Flax NNX, numerically matching HF transformers; with the
config's family options (config.FAMILIES) it is also the Qwen2 and the Llama 3 decoder.

Params are a plain nested dict (the pure-dict form of the NNX state):

    embed/embedding                    (V, D)
    layers/{i}/input_norm/scale        (D,)
    layers/{i}/attn/q_proj/kernel      (N, H, D)     N query heads, H head_dim
    layers/{i}/attn/k_proj/kernel      (K, H, D)     K key/value heads (GQA)
    layers/{i}/attn/v_proj/kernel      (K, H, D)
    layers/{i}/attn/o_proj/kernel      (D, N·H)
    layers/{i}/attn/q_norm/scale       (H,)          qwen3 only (cfg.qk_norm)
    layers/{i}/attn/k_norm/scale       (H,)
    layers/{i}/attn/{q,k,v}_proj/bias  (N·H,), (K·H,)  cfg.qkv_bias (qwen2; llama's attention_bias)
    layers/{i}/attn/o_proj/bias        (D,)          cfg.o_bias (llama's attention_bias)
    layers/{i}/post_attn_norm/scale    (D,)
    layers/{i}/mlp/{gate,up}_proj/kernel   (F, D)      dense layer
    layers/{i}/mlp/down_proj/kernel        (D, F)
    layers/{i}/mlp/*_proj/bias             (F,), (D,)  cfg.mlp_bias (llama)
    layers/{i}/mlp/router/kernel           (E, D)      MoE layer
    layers/{i}/mlp/{gate,up}_proj          (E, D, F)   stacked experts (ragged_dot's layout)
    layers/{i}/mlp/down_proj               (E, F, D)
    final_norm/scale                   (D,)
    lm_head/kernel                     (V, D)        absent when embeddings are tied
    visual/...                         Qwen3-VL's vision tower (models/vision.py), when cfg.vl

Dense kernels are (out, in) like HF's: the contracted axis is minor, which
XLA:CPU multiplies 1.7x faster than (in, out) at batch 16 decode shapes (equal
at batch 1; benchmarks/dot_chain.py); it also makes loading HF tensors a plain copy.

Delta mode (DESIGN 2.2): every leaf gains a leading axis of 2 holding (Θ_I, Δ);
see models/layers.py.

Stacked layers (`ModelConfig.scan_layers`): `layers/...` is one tree whose
leaves lead with the layer axis L (after delta mode's axis: (2, L, ...)), made
by `stack_layers`, and the layer loop is one `lax.scan`: XLA compiles the layer
once instead of L times (Qwen3-4B on CPU: decode 7.9 -> 1.6 s, benchmarks/compile.py).
Only layers of one kind (all dense or all MoE) stack. A step pays for it on CPU,
where each layer's weights and cache are sliced out of the stacks by copies:
the 0.6B batch-1 decode step ran 95 -> 400 ms (benchmarks/decode.py --scan-layers).

Execution, chosen by the config and not the params: `layout` (models/kv_cache.py)
picks the readable einsums or the XLA:CPU-tuned dots; under an active mesh the
activations are constrained (batch on data, heads on tensor; models/sharding.py);
each block runs in a named scope (layer_3/attn, layer_3/mlp or moe) for profiles.

Norms and softmax run in float32; everything else in the params' dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dami_jax.config import ModelConfig
from dami_jax.engine.pages import RaggedBatch
from dami_jax.models.attention import Attention, allowed_keys
from dami_jax.models.kv_cache import KVCache, resolve_layout
from dami_jax.models.layers import MLP, Embed, Linear, MoE, RMSNorm
from dami_jax.models.sharding import ACTIVATIONS, constrain
from dami_jax.models.vision import VisionTower

Params = dict


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, **kw):
        d = cfg.hidden_size
        self.input_norm = RMSNorm(d, cfg.rms_norm_eps, **kw)
        self.attn = Attention(cfg, **kw)
        self.post_attn_norm = RMSNorm(d, cfg.rms_norm_eps, **kw)
        self.moe = cfg.is_moe_layer(layer)
        if self.moe:
            self.mlp = MoE(d, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                           cfg.norm_topk_prob, **kw)
        else:
            self.mlp = MLP(d, cfg.intermediate_size, bias=cfg.mlp_bias, **kw)

    def __call__(self, x_btd, pos_bt, allowed_bts, kv, index, lam):
        with jax.named_scope("attn"):
            h_btd, kv = self.attn(self.input_norm(x_btd, lam), pos_bt, allowed_bts, kv, index, lam)
        x_btd = x_btd + h_btd
        with jax.named_scope("moe" if self.moe else "mlp"):
            x_btd = x_btd + self.mlp(self.post_attn_norm(x_btd, lam), lam)
        return constrain(x_btd, ACTIVATIONS.batch), kv


def check_scannable(cfg: ModelConfig) -> None:
    """scan_layers needs layers of one kind: refuse configs that mix dense and MoE layers."""
    moe = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    if 0 < len(moe) < cfg.num_layers:
        dense = sorted(set(range(cfg.num_layers)) - set(moe))
        raise ValueError(
            f"scan_layers needs layers of one kind, but this config has dense layers {dense} and MoE "
            f"layers {moe} (mlp_only_layers={list(cfg.mlp_only_layers)}, decoder_sparse_step="
            f"{cfg.decoder_sparse_step}); use scan_layers=False")


class Qwen3(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, delta: bool = False, dtype=jnp.float32, rngs: nnx.Rngs | None):
        kw = dict(delta=delta, dtype=dtype, rngs=rngs, layout=resolve_layout(cfg.layout))
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.scan = cfg.scan_layers
        if self.scan:  # one layer's modules; merged with the stacked leaves (see stack_layers)
            check_scannable(cfg)
            if rngs is not None:
                raise ValueError("scanned params are built unrolled, then stacked: use init_params")
            self.layers = DecoderLayer(cfg, 0, **kw)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, i, **kw) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear("BTD,VD->BTV", (cfg.vocab_size,), (cfg.hidden_size,), **kw)
        self.tied = cfg.tie_word_embeddings
        self.num_layers = cfg.num_layers
        if cfg.vl is not None:  # Qwen3-VL (models/qwen3_vl.py runs it)
            self.visual = VisionTower(cfg.vl, delta=delta, dtype=dtype, rngs=rngs)

    def _inputs(self, tokens_bt, mask_bt, cache: KVCache | None, lam):
        """Embeddings, RoPE positions, the (B, T, S) attention mask, the valid key slots and
        the cache slot this chunk is written at."""
        t = tokens_bt.shape[1]
        mask_bt = mask_bt.astype(bool)
        offset = jnp.maximum(jnp.cumsum(mask_bt, axis=1, dtype=jnp.int32) - 1, 0)
        if cache is None:
            pos_bt, key_valid, q_slot, index = offset, mask_bt, jnp.arange(t), 0
        else:
            pos_bt = cache.next_pos[:, None] + offset
            key_valid = jax.lax.dynamic_update_slice(cache.valid, mask_bt, (0, cache.index))
            q_slot, index = cache.index + jnp.arange(t), cache.index
        x_btd = constrain(self.embed(tokens_bt, lam), ACTIVATIONS.batch)
        return x_btd, pos_bt, allowed_keys(key_valid, q_slot), key_valid, index

    def _decoder(self, x_btd, pos_bt, allowed_bts, kv, index, lam, count: int, every: bool = False,
                 after_layer=None):
        """x after the first `count` decoder layers (with `every`: (count + 1, B, T, D), the input
        and each layer's output), and their keys/values (per layer, or stacked when scanned):
        the updated cache or pools kv (ks, vs), or each chunk's own when kv is None.
        after_layer(i, x) -> x runs after layer i (Qwen3-VL's deepstack)."""
        args = (pos_bt, allowed_bts)
        if not self.scan:
            ks, vs, xs = [], [], [x_btd]
            for i in range(count):
                layer_kv = None if kv is None else (kv[0][i], kv[1][i])
                with jax.named_scope(f"layer_{i}"):
                    x_btd, (k, v) = self.layers[i](x_btd, *args, layer_kv, index, lam)
                xs.append(x_btd)  # the layer's output, before after_layer (HF's hidden states)
                if after_layer is not None:
                    x_btd = after_layer(i, x_btd)
                ks.append(k)
                vs.append(v)
            return (jnp.stack(xs) if every else x_btd), tuple(ks), tuple(vs)
        if after_layer is not None:
            raise ValueError("image prompts (deepstack) need scan_layers=False")

        graphdef, stacked = nnx.split(self.layers)
        axis = 0 if lam is None else 1  # the layer axis comes after delta mode's (Θ_I, Δ)

        def body(x_btd, xs):
            i, kv = xs
            weights = jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, i, axis, keepdims=False), stacked)
            with jax.named_scope("layer"):
                x_btd, kv = nnx.merge(graphdef, weights)(x_btd, *args, kv, index, lam)
            return x_btd, (kv, x_btd if every else None)

        x0_btd = x_btd
        x_btd, ((ks, vs), x_lbtd) = jax.lax.scan(body, x_btd, (jnp.arange(count), kv))
        return (jnp.concatenate([x0_btd[None], x_lbtd]) if every else x_btd), ks, vs

    def __call__(self, tokens_bt, mask_bt, cache: KVCache | None = None, lam=None, last_only: bool = False,
                 vision=None):
        """vision: a Qwen3-VL prefill's `qwen3_vl.VisionSplice` (image rows, M-RoPE positions, deepstack)."""
        x_btd, pos_bt, allowed_bts, key_valid, index = self._inputs(tokens_bt, mask_bt, cache, lam)
        after_layer = None
        if vision is not None:
            x_btd, pos_bt, after_layer = vision.splice(x_btd), vision.pos_3bt, vision.deepstack
        kv = None if cache is None else (cache.k, cache.v)
        x_btd, ks, vs = self._decoder(x_btd, pos_bt, allowed_bts, kv, index, lam, self.num_layers,
                                      after_layer=after_layer)
        if last_only:  # a prefill needs only the next token's logits: skip T-1 rows of the lm_head
            x_btd = x_btd[:, -1:]
        x_btd = self.final_norm(x_btd, lam)
        logits_btv = self.embed.attend(x_btd, lam) if self.tied else self.lm_head(x_btd, lam)
        if cache is not None:
            cache = KVCache(k=ks, v=vs, valid=key_valid, index=cache.index + tokens_bt.shape[1],
                            next_pos=cache.next_pos + jnp.sum(mask_bt.astype(bool), axis=1, dtype=jnp.int32)
                            + (0 if vision is None else vision.delta_b))  # M-RoPE: max position + 1
        return logits_btv.astype(jnp.float32), cache

    def paged(self, tokens_t, pools, batch: RaggedBatch, lam_t, rope_delta_t=None, vision=None):
        """The engine's step over a flat ragged batch: logits (R, V) float32 of each row's last
        token, and the updated pools. The T tokens run as a (T, 1) batch, so every block but
        attention works unchanged, with λ per token (lam_t). Qwen3-VL: rope_delta_t (T,) shifts
        each token's RoPE position by its row's M-RoPE delta; `vision` (a qwen3_vl.VisionSplice
        over the (T, 1) batch) splices the image rows of prefill chunks."""
        x_btd = self.embed(tokens_t[:, None], lam_t)
        pos_t = batch.positions if rope_delta_t is None else batch.positions + rope_delta_t
        pos_bt, after_layer = pos_t[:, None], None
        if vision is not None:
            x_btd, pos_bt, after_layer = vision.splice(x_btd), vision.pos_3bt, vision.deepstack
        x_btd, ks, vs = self._decoder(x_btd, pos_bt, None, pools, batch, lam_t, self.num_layers,
                                      after_layer=after_layer)
        # Only each row's last token needs logits (a padding row points at a real token; ignored).
        last_r = jnp.maximum(batch.cu_q_lens[1:] - 1, 0)
        x_btd = x_btd[last_r]
        lam_r = None if lam_t is None else lam_t[last_r]
        x_btd = self.final_norm(x_btd, lam_r)
        logits_btv = self.embed.attend(x_btd, lam_r) if self.tied else self.lm_head(x_btd, lam_r)
        return logits_btv[:, 0].astype(jnp.float32), (ks, vs)

    def hidden(self, tokens_bt, mask_bt, layer: int | None, lam=None, vision=None):
        """(B, T, D) hidden states after `layer` decoder layers, no cache; layer num_layers
        includes the final norm (HF output_hidden_states numbering). Runs only what it needs.
        layer None: all of them from one pass, (num_layers + 1, B, T, D). vision: as in __call__;
        a layer's hidden state is its output before the deepstack addition, as HF records it."""
        x_btd, pos_bt, allowed_bts, _, index = self._inputs(tokens_bt, mask_bt, None, lam)
        after_layer = None
        if vision is not None:
            x_btd, pos_bt = vision.splice(x_btd), vision.pos_3bt
            last = layer - 1 if layer is not None and layer < self.num_layers else None  # returned as it is

            def after_layer(i, x_btd):
                return x_btd if i == last else vision.deepstack(i, x_btd)
        if layer is None:
            x_lbtd, _, _ = self._decoder(x_btd, pos_bt, allowed_bts, None, index, lam, self.num_layers, every=True,
                                         after_layer=after_layer)
            return x_lbtd.at[-1].set(self.final_norm(x_lbtd[-1], lam))
        x_btd, _, _ = self._decoder(x_btd, pos_bt, allowed_bts, None, index, lam, layer, after_layer=after_layer)
        return self.final_norm(x_btd, lam) if layer == self.num_layers else x_btd


# ---------------------------------------------------------------------------
# Functional surface: params pytree in, arrays out.

def _unrolled(cfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(cfg, scan_layers=False)


@functools.lru_cache(maxsize=None)
def _graphdef(cfg: ModelConfig, delta: bool) -> nnx.GraphDef:
    return nnx.split(Qwen3(cfg, delta=delta, rngs=None))[0]


def abstract_params(cfg: ModelConfig, dtype=jnp.float32, delta: bool = False) -> Params:
    """The params pytree as ShapeDtypeStructs (shapes for loading and sharding)."""
    if cfg.scan_layers:
        check_scannable(cfg)
        return jax.eval_shape(stack_layers, abstract_params(_unrolled(cfg), dtype, delta))
    # Built with rngs=None rather than nnx.eval_shape of the random init, whose
    # tracing cost grows quadratically with the number of leaves (1.2 s for 28 layers).
    return nnx.to_pure_dict(nnx.state(Qwen3(cfg, delta=delta, dtype=jnp.dtype(dtype), rngs=None)))


def init_params(cfg: ModelConfig, key: int | jax.Array = 0, dtype=jnp.float32) -> Params:
    """Random params (normal 0.02, unit norms), for tests and benchmarks; stacked when
    cfg.scan_layers (the same values as the unrolled init, stacked)."""
    if cfg.scan_layers:
        check_scannable(cfg)
        return stack_layers(init_params(_unrolled(cfg), key, dtype))
    seed = key if isinstance(key, int) else int(jax.random.randint(key, (), 0, 2**31 - 1))
    # Eager on purpose: one jitted init of every leaf took 2 min to compile for Qwen3-4B on an
    # H100 (32 s on CPU for 0.6B, against 13 s eager); eagerly each initializer compiles once per shape.
    return nnx.to_pure_dict(nnx.state(Qwen3(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed))))


def is_delta(params: Params) -> bool:
    """Delta-mode params carry a leading (Θ_I, Δ) axis on every leaf."""
    return params["embed"]["embedding"].ndim == 3


def is_stacked(params: Params) -> bool:
    """Stacked params hold one tree of layer-stacked leaves under `layers`, not one per layer."""
    return "input_norm" in params["layers"]


def stack_layers(params: Params) -> Params:
    """Per-layer params -> one tree with the layer axis leading each leaf (after delta mode's
    (Θ_I, Δ) axis, so interpolate / delta_params of stacked params are the stacked results)."""
    if is_stacked(params):
        raise ValueError("params are already stacked")
    layers = [params["layers"][i] for i in range(len(params["layers"]))]
    kinds = {jax.tree.structure(layer) for layer in layers}
    if len(kinds) > 1:
        raise ValueError("only layers of one kind stack: these params mix dense and MoE layers")
    axis = 1 if is_delta(params) else 0
    return {**params, "layers": jax.tree.map(lambda *ws: jnp.stack(ws, axis=axis), *layers)}


def unstack_layers(params: Params) -> Params:
    """The inverse of stack_layers: one tree per layer, keyed 0..L-1."""
    if not is_stacked(params):
        raise ValueError("params are not stacked")
    axis = 1 if is_delta(params) else 0
    count = params["layers"]["input_norm"]["scale"].shape[axis]
    layers = {i: jax.tree.map(lambda w: jnp.take(w, i, axis=axis), params["layers"]) for i in range(count)}
    return {**params, "layers": layers}


def _model(cfg: ModelConfig, params: Params, lam) -> Qwen3:
    delta = is_delta(params)
    if delta != (lam is not None):
        raise ValueError(
            "delta-mode params need a per-row lam (B,)" if delta
            else "lam was given but params are not in delta mode (see dami_jax.interpolate.delta_params)"
        )
    if is_stacked(params) != cfg.scan_layers:
        raise ValueError(
            "cfg.scan_layers=True needs stacked params (qwen3.stack_layers(params))" if cfg.scan_layers
            else "params are stacked (qwen3.stack_layers): use a config with scan_layers=True"
        )
    return nnx.merge(_graphdef(cfg, delta), params)


def apply(cfg: ModelConfig, params: Params, tokens_bt, mask_bt, cache=None, lam=None, last_only: bool = False):
    """One model call (not jitted): logits (B, T, V) float32 and the updated cache.

    `lam` (B,) is required for delta-mode params and refused for plain ones.
    `last_only`: logits of the last column only, (B, 1, V) (left padding puts
    every row's last token there).
    """
    return _model(cfg, params, lam)(tokens_bt, mask_bt, cache=cache, lam=lam, last_only=last_only)


def init_pools(cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> tuple:
    """Empty KV pools (k_pools, v_pools) for the engine: per layer (K, P, page, H), a tuple of
    layers, or one (L, K, P, page, H) array each when cfg.scan_layers. Unrolled, the step updates
    the donated pools in place; scanned, XLA copies the stacks once a step (as the dense cache's),
    so the engine on CPU wants scan_layers=False."""
    shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    if cfg.scan_layers:
        return jnp.zeros((cfg.num_layers, *shape), dtype), jnp.zeros((cfg.num_layers, *shape), dtype)
    return (tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)))


def paged_step(cfg: ModelConfig, params: Params, pools, tokens_t, batch: RaggedBatch, lam_t=None,
               rope_delta_t=None, vision=None):
    """One engine step (not jitted; jit it with the pools donated): logits (R, V) float32 of each
    row's last token and the updated pools (init_pools's form).

    tokens_t (T,): the flat batch of the step, batch its metadata (pages.PageAllocator.ragged_batch,
    as device arrays); lam_t (T,): each token's λ, required for delta-mode params (0 for padding).
    rope_delta_t, vision: Qwen3-VL's (see Qwen3.paged).
    """
    return _model(cfg, params, lam_t).paged(tokens_t, pools, batch, lam_t, rope_delta_t, vision)


def resolve_layer(layer: int, num_layers: int) -> int:
    """A hidden-state layer in [0, num_layers]; negatives count back (-1: after the final norm)."""
    if not -(num_layers + 1) <= layer <= num_layers:
        raise ValueError(f"hidden_layer={layer} is outside [-{num_layers + 1}, {num_layers}] "
                         f"for a model of {num_layers} layers (0: embeddings, -1: final)")
    return layer % (num_layers + 1)


def hidden_states(cfg: ModelConfig, params: Params, tokens_bt, mask_bt, layer: int | None, lam=None) -> jax.Array:
    """(B, T, D) hidden states (not jitted), numbered as HF's output_hidden_states: 0 is the
    embedding output, i the output of decoder layer i, num_layers (or -1) the last layer's
    output after the final norm. Only the layers up to `layer` run. layer None: every one of
    them from one pass, (num_layers + 1, B, T, D)."""
    layer = None if layer is None else resolve_layer(layer, cfg.num_layers)
    return _model(cfg, params, lam).hidden(tokens_bt, mask_bt, layer, lam=lam)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, mask, lam):
    return apply(cfg, params, tokens, mask, lam=lam)[0]


def forward(cfg: ModelConfig, params: Params, tokens, attention_mask=None, lam=None) -> jax.Array:
    """Logits (B, T, V) in float32 for a full sequence, no cache (DESIGN 2.1).

    attention_mask: (B, T) with 1 for real tokens and 0 for (left) padding.
    """
    if not isinstance(tokens, jax.core.Tracer):
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < 0 or arr.max() >= cfg.vocab_size):
            bad = arr.min() if arr.min() < 0 else arr.max()
            raise ValueError(f"token id {int(bad)} outside the vocabulary [0, {cfg.vocab_size})")
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, seq), got shape {tokens.shape}")
    if attention_mask is None:
        attention_mask = jnp.ones_like(tokens)
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != tokens shape {tokens.shape}")
    if tokens.shape[1] > cfg.max_position_embeddings:
        raise ValueError(
            f"sequence of {tokens.shape[1]} tokens exceeds max_position_embeddings={cfg.max_position_embeddings}"
        )
    if lam is not None:
        lam = jnp.broadcast_to(jnp.asarray(lam, jnp.float32), (tokens.shape[0],))
    return _forward(cfg, params, tokens, attention_mask, lam)
