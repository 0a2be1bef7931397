"""The Qwen3-VL vision tower in Flax NNX, matching transformers' `Qwen3VLVisionModel`.

Input: `pixel_values` (N, C·T·P·P), the patch rows of every image and video of a
batch concatenated in order, as the HF processor lays them out: each image's
patches in 2×2 merge-block order, each row one (C, T, P, P) cube. Per-patch
metadata that depends only on the grids (`grid_thw`) is computed on the host
(`patch_layout`), so the jitted tower sees fixed shapes:

    patch embed      a Conv3d whose kernel equals its stride: one matmul
    + positions      the learned side×side table resampled bilinearly to each
                     grid (align_corners=True), 4 taps per patch
    blocks           LayerNorm (with bias) → attention with 2-D axial rotary,
                     full within each frame (in query blocks) → LayerNorm → tanh-GELU MLP
    merger           LayerNorm → 2×2 patches to one row → fc1 → erf-GELU → fc2
    deepstack        the same merger, normalizing after the 2×2 reshape, on the
                     outputs of the configured blocks

Params (torch's shapes, so loading is a plain copy; every kernel is (out, in)):

    patch_embed/{kernel (Dv, C, T, P, P), bias}    pos_embed/embedding (side², Dv)
    blocks/{i}/{norm1,norm2}/{scale,bias}          blocks/{i}/attn/{qkv,proj}/{kernel,bias}
    blocks/{i}/mlp/{fc1,fc2}/{kernel,bias}         {merger,deepstack/{k}}/{norm,fc1,fc2}/...

Delta mode (DESIGN 2.2): every leaf leads with (Θ_I, Δ) and each patch row
carries the λ of the batch row its image belongs to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from dami_jax.errors import InputError
from dami_jax.models.layers import delta_einsum, normal, param, row_lam
from dami_jax.vl_config import VLConfig

_zeros, _ones = nnx.initializers.zeros, nnx.initializers.ones


def _mix(w: jax.Array, lam: jax.Array | None, ndim: int) -> jax.Array:
    """A (delta) weight broadcast against (N, ...) rows of rank ndim: Θ_I + λ_n·Δ per row."""
    if lam is None:
        return w
    return w[0] + row_lam(lam, ndim, w.dtype) * w[1]


class Dense(nnx.Module):
    """torch's Linear: y = x·Wᵀ + b, W (out, in)."""

    def __init__(self, d_in: int, d_out: int, *, delta: bool, dtype, rngs):
        self.kernel = param((d_out, d_in), dtype, delta, rngs, normal)
        self.bias = param((d_out,), dtype, delta, rngs, _zeros)

    def __call__(self, x_nd, lam_n):
        return delta_einsum("ND,OD->NO", x_nd, self.kernel[...], lam_n) + _mix(self.bias[...], lam_n, 2)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, delta: bool, dtype, rngs, eps: float = 1e-6):
        self.scale = param((dim,), dtype, delta, rngs, _ones)
        self.bias = param((dim,), dtype, delta, rngs, _zeros)
        self.eps = eps

    def __call__(self, x_nd, lam_n):
        x32 = x_nd.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).astype(x_nd.dtype)
        return y * _mix(self.scale[...], lam_n, 2) + _mix(self.bias[...], lam_n, 2)


def _rotate(x_nhd, cos_nd, sin_nd):
    """Rotary in float32 (rotate_half convention), cast back."""
    x32 = x_nhd.astype(jnp.float32)
    half = x32.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos_nd[:, None] + rotated * sin_nd[:, None]).astype(x_nhd.dtype)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VLConfig, **kw):
        self.qkv = Dense(cfg.hidden_size, 3 * cfg.hidden_size, **kw)
        self.proj = Dense(cfg.hidden_size, cfg.hidden_size, **kw)
        self.num_heads = cfg.num_heads

    def __call__(self, x_nd, cos_nd, sin_nd, frame_n, lam_n):
        n, d = x_nd.shape
        q, k, v = jnp.moveaxis(self.qkv(x_nd, lam_n).reshape(n, 3, self.num_heads, -1), 1, 0)
        q, k = _rotate(q, cos_nd, sin_nd), _rotate(k, cos_nd, sin_nd)
        return self.proj(frame_attention(q, k, v, frame_n).reshape(n, d), lam_n)


QUERY_BLOCK = 1024  # queries per block of frame_attention: scores take (heads, block, N), not (heads, N, N)


def frame_attention(q_qnh, k_knh, v_knh, frame_n, block: int = QUERY_BLOCK):
    """Softmax attention of every patch over the patches of its own frame (frame ids frame_n),
    in blocks of `block` queries, so memory grows with N·block rather than N² (many images)."""
    n, heads, h = q_qnh.shape
    block = min(block, n)
    pad = -n % block  # padding queries (their rows are dropped)
    q_qnh = jnp.pad(q_qnh, ((0, pad), (0, 0), (0, 0)))
    frame_q = jnp.pad(frame_n, (0, pad))

    def one(args):
        q_bnh, frame_b = args
        scores = jnp.einsum("QNH,KNH->NQK", q_bnh, k_knh, preferred_element_type=jnp.float32) * h ** -0.5
        scores = jnp.where((frame_b[:, None] == frame_n[None, :])[None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_knh.dtype)
        return jnp.einsum("NQK,KNH->QNH", probs, v_knh)

    blocks = (n + pad) // block
    out = jax.lax.map(one, (q_qnh.reshape(blocks, block, heads, h), frame_q.reshape(blocks, block)))
    return out.reshape(n + pad, heads, h)[:n]


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VLConfig, **kw):
        self.norm1 = LayerNorm(cfg.hidden_size, **kw)
        self.attn = VisionAttention(cfg, **kw)
        self.norm2 = LayerNorm(cfg.hidden_size, **kw)
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x_nd, cos_nd, sin_nd, frame_n, lam_n):
        x_nd = x_nd + self.attn(self.norm1(x_nd, lam_n), cos_nd, sin_nd, frame_n, lam_n)
        h = jax.nn.gelu(self.fc1(self.norm2(x_nd, lam_n), lam_n), approximate=True)
        return x_nd + self.fc2(h, lam_n)


class Merger(nnx.Module):
    """2×2 neighbouring patches (consecutive rows) to one text-width row. The final merger
    normalizes each patch before the reshape, the deepstack ones the reshaped row."""

    def __init__(self, cfg: VLConfig, postshuffle_norm: bool, **kw):
        wide = cfg.hidden_size * cfg.merge_unit
        self.postshuffle_norm = postshuffle_norm
        self.norm = LayerNorm(wide if postshuffle_norm else cfg.hidden_size, **kw)
        self.fc1 = Dense(wide, wide, **kw)
        self.fc2 = Dense(wide, cfg.out_hidden_size, **kw)
        self.unit = cfg.merge_unit

    def __call__(self, x_nd, lam_n):
        n = x_nd.shape[0]
        lam_m = None if lam_n is None else lam_n[:: self.unit]  # the 4 patches of a row share an image
        if self.postshuffle_norm:
            x_md = self.norm(x_nd.reshape(n // self.unit, -1), lam_m)
        else:
            x_md = self.norm(x_nd, lam_n).reshape(n // self.unit, -1)
        return self.fc2(jax.nn.gelu(self.fc1(x_md, lam_m), approximate=False), lam_m)


class PatchEmbed(nnx.Module):
    """A Conv3d whose kernel equals its stride, as one matmul over the flattened patch rows;
    the kernel keeps torch's (Dv, C, T, P, P) shape."""

    def __init__(self, d_in: int, d_out: int, cube: tuple[int, ...], *, delta: bool, dtype, rngs):
        self.kernel = param((d_out, *cube), dtype, delta, rngs, normal)
        self.bias = param((d_out,), dtype, delta, rngs, _zeros)

    def __call__(self, pixels_nk, lam_n):
        kernel = self.kernel[...]
        kernel = kernel.reshape(*kernel.shape[: kernel.ndim - 4], -1)  # (Dv, C·T·P·P), a free reshape
        y = delta_einsum("NK,OK->NO", pixels_nk.astype(kernel.dtype), kernel, lam_n)
        return y + _mix(self.bias[...], lam_n, 2)


class PositionTable(nnx.Module):
    """The learned side×side position table, resampled to a grid by 4 weighted taps per patch."""

    def __init__(self, rows: int, dim: int, *, delta: bool, dtype, rngs):
        self.embedding = param((rows, dim), dtype, delta, rngs, normal)

    def __call__(self, idx_n4, w_n4, lam_n):
        table = self.embedding[...]
        if lam_n is None:
            taps_n4d = jnp.take(table, idx_n4, axis=0)
        else:
            both = jnp.take(table, idx_n4, axis=1)
            taps_n4d = both[0] + row_lam(lam_n, 3, both.dtype) * both[1]
        return jnp.sum(taps_n4d * w_n4[..., None], axis=1)


@struct.dataclass
class PatchLayout:
    """Host-computed, per-patch metadata of a batch of grids (`patch_layout`)."""
    table_idx: jax.Array  # (N, 4) int32: the position-table rows each patch interpolates
    table_w: jax.Array  # (N, 4) float32: their bilinear weights
    rot_pos: jax.Array  # (N, 2) int32: (row, col) of each patch, for the axial rotary
    frame: jax.Array  # (N,) int32: the frame a patch belongs to (attention stays within it); -1 padding


class VisionTower(nnx.Module):
    def __init__(self, cfg: VLConfig, *, delta: bool, dtype, rngs):
        kw = dict(delta=delta, dtype=dtype, rngs=rngs)
        c, t, p = cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size
        self.patch_embed = PatchEmbed(c * t * p * p, cfg.hidden_size, (c, t, p, p), **kw)
        self.pos_embed = PositionTable(cfg.num_position_embeddings, cfg.hidden_size, **kw)
        self.blocks = nnx.List([VisionBlock(cfg, **kw) for _ in range(cfg.depth)])
        self.merger = Merger(cfg, False, **kw)
        self.deepstack = nnx.List([Merger(cfg, True, **kw) for _ in cfg.deepstack_visual_indexes])
        self.deepstack_indexes = cfg.deepstack_visual_indexes
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.rope_theta = cfg.rope_theta

    def __call__(self, pixels_nk, layout: PatchLayout, lam_n=None):
        """(merged (N/4, D), [deepstack (N/4, D) per configured block, in block order])."""
        x_nd = self.patch_embed(pixels_nk, lam_n)
        x_nd = x_nd + self.pos_embed(layout.table_idx, layout.table_w, lam_n).astype(x_nd.dtype)

        quarter = self.head_dim // 4
        inv_freq = 1.0 / (self.rope_theta ** (jnp.arange(0, 2 * quarter, 2, dtype=jnp.float32) / (2 * quarter)))
        angles = (layout.rot_pos.astype(jnp.float32)[..., None] * inv_freq).reshape(-1, 2 * quarter)  # [row | col]
        angles = jnp.concatenate([angles, angles], axis=-1)
        cos_nd, sin_nd = jnp.cos(angles), jnp.sin(angles)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x_nd = block(x_nd, cos_nd, sin_nd, layout.frame, lam_n)
            if i in self.deepstack_indexes:
                deepstack.append(self.deepstack[self.deepstack_indexes.index(i)](x_nd, lam_n))
        return self.merger(x_nd, lam_n), deepstack


def check_grids(grid_thw, cfg: VLConfig, what: str = "image_grid_thw") -> np.ndarray:
    """grid_thw as an (M, 3) int array of positive sizes whose h and w the merge size divides."""
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or not np.issubdtype(grid.dtype, np.integer):
        raise InputError(f"{what} must be an (images, 3) integer array of (t, h, w), got {grid.dtype} {grid.shape}")
    m = cfg.spatial_merge_size
    if (grid <= 0).any() or (grid[:, 1:] % m).any():
        raise InputError(f"{what}: every (t, h, w) must be positive with h and w multiples of "
                         f"spatial_merge_size={m}, got {grid.tolist()}")
    return grid.astype(np.int64)


def patch_layout(grid_thw, cfg: VLConfig, pad_to: int | None = None) -> PatchLayout:
    """The per-patch metadata of these grids (numpy), patches in the processor's merge-block
    order; `pad_to` appends padding patches (own frame id -1, zero weights) up to that count."""
    grid = check_grids(grid_thw, cfg)
    side, m = int(round(cfg.num_position_embeddings ** 0.5)), cfg.spatial_merge_size
    idx, wts, rot, frame = [], [], [], []
    frames = 0
    for t, h, w in grid.tolist():
        within = np.arange(h * w)
        blocks_w = w // m
        row = (within // (m * m * blocks_w)) * m + (within // m) % m
        col = ((within // (m * m)) % blocks_w) * m + within % m
        (r_taps, r_w), (c_taps, c_w) = _axis_taps(row, h, side), _axis_taps(col, w, side)
        idx.append(np.tile((r_taps[:, :, None] * side + c_taps[:, None, :]).reshape(-1, 4), (t, 1)))
        wts.append(np.tile((r_w[:, :, None] * c_w[:, None, :]).reshape(-1, 4), (t, 1)))
        rot.append(np.tile(np.stack([row, col], -1), (t, 1)))
        frame.append(np.repeat(np.arange(frames, frames + t), h * w))
        frames += t
    n = int(sum(len(f) for f in frame))
    pad = 0 if pad_to is None else pad_to - n
    if pad < 0:
        raise InputError(f"pad_to={pad_to} is below the {n} patches of these grids")
    return PatchLayout(
        table_idx=np.concatenate(idx + [np.zeros((pad, 4), np.int64)]).astype(np.int32),
        table_w=np.concatenate(wts + [np.zeros((pad, 4), np.float32)]).astype(np.float32),
        rot_pos=np.concatenate(rot + [np.zeros((pad, 2), np.int64)]).astype(np.int32),
        frame=np.concatenate(frame + [np.full((pad,), -1, np.int64)]).astype(np.int32))


def _axis_taps(pos: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps (floor, floor+1, clamped) into a `side`-long table for positions on an axis
    of `size` (align_corners=True), with their weights; float32 arithmetic as transformers'."""
    src = pos.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)), 0, None)
    return taps, weights.astype(np.float32)


def merged_counts(grid_thw, cfg: VLConfig) -> np.ndarray:
    """Text tokens (merged rows) of each image or video."""
    grid = check_grids(grid_thw, cfg)
    return grid.prod(-1) // cfg.merge_unit
