"""Orbax save/restore of converted params, so runs skip HF conversion at launch.

A converted directory holds `config.json` (the HF config), `dami_converted.json`
(a marker with the dtype and source) and `params/` (an Orbax checkpoint),
plus the source's tokenizer files. Restoring places every leaf directly with
its target sharding.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dami_jax.checkpoint.safetensors_io import CheckpointError
from dami_jax.checkpoint.tokenizer_files import copy_tokenizer_files
from dami_jax.config import GenerationIds, ModelConfig
from dami_jax.models import qwen3
from dami_jax.models.sharding import ShardingConfig, param_shardings

MARKER = "dami_converted.json"
# Version of the params layout (see models/qwen3.py). 2: dense kernels (out, in).
FORMAT = 2


def is_converted(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MARKER))


def _stringify(tree):
    """Orbax stores dict keys as strings; layer indices become '0', '1', ..."""
    return {str(k): _stringify(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _restore_keys(tree, like):
    return {k: (_restore_keys(tree[str(k)], v) if isinstance(v, dict) else tree[str(k)]) for k, v in like.items()}


def save_params(cfg: ModelConfig, params: dict, out_dir: str | os.PathLike, source: str | None = None) -> str:
    """Write a converted checkpoint (Orbax writes atomically: temp dir, then rename)."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    dtype = str(jax.tree.leaves(params)[0].dtype)
    target = os.path.join(out_dir, "params")
    if os.path.exists(target):
        shutil.rmtree(target)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, _stringify(params))
        ckptr.wait_until_finished()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        ids = GenerationIds.from_hf(source) if source and os.path.isdir(source) else None
        json.dump(cfg.to_hf_dict(dtype=dtype, generation_ids=ids), f, indent=2)
    if source and os.path.isdir(source):
        copy_tokenizer_files(source, out_dir)
    with open(os.path.join(out_dir, MARKER), "w") as f:  # written last: marks the directory complete
        json.dump({"format": FORMAT, "dtype": dtype, "source": source}, f)
    return out_dir


def restore_params(directory: str, dtype=None, mesh=None, rules: ShardingConfig | None = None) -> dict:
    """Restore params onto `mesh` with their shardings (or the default device), cast to `dtype`."""
    with open(os.path.join(directory, MARKER)) as f:
        marker = json.load(f)
    if marker.get("format") != FORMAT:
        raise CheckpointError(f"{directory} was converted by an older dami_jax (params format "
                              f"{marker.get('format')}, this version reads {FORMAT}); convert it again with "
                              f"`dami convert SRC {directory}`")
    saved_dtype = marker["dtype"]
    cfg = ModelConfig.from_hf(directory)
    abstract = qwen3.abstract_params(cfg, jnp.dtype(saved_dtype))
    if mesh is not None:
        shardings = param_shardings(abstract, mesh, rules)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.join(directory, "params"), _stringify(target))
    params = _restore_keys(restored, abstract)
    if dtype is not None and jnp.dtype(dtype) != jnp.dtype(saved_dtype):
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    return params
