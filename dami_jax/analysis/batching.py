"""Token rows to padded, sharded device batches, for the analyses' forward passes.

Rows are left-padded to a multiple of WIDTH_STEP tokens (few shapes, few compiles) and a
batch is filled up to a bucket of rows that the mesh's batch axes divide, with
copies of its last row (their results are dropped). Under a mesh the batch is
placed on the data axes, as the Pref features are (pref/features.py); the
params keep the layout the pair was loaded with.
"""

from __future__ import annotations

from typing import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding

from dami_jax.generate.decode import bucket_length, left_pad
from dami_jax.models.sharding import batch_sharding

# Widths in steps of 32, not powers of two: a full forward pass costs its padding (a toy thinking
# trace of ~80 tokens pads to 96, not 128), while the shapes stay few.
WIDTH_STEP = 32


def mesh_of(params):
    """The mesh the params are laid out on, None for params on one device."""
    sharding = jax.tree.leaves(params)[0].sharding
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def padded_batches(rows: list[list[int]], batch: int, context: int, mesh=None,
                   columns: tuple[list[list], ...] = ()) -> Iterator[tuple[int, list[jax.Array]]]:
    """(count, [tokens_bt, mask_bt, *columns_bt]) per batch of `batch` rows: left-padded token ids
    and their 0/1 mask, and each extra column (per-row lists as long as the rows, e.g. targets)
    padded alike. `count` is the number of real rows at the top of the batch."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("padded_batches needs a non-empty list of non-empty rows")
    shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
    for start in range(0, len(rows), batch):
        count = min(batch, len(rows) - start)
        size = -(-min(bucket_length(count, batch), batch) // shards) * shards

        def fill(col):
            part = list(col[start: start + count])
            return part + [part[-1]] * (size - count)

        width = min(-(-max(len(r) for r in rows[start: start + count]) // WIDTH_STEP) * WIDTH_STEP, context)
        tokens, mask = left_pad(fill(rows), width)
        arrays = [tokens, mask] + [left_pad(fill(c), width)[0] for c in columns]
        if mesh is not None:
            arrays = [jax.device_put(a, batch_sharding(mesh, a.ndim)) for a in arrays]
        yield count, [jax.numpy.asarray(a) for a in arrays]
