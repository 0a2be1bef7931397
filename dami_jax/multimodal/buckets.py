"""Patch-count buckets: the vision tower sees a few fixed shapes, whatever the image sizes.

The processor turns each image into `t·h·w` patch rows (`pixel_values`, one row
of C·T·P·P values per patch) in merge-block order, and `image_grid_thw` holds
each image's (t, h, w) in patches. Image sizes vary, so the row count varies;
jitted on it directly, every new size would compile the tower again.

The contract between the inputs (this package) and the model:

- The inputs hand the model the processor's arrays unchanged, as transformers
  takes them (`pixel_values` (n, D) with `n = sum(t·h·w over image_grid_thw)`,
  the grids as host NumPy arrays); `dj.forward` / `dj.generate` take them so.
- The model pads the patch rows of one tower call (images and videos of the
  batch together) to `patch_bucket(n)` rows: rows `[0, n)` are the real ones,
  `[n, bucket)` zeros. Every bucket is a multiple of merge_size² (4) and so is
  n, so the 2×2 merger's reshape never mixes real and padding rows.
- Per-patch metadata (positions, the resampled position table, attention
  segments, each patch's batch row) is computed on the host from the grids and
  padded to the same bucket, so jit sees only `bucket`-row arrays. Padding rows
  form an attention segment of their own: no real patch attends to them.
- After the merger the first `n / 4` rows are the image tokens, which fill the
  placeholder (`<|image_pad|>`, then `<|video_pad|>`) positions in order; the
  padding's merged rows and deepstack features are dropped.

Text lengths (prompts with their image tokens) are bucketed by the engine as
for any prompt.
"""

from __future__ import annotations

import numpy as np

from dami_jax.errors import InputError

MERGE_UNIT = 4  # spatial_merge_size² patches make one image token (Qwen3-VL: 2×2)


def patch_ladder(smallest: int = 64, largest: int = 1 << 20) -> tuple[int, ...]:
    """Bucket sizes from `smallest` to `largest`: 1× and 1.5× powers of two (at most 1.5× padding).

    Qwen3-VL's processor makes 256 to 65,536 patches per image (65 K to 16.7 M pixels); the
    default ladder holds a tower call of sixteen largest images, and tiny test images."""
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
    """The smallest ladder entry >= n (n: the patch rows of one tower call)."""
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
