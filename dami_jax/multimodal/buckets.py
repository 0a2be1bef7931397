"""Patch-count buckets: the vision tower sees a few fixed shapes, whatever the image sizes.

The processor turns each image into `t·h·w` patch rows (`pixel_values`, one row
of C·T·P·P values per patch) in merge-block order, and `image_grid_thw` holds
each image's (t, h, w) in patches. Image sizes vary, so the row count varies;
jitted on it directly, every new size would compile the tower again.

The contract with the model (`dj.forward` / `dj.generate` and their
`pixel_values` keyword) when rows are padded by `pad_patches`:

- `pixel_values` is `(bucket, D)`: rows `[0, n)` are the processor's rows of
  all images of the batch, in order, and rows `[n, bucket)` are zeros, where
  `n = sum(t·h·w over image_grid_thw)`. `bucket` is the smallest ladder entry
  >= n; every entry is a multiple of merge_size² (4), so the 2×2 merger's
  reshape keeps real and padding blocks apart (n is a multiple of 4 too).
- `image_grid_thw` is unchanged: the real images only, a host (NumPy) array.
  The model derives per-patch metadata from it on the host (positions, the
  resampled position table, attention segments) and pads that metadata to
  `bucket` rows as well, so jit sees only `bucket`-row arrays.
- Padding rows form their own attention segment (`segment_ids` gives them -1):
  no real patch attends to them and whatever they compute is dropped.
- After the merger the tower has `bucket / 4` rows; the first `n / 4` are the
  image tokens, which fill the `<|image_pad|>` positions of `tokens` in order;
  the rest are dropped. Deepstack features are cut the same way.

Videos (`pixel_values_videos`, `video_grid_thw`) are padded alike, separately.
Text lengths (the prompt with its image tokens) are bucketed by the engine as
for any prompt.
"""

from __future__ import annotations

import numpy as np

from dami_jax.errors import InputError

MERGE_UNIT = 4  # spatial_merge_size² patches make one image token (Qwen3-VL: 2×2)


def patch_ladder(smallest: int = 256, largest: int = 65536) -> tuple[int, ...]:
    """Bucket sizes from `smallest` to `largest`: 1× and 1.5× powers of two (at most 1.5× padding).

    The defaults cover Qwen3-VL's processor: 256 patches is its smallest image (65,536 pixels)
    and 65,536 its largest (16.7 M pixels)."""
    if smallest < MERGE_UNIT or smallest % MERGE_UNIT or largest < smallest:
        raise InputError(f"patch_ladder: need {MERGE_UNIT} <= smallest <= largest with smallest a multiple of "
                         f"{MERGE_UNIT}, got smallest={smallest}, largest={largest}")
    sizes, size = [], smallest
    while size < largest:
        sizes += [size, size * 3 // 2]
        size *= 2
    return tuple(s for s in sizes if s < largest and s % MERGE_UNIT == 0) + (largest,)


PATCH_LADDER = patch_ladder()


def check_ladder(ladder) -> tuple[int, ...]:
    ladder = tuple(int(s) for s in ladder)
    if not ladder or list(ladder) != sorted(set(ladder)) or any(s < MERGE_UNIT or s % MERGE_UNIT for s in ladder):
        raise InputError(f"a patch ladder must be increasing multiples of {MERGE_UNIT}, got {ladder}")
    return ladder


def patch_bucket(n: int, ladder=PATCH_LADDER) -> int:
    """The smallest ladder entry >= n (n: patch rows of a batch)."""
    ladder = check_ladder(ladder)
    if n % MERGE_UNIT:
        raise InputError(f"{n} patch rows is not a multiple of {MERGE_UNIT}: not the processor's output")
    for size in ladder:
        if size >= n:
            return size
    raise InputError(f"{n} patch rows exceed the largest bucket ({ladder[-1]}); send fewer or smaller images, "
                     "or lower the processor's max_pixels")


def num_patches(grid_thw) -> int:
    """Patch rows of the images (or videos) a (K, 3) grid describes."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    return int(np.prod(grid, axis=1).sum())


def pad_patches(pixel_values, grid_thw, ladder=PATCH_LADDER) -> np.ndarray:
    """`pixel_values` (n, D) zero-padded to (bucket, D); see the module docstring for the contract."""
    pixels = np.asarray(pixel_values)
    n = num_patches(grid_thw)
    if pixels.ndim != 2 or pixels.shape[0] != n:
        raise InputError(f"pixel_values of shape {pixels.shape} do not match the grid: expected ({n}, D) "
                         f"rows for grid_thw {np.asarray(grid_thw).tolist()}")
    bucket = patch_bucket(n, ladder)
    return np.concatenate([pixels, np.zeros((bucket - n, pixels.shape[1]), pixels.dtype)])


def segment_ids(grid_thw, bucket: int) -> np.ndarray:
    """(bucket,) int32: the attention segment of each patch row. Each temporal frame of each
    image is one segment (Qwen3-VL's tower attends within a frame), numbered in row order;
    padding rows get -1."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    frame_sizes = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    n = int(frame_sizes.sum())
    if bucket < n:
        raise InputError(f"bucket {bucket} is smaller than the {n} patch rows of grid_thw {grid.tolist()}")
    ids = np.repeat(np.arange(len(frame_sizes), dtype=np.int32), frame_sizes)
    return np.concatenate([ids, np.full(bucket - n, -1, np.int32)])
