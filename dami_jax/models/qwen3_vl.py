"""Qwen3-VL: the vision tower's rows spliced into the Qwen3 decoder, matching transformers'
`Qwen3VLForConditionalGeneration` / `Qwen3VLMoeForConditionalGeneration`.

The language model is exactly Qwen3 / Qwen3-MoE (models/qwen3.py); a prefill with
images or video differs from a text prefill in three ways, all carried by one
`VisionSplice`:
  1. the merged vision rows replace the embeddings of the placeholder tokens,
     in order (images first fill `<|image_pad|>`, videos `<|video_pad|>`);
  2. positions are M-RoPE's (3, B, T), computed on the host (models/mrope.py);
  3. deepstack: the k-th deepstack feature is added at the vision positions
     after text layer k (layers 0..n-1, not the ViT block numbers).
After the prefill the cache's next position is the row's max position + 1
(`delta`), so decoding is the plain text path.

Inputs follow transformers' conventions: `pixel_values` / `pixel_values_videos` are
the patch rows of every image / video of the batch in order, `image_grid_thw` /
`video_grid_thw` their grids. Images and videos run through the tower in one call
(every op is per patch or per frame, so this equals two calls).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dami_jax.config import ModelConfig
from dami_jax.errors import InputError
from dami_jax.models import qwen3
from dami_jax.models.mrope import rope_index
from dami_jax.models.vision import PatchLayout, check_grids, merged_counts, patch_layout
from dami_jax.multimodal.buckets import patch_bucket

PIXEL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@struct.dataclass
class VisionInputs:
    """The device inputs of a prefill with images (`vision_inputs` builds them on the host)."""
    pixels_nk: jax.Array  # (N, C·T·P·P) patch rows: images, then videos
    layout: PatchLayout
    patch_row_n: jax.Array  # (N,) the batch row each patch's image belongs to (its λ in delta mode)
    index_bt: jax.Array  # (B, T) the merged vision row of each placeholder (0 elsewhere)
    visual_bt: jax.Array  # (B, T) bool: placeholder positions
    pos_3bt: jax.Array  # (3, B, T) M-RoPE positions
    delta_b: jax.Array  # (B,) max position + 1 - real tokens


@struct.dataclass
class VisionSplice:
    """What the decoder (`Qwen3.__call__`, `Qwen3.paged`) needs of a prefill with images."""
    rows_md: jax.Array  # merged vision rows (M, D)
    deepstack_kmd: tuple  # deepstack features, each (M, D)
    index_bt: jax.Array  # the row of rows_md at each placeholder (0 elsewhere)
    visual_bt: jax.Array  # bool: placeholder positions
    pos_3bt: jax.Array  # M-RoPE positions
    delta_b: jax.Array | None  # the cache's next position: max position + 1 (dense cache only)
    deepstack_layers: tuple[int, ...] = struct.field(pytree_node=False, default=())  # where each is added

    def splice(self, x_btd):
        return jnp.where(self.visual_bt[..., None], self.rows_md[self.index_bt].astype(x_btd.dtype), x_btd)

    def deepstack(self, layer: int, x_btd):
        for feats_md, at in zip(self.deepstack_kmd, self.deepstack_layers):
            if at == layer:
                x_btd = x_btd + jnp.where(self.visual_bt[..., None], feats_md[self.index_bt].astype(x_btd.dtype), 0)
        return x_btd


def _owner_rows(placeholder_rows: np.ndarray, counts: np.ndarray, what: str) -> np.ndarray:
    """The batch row of each image (video), given the row of each placeholder token in order:
    image k fills the next counts[k] placeholders."""
    if len(placeholder_rows) != counts.sum():
        raise InputError(f"the tokens hold {len(placeholder_rows)} {what} placeholder tokens but the {what} "
                         f"grids give {int(counts.sum())} merged rows ({counts.tolist()})")
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return placeholder_rows[firsts] if len(counts) else np.zeros((0,), np.int64)


def _pixels(values, grid, cfg, what: str) -> np.ndarray:
    arr = np.asarray(values)
    want = int(grid.prod(-1).sum())
    if arr.shape != (want, cfg.vl.patch_dim):
        raise InputError(f"{what} has shape {arr.shape}; its grids need ({want}, {cfg.vl.patch_dim}) "
                         "(patches, channels·temporal_patch·patch²)")
    return arr


def vision_inputs(cfg: ModelConfig, tokens_bt, mask_bt=None, *, pixel_values=None, image_grid_thw=None,
                  pixel_values_videos=None, video_grid_thw=None, pad_patches: int | None = None) -> VisionInputs:
    """Host side of a prefill with images and/or video (numpy arrays).

    pad_patches: pad the patch rows to this count (fixed jit shapes across image sizes).
    """
    vl = cfg.vl
    if vl is None:
        raise InputError(f"pixel inputs were given but the model ({cfg.model_type}) has no vision tower")
    if (pixel_values is None) != (image_grid_thw is None):
        raise InputError("pixel_values and image_grid_thw go together")
    if (pixel_values_videos is None) != (video_grid_thw is None):
        raise InputError("pixel_values_videos and video_grid_thw go together")
    tokens = np.asarray(tokens_bt)
    mask = np.ones(tokens.shape, bool) if mask_bt is None else np.asarray(mask_bt).astype(bool)
    empty = np.zeros((0, 3), np.int64)
    img = empty if image_grid_thw is None else check_grids(image_grid_thw, vl)
    vid = empty if video_grid_thw is None else check_grids(video_grid_thw, vl, "video_grid_thw")
    parts = [_pixels(v, g, cfg, w) for v, g, w in ((pixel_values, img, "pixel_values"),
                                                  (pixel_values_videos, vid, "pixel_values_videos")) if v is not None]
    if not parts:
        raise InputError("no pixel inputs: expected pixel_values / image_grid_thw and/or pixel_values_videos / "
                         "video_grid_thw")
    pixels = np.concatenate(parts)
    is_img, is_vid = tokens == vl.image_token_id, tokens == vl.video_token_id
    img_counts, vid_counts = merged_counts(img, vl), merged_counts(vid, vl)
    owners = np.concatenate([_owner_rows(np.nonzero(is_img)[0], img_counts, "image"),
                             _owner_rows(np.nonzero(is_vid)[0], vid_counts, "video")])
    sizes = np.concatenate([img.prod(-1), vid.prod(-1)]).astype(np.int64)
    patch_row = np.repeat(owners, sizes)
    index = np.where(is_img, np.cumsum(is_img, axis=None).reshape(tokens.shape) - 1,
                     np.where(is_vid, img_counts.sum() + np.cumsum(is_vid, axis=None).reshape(tokens.shape) - 1, 0))
    positions, deltas = rope_index(tokens, mask, vl, img if len(img) else None, vid if len(vid) else None)
    layout = patch_layout(np.concatenate([img, vid]), vl, pad_to=pad_patches)
    if pad_patches is not None:
        pad = pad_patches - len(pixels)
        pixels = np.concatenate([pixels, np.zeros((pad, pixels.shape[1]), pixels.dtype)])
        patch_row = np.concatenate([patch_row, np.zeros((pad,), np.int64)])
    return VisionInputs(pixels_nk=pixels, layout=layout, patch_row_n=patch_row.astype(np.int32),
                        index_bt=index.astype(np.int32), visual_bt=is_img | is_vid, pos_3bt=positions,
                        delta_b=deltas)


def select_rows(cfg: ModelConfig, prompts: list[list[int]], pixel_inputs: dict, rows: list[int]) -> dict:
    """The pixel inputs of the prompts `rows` (in that order) of a batch's: each prompt's
    placeholders take the next images / videos of the batch in order."""
    if cfg.vl is None:
        raise InputError(f"pixel inputs were given but the model ({cfg.model_type}) has no vision tower")
    out = {}
    for pix_key, grid_key, token in (("pixel_values", "image_grid_thw", cfg.vl.image_token_id),
                                     ("pixel_values_videos", "video_grid_thw", cfg.vl.video_token_id)):
        if pixel_inputs.get(grid_key) is None:
            continue
        grid = check_grids(pixel_inputs[grid_key], cfg.vl, grid_key)
        pixels = _pixels(pixel_inputs[pix_key], grid, cfg, pix_key)
        placeholder_rows = np.repeat(np.arange(len(prompts)), [sum(t == token for t in p) for p in prompts])
        item_rows = _owner_rows(placeholder_rows, merged_counts(grid, cfg.vl), grid_key.split("_")[0])
        ends = np.cumsum(grid.prod(-1))
        chosen = [i for r in rows for i in np.flatnonzero(item_rows == r)]
        if chosen:
            out[grid_key] = grid[chosen]
            out[pix_key] = np.concatenate([pixels[ends[i] - grid[i].prod(): ends[i]] for i in chosen])
    return out


def _is_delta(tree) -> bool:
    return tree["pos_embed"]["embedding"].ndim == 3


def apply(cfg: ModelConfig, params, tokens_bt, mask_bt, vis: VisionInputs, cache=None, lam=None,
          last_only: bool = False, deepstack_layers: tuple[int, ...] | None = None):
    """`qwen3.apply` of a prefill with images (not jitted): logits (B, T, V) float32 and the cache.

    A delta-mode tower runs each patch at its row's λ; a plain tower in delta-mode params
    (both checkpoints' towers equal, see ModelPair.delta) runs once for all rows.
    deepstack_layers: where the deepstack features go (default 0..n-1, transformers' rule).
    """
    model = qwen3._model(cfg, params, lam)
    splice = _splice(model, params, vis, lam, deepstack_layers)
    return model(tokens_bt, mask_bt, cache=cache, lam=lam, last_only=last_only, vision=splice)


def _splice(model, params, vis: VisionInputs, lam, deepstack_layers=None) -> VisionSplice:
    """The tower run on the prefill's patches (each at its row's λ for a delta-mode tower)."""
    lam_n = lam[vis.patch_row_n] if lam is not None and _is_delta(params["visual"]) else None
    rows_md, deepstack = model.visual(vis.pixels_nk, vis.layout, lam_n)
    layers = tuple(range(len(deepstack))) if deepstack_layers is None else tuple(deepstack_layers)
    return VisionSplice(rows_md, tuple(deepstack), vis.index_bt, vis.visual_bt, vis.pos_3bt, vis.delta_b, layers)


def hidden_states(cfg: ModelConfig, params, tokens_bt, mask_bt, vis: VisionInputs, layer: int | None, lam=None):
    """`qwen3.hidden_states` of a prompt with images (not jitted), numbered as HF's
    output_hidden_states (a layer's output before its deepstack addition)."""
    layer = None if layer is None else qwen3.resolve_layer(layer, cfg.num_layers)
    model = qwen3._model(cfg, params, lam)
    return model.hidden(tokens_bt, mask_bt, layer, lam=lam, vision=_splice(model, params, vis, lam))


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, mask, vis, lam):
    return apply(cfg, params, tokens, mask, vis, lam=lam)[0]


def forward(cfg: ModelConfig, params, tokens, attention_mask=None, lam=None, *, pixel_values=None,
            image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None) -> jax.Array:
    """Logits (B, T, V) float32 for a full sequence, no cache (DESIGN 2.1): `qwen3.forward`,
    and for Qwen3-VL with images and/or video given as transformers takes them."""
    pixels = {k: v for k, v in dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                                    pixel_values_videos=pixel_values_videos,
                                    video_grid_thw=video_grid_thw).items() if v is not None}
    if not pixels:
        return qwen3.forward(cfg, params, tokens, attention_mask, lam)
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise InputError(f"tokens must be (batch, seq), got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        raise InputError(f"token ids must lie in [0, {cfg.vocab_size}), got {tokens.min()}..{tokens.max()}")
    mask = np.ones(tokens.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != tokens.shape:
        raise InputError(f"attention_mask shape {mask.shape} != tokens shape {tokens.shape}")
    vis = batch_vision_inputs(cfg, tokens, mask, pixels)
    if lam is not None:
        lam = jnp.broadcast_to(jnp.asarray(lam, jnp.float32), (tokens.shape[0],))
    return _forward(cfg, params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), vis, lam)


def batch_vision_inputs(cfg: ModelConfig, tokens_bt, mask_bt, pixel_inputs: dict) -> VisionInputs | None:
    """`vision_inputs` of a padded batch with its patches bucketed (`patch_bucket`); None without
    pixel inputs. pixel_inputs: transformers' keywords, None values ignored."""
    pixels = {k: v for k, v in pixel_inputs.items() if v is not None}
    unknown = sorted(set(pixels) - set(PIXEL_KEYS))
    if unknown:
        raise InputError(f"unknown pixel input(s) {unknown}; expected some of {list(PIXEL_KEYS)}")
    if not pixels:
        return None
    patches = sum(int(np.prod(np.asarray(g), axis=-1).sum()) for k, g in pixels.items() if k.endswith("thw"))
    return vision_inputs(cfg, tokens_bt, mask_bt, pad_patches=patch_bucket(patches), **pixels)


@functools.partial(jax.jit, static_argnums=0)
def _tower(cfg, params, pixels, layout, lam_n=None):
    """The merged rows and the deepstack features; lam_n: each patch's λ for delta-mode params."""
    visual = qwen3._model(cfg, params, None if lam_n is None else lam_n[:1]).visual
    return visual(pixels, layout, lam_n if _is_delta(params["visual"]) else None)


def vision_tower(cfg: ModelConfig, params, pixel_values, grid_thw):
    """The tower alone, as transformers' `Qwen3VLVisionModel`: the merged rows (N/4, D) and the
    deepstack features, a list of (N/4, D)."""
    grid = check_grids(grid_thw, cfg.vl)
    return _tower(cfg, params, _pixels(pixel_values, grid, cfg, "pixel_values"), patch_layout(grid, cfg.vl))


# ---------------------------------------------------------------------------
# The paged engine: one request's images, and the image rows of a step's prefill chunks.

@dataclasses.dataclass(frozen=True)
class PromptVision:
    """A request's images, run through the tower once at submission (host arrays)."""
    pos_3n: np.ndarray  # (3, n) M-RoPE positions of the prompt's tokens
    delta: int  # a generated token at slot j has position j + delta on every axis
    index_n: np.ndarray  # (n,) the merged row at each placeholder, -1 elsewhere
    rows_md: np.ndarray  # (M, D) merged rows
    deepstack_kmd: np.ndarray  # (K, M, D) deepstack features


def prompt_vision(cfg: ModelConfig, params, prompt: list[int], pixel_inputs: dict, lam=None) -> PromptVision:
    """PromptVision of one prompt with its images / video (transformers' keywords); lam: the
    request's λ for delta-mode params."""
    tokens = np.asarray([prompt], np.int64)
    vis = batch_vision_inputs(cfg, tokens, np.ones_like(tokens), pixel_inputs)
    lam_n = None if lam is None else jnp.full(vis.patch_row_n.shape, lam, jnp.float32)
    rows_md, deepstack = jax.device_get(_tower(cfg, params, vis.pixels_nk, vis.layout, lam_n))
    count = int(vis.visual_bt.sum())
    return PromptVision(pos_3n=np.asarray(vis.pos_3bt[:, 0]), delta=int(vis.delta_b[0]),
                        index_n=np.where(vis.visual_bt[0], vis.index_bt[0], -1).astype(np.int32),
                        rows_md=rows_md[:count], deepstack_kmd=np.stack([d[:count] for d in deepstack]))


def paged_splice(chunks, positions_t: np.ndarray, rope_delta_t: np.ndarray) -> VisionSplice | None:
    """The VisionSplice of an engine step over T flat tokens (a (T, 1) batch), or None when no
    chunk feeds prompt tokens of a request with images. chunks: (PromptVision or None, first
    flat token, first sequence position, tokens) per planned row; positions_t, rope_delta_t:
    each flat token's slot position and its row's delta (the position of every other token).
    Image rows are padded to a power of two (few compiled shapes)."""
    pos_3t = np.array(np.broadcast_to(positions_t + rope_delta_t, (3, len(positions_t))), np.int32)
    index_t = np.zeros(len(positions_t), np.int32)
    visual_t = np.zeros(len(positions_t), bool)
    rows, deepstack, offset = [], [], 0
    for pv, start, first, q in chunks:
        n = 0 if pv is None else len(pv.index_n)
        if first >= n:  # decoding, or past the prompt: text positions shifted by the delta
            continue
        j = np.arange(first, min(first + q, n))  # this chunk's prompt tokens
        at = start + j - first
        pos_3t[:, at] = pv.pos_3n[:, j]
        idx = pv.index_n[j]
        visual_t[at] = idx >= 0
        index_t[at] = np.where(idx >= 0, idx + offset, 0)
        rows.append(pv.rows_md)
        deepstack.append(pv.deepstack_kmd)
        offset += len(pv.rows_md)
    if not rows:
        return None
    pad = max(16, 1 << (offset - 1).bit_length()) - offset
    rows_md = np.concatenate(rows + [np.zeros((pad, rows[0].shape[1]), rows[0].dtype)])
    ds_kmd = np.concatenate(deepstack + [np.zeros((deepstack[0].shape[0], pad, rows[0].shape[1]), rows[0].dtype)],
                            axis=1)
    return VisionSplice(rows_md, tuple(ds_kmd), index_t[:, None], visual_t[:, None], pos_3t[:, :, None], None,
                        tuple(range(len(ds_kmd))))
