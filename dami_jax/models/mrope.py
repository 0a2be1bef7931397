"""Qwen3-VL's M-RoPE positions, computed on the host as transformers' `get_rope_index`.

Each token gets a (T, H, W) position. Text counts up on all three axes. An image
(or one video frame) whose merged grid is (t, h, w) and that starts at position s
gets (s + t', s + row, s + col) for its tokens in order, and the text after it
resumes at s + max(h, w), not at s + t·h·w: positions advance by the image's
extent, not its token count. Padding (mask 0) is skipped and gets position 0.

`delta = max position + 1 − real tokens` per row: a decoded token's position is
its text position (real tokens before it) plus the delta, on all three axes, so
the first decoded token sits at max position + 1.

Placeholders: `image_token_id` / `video_token_id` tokens, each run of them filled
by the next grids of that kind in order (the processor puts <vision_start> /
<vision_end> around each image and each video frame); a video of t temporal
patches counts as t frames of one temporal patch each, as transformers splits it.
"""

from __future__ import annotations

import numpy as np

from dami_jax.errors import InputError
from dami_jax.models.vision import check_grids
from dami_jax.vl_config import VLConfig


def frame_grids(video_grid_thw, cfg: VLConfig) -> np.ndarray:
    """Video grids split into one (1, h, w) grid per temporal patch."""
    grid = check_grids(video_grid_thw, cfg, "video_grid_thw")
    return np.repeat(np.concatenate([np.ones_like(grid[:, :1]), grid[:, 1:]], 1), grid[:, 0], axis=0)


def _runs(types: np.ndarray):
    """(type, start, stop) of each run of equal values."""
    edges = np.flatnonzero(np.diff(types)) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [len(types)]])
    return [(int(types[a]), int(a), int(b)) for a, b in zip(starts, stops)]


def rope_index(tokens_bt, mask_bt, cfg: VLConfig, image_grid_thw=None, video_grid_thw=None):
    """(positions (3, B, T) int32, deltas (B,) int32) for a left- or right-padded batch."""
    tokens = np.asarray(tokens_bt)
    mask = np.ones(tokens.shape, bool) if mask_bt is None else np.asarray(mask_bt).astype(bool)
    m = cfg.spatial_merge_size
    grids = {1: [] if image_grid_thw is None else check_grids(image_grid_thw, cfg).tolist(),
             2: [] if video_grid_thw is None else frame_grids(video_grid_thw, cfg).tolist()}
    names = {1: "image", 2: "video"}
    used = {1: 0, 2: 0}
    positions = np.zeros((3, *tokens.shape), np.int64)
    deltas = np.zeros((tokens.shape[0],), np.int64)
    for b in range(tokens.shape[0]):
        real = tokens[b][mask[b]]
        types = np.where(real == cfg.image_token_id, 1, np.where(real == cfg.video_token_id, 2, 0))
        pos_3n = np.zeros((3, len(real)), np.int64)
        current = 0
        for kind, start, stop in _runs(types):
            if kind == 0:
                pos_3n[:, start:stop] = current + np.arange(stop - start)
                current += stop - start
                continue
            at = start
            while at < stop:  # the run holds one or more whole images / frames
                if used[kind] == len(grids[kind]):
                    raise InputError(f"row {b}: more {names[kind]} placeholder tokens than the "
                                     f"{len(grids[kind])} {names[kind]} grid(s) describe")
                t, h, w = grids[kind][used[kind]]
                used[kind] += 1
                t_i, h_i, w_i = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m), indexing="ij")
                count = t_i.size
                if at + count > stop:
                    raise InputError(f"row {b}: a run of {stop - start} {names[kind]} placeholder tokens does not "
                                     f"match the grids ({names[kind]} {used[kind] - 1} needs {count})")
                pos_3n[:, at: at + count] = current + np.stack([t_i.ravel(), h_i.ravel(), w_i.ravel()])
                current += max(h, w) // m
                at += count
        positions[:, b, mask[b]] = pos_3n
        deltas[b] = pos_3n.max() + 1 - len(real) if len(real) else 0
    for kind in (1, 2):
        if used[kind] != len(grids[kind]):
            raise InputError(f"{len(grids[kind])} {names[kind]} grid(s) given but the tokens hold placeholders "
                             f"for {used[kind]}")
    return positions.astype(np.int32), deltas.astype(np.int32)
