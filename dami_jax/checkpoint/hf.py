"""Hugging Face safetensors <-> params pytree, through one mapping table.

Each row maps an HF tensor name to a path in our params dict. Our dense
kernels keep HF's (out_features, in_features) element order (the contraction
axis minor, which XLA:CPU multiplies fastest), so most tensors are copied as
is or only reshaped; `split` says how many leading axes of our array form HF's
first dimension:

    ours = hf.reshape(our_shape)                                  (split = r)
    hf   = ours.reshape(prod(our_shape[:r]), prod(our_shape[r:]))

MoE expert kernels are `transposed` ((in, out) per expert, the layout
`ragged_dot` takes) and stacked along a leading expert axis. `split=None`
means the shapes are equal. A row marked `needs` exists only when that option
of the config holds (q/k norms in Qwen3, biases in Qwen2 and Llama), so the
families share one table. The same table drives import (`load_hf`) and
export (`save_hf`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dami_jax.checkpoint import hf_vl
from dami_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from dami_jax.config import GenerationIds, ModelConfig
from dami_jax.models import qwen3
from dami_jax.models.sharding import ShardingConfig, param_shardings


DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class Row:
    hf: str  # with {l} for the layer and {e} for the expert
    ours: tuple[str, ...]  # with "{l}" for the layer
    split: int | None = None  # leading axes of our (per-expert) array that form HF's rows
    transposed: bool = False  # ours is HF's matrix transposed (then reshaped)
    needs: str | None = None  # the ModelConfig option (a bool) this tensor exists under


_ATTN = [
    Row("model.layers.{l}.self_attn.q_proj.weight", ("layers", "{l}", "attn", "q_proj", "kernel"), split=2),
    Row("model.layers.{l}.self_attn.k_proj.weight", ("layers", "{l}", "attn", "k_proj", "kernel"), split=2),
    Row("model.layers.{l}.self_attn.v_proj.weight", ("layers", "{l}", "attn", "v_proj", "kernel"), split=2),
    Row("model.layers.{l}.self_attn.o_proj.weight", ("layers", "{l}", "attn", "o_proj", "kernel")),
    Row("model.layers.{l}.self_attn.q_proj.bias", ("layers", "{l}", "attn", "q_proj", "bias"), needs="qkv_bias"),
    Row("model.layers.{l}.self_attn.k_proj.bias", ("layers", "{l}", "attn", "k_proj", "bias"), needs="qkv_bias"),
    Row("model.layers.{l}.self_attn.v_proj.bias", ("layers", "{l}", "attn", "v_proj", "bias"), needs="qkv_bias"),
    Row("model.layers.{l}.self_attn.o_proj.bias", ("layers", "{l}", "attn", "o_proj", "bias"), needs="o_bias"),
    Row("model.layers.{l}.self_attn.q_norm.weight", ("layers", "{l}", "attn", "q_norm", "scale"), needs="qk_norm"),
    Row("model.layers.{l}.self_attn.k_norm.weight", ("layers", "{l}", "attn", "k_norm", "scale"), needs="qk_norm"),
    Row("model.layers.{l}.input_layernorm.weight", ("layers", "{l}", "input_norm", "scale")),
    Row("model.layers.{l}.post_attention_layernorm.weight", ("layers", "{l}", "post_attn_norm", "scale")),
]
_DENSE_MLP = [
    Row("model.layers.{l}.mlp.gate_proj.weight", ("layers", "{l}", "mlp", "gate_proj", "kernel")),
    Row("model.layers.{l}.mlp.up_proj.weight", ("layers", "{l}", "mlp", "up_proj", "kernel")),
    Row("model.layers.{l}.mlp.down_proj.weight", ("layers", "{l}", "mlp", "down_proj", "kernel")),
    Row("model.layers.{l}.mlp.gate_proj.bias", ("layers", "{l}", "mlp", "gate_proj", "bias"), needs="mlp_bias"),
    Row("model.layers.{l}.mlp.up_proj.bias", ("layers", "{l}", "mlp", "up_proj", "bias"), needs="mlp_bias"),
    Row("model.layers.{l}.mlp.down_proj.bias", ("layers", "{l}", "mlp", "down_proj", "bias"), needs="mlp_bias"),
]
_MOE_MLP = [
    Row("model.layers.{l}.mlp.gate.weight", ("layers", "{l}", "mlp", "router", "kernel")),
    Row("model.layers.{l}.mlp.experts.{e}.gate_proj.weight", ("layers", "{l}", "mlp", "gate_proj"), 1, True),
    Row("model.layers.{l}.mlp.experts.{e}.up_proj.weight", ("layers", "{l}", "mlp", "up_proj"), 1, True),
    Row("model.layers.{l}.mlp.experts.{e}.down_proj.weight", ("layers", "{l}", "mlp", "down_proj"), 1, True),
]
_GLOBAL = [
    Row("model.embed_tokens.weight", ("embed", "embedding")),
    Row("model.norm.weight", ("final_norm", "scale")),
]
_LM_HEAD = Row("lm_head.weight", ("lm_head", "kernel"))


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of our params and the HF tensor(s) it is built from."""
    path: tuple
    hf_names: tuple[str, ...]  # one per expert for stacked expert leaves, else one
    split: int | None
    transposed: bool
    stacked: bool

    def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the HF tensor of one (per-expert) array of our shape."""
        if self.split is None:
            return tuple(ours)
        rows, cols = int(np.prod(ours[: self.split])), int(np.prod(ours[self.split:]))
        return (cols, rows) if self.transposed else (rows, cols)

    def to_ours(self, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return (hf.T if self.transposed else hf).reshape(shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if self.split is None:
            return ours
        m = ours.reshape(int(np.prod(ours.shape[: self.split])), -1)
        return m.T if self.transposed else m

    def read(self, index: "TensorIndex", want: tuple[int, ...], dtype) -> np.ndarray:
        """Our array of shape `want` from the checkpoint."""
        return _read_leaf(index, self, want, dtype)

    def tensors(self, params: dict, np_dtype):
        """(HF name, numpy array) pairs of this leaf of `params`."""
        value = np.asarray(jax.device_get(get_path(params, self.path))).astype(np_dtype, copy=False)
        if self.stacked:
            for e, name in enumerate(self.hf_names):
                yield name, self.to_hf(value[e])
        else:
            yield self.hf_names[0], self.to_hf(value)


def leaf_table(cfg: ModelConfig) -> list[Leaf]:
    """Every leaf of the params pytree for `cfg`, in a stable order."""
    if cfg.vl is not None:  # Qwen3-VL: renamed text leaves, fused experts, the vision tower (hf_vl.py)
        text = leaf_table(dataclasses.replace(cfg, vl=None))
        return ([hf_vl.expert_leaf(leaf.path, leaf.hf_names[0]) if leaf.stacked
                 else dataclasses.replace(leaf, hf_names=tuple(map(hf_vl.text_name, leaf.hf_names)))
                 for leaf in text]
                + [Leaf(path, (name,), None, False, False) for name, path in hf_vl.vision_rows(cfg)])
    leaves = [_leaf(r, None) for r in _GLOBAL]
    for layer in range(cfg.num_layers):
        rows = _ATTN + (_MOE_MLP if cfg.is_moe_layer(layer) else _DENSE_MLP)
        for row in rows:
            if row.needs is None or getattr(cfg, row.needs):
                leaves.append(_leaf(row, layer, cfg.num_experts))
    if not cfg.tie_word_embeddings:
        leaves.append(_leaf(_LM_HEAD, None))
    return leaves


def _leaf(row: Row, layer: int | None, num_experts: int = 0) -> Leaf:
    path = tuple(layer if p == "{l}" else p for p in row.ours)
    if "{e}" in row.hf:
        names = tuple(row.hf.format(l=layer, e=e) for e in range(num_experts))
        return Leaf(path, names, row.split, row.transposed, True)
    return Leaf(path, (row.hf.format(l=layer),), row.split, row.transposed, False)


def get_path(tree, path):
    """The leaf of a nested dict at a tuple of keys (a `Leaf.path`)."""
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------
# Import

class TensorIndex:
    """Which file holds each tensor, for single-file and sharded checkpoints (`close` when done)."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX_FILE)
        single = os.path.join(directory, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                self.where = json.load(f)["weight_map"]
        elif os.path.isfile(single):
            self.where = None
        else:
            _refuse_unsafe(directory)
            raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")
        self._files: dict[str, SafetensorsFile] = {}
        if self.where is None:
            self._open("model.safetensors")
            self.where = {k: "model.safetensors" for k in self._files["model.safetensors"].keys()}

    def _open(self, name: str) -> SafetensorsFile:
        if name not in self._files:
            path = os.path.join(self.directory, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: listed in the index but missing")
            self._files[name] = SafetensorsFile(path)
        return self._files[name]

    def file_of(self, tensor: str) -> SafetensorsFile:
        if tensor not in self.where:
            raise CheckpointError(f"{self.directory}: missing tensor {tensor!r}")
        return self._open(self.where[tensor])

    def close(self):
        for f in self._files.values():
            f.close()


def _refuse_unsafe(directory: str) -> None:
    pickles = [n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise CheckpointError(
            f"{directory}: only pickle checkpoints found ({', '.join(sorted(pickles))}); dami_jax never "
            "unpickles. Convert to safetensors first (e.g. transformers save_pretrained(..., "
            "safe_serialization=True))."
        )


def resolve_model_dir(path_or_id: str | os.PathLike) -> str:
    """A local directory, or a hub id downloaded (safetensors, config and tokenizer only)."""
    path = os.fspath(path_or_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") != 1:
        raise CheckpointError(f"{path}: not a model directory or a hub id 'org/name'")
    from huggingface_hub import snapshot_download

    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])


def load_hf(path: str | os.PathLike, dtype="float32", mesh=None, rules: ShardingConfig | None = None,
            cfg: ModelConfig | None = None, progress: bool = True) -> dict:
    """Load HF safetensors (or a `dami convert` output) into a params pytree of jax.Arrays.

    Each leaf is read from a memory-mapped file, converted, cast to `dtype` and
    placed with its sharding when `mesh` is given (`rules` picks the specs).
    """
    from dami_jax.checkpoint import store

    directory = resolve_model_dir(path)
    if store.is_converted(directory):
        return store.restore_params(directory, dtype=dtype, mesh=mesh, rules=rules)
    cfg = cfg or ModelConfig.from_hf(directory)
    dtype = jnp.dtype(dtype)
    abstract = qwen3.abstract_params(cfg, dtype)
    shardings = param_shardings(abstract, mesh, rules) if mesh is not None else None
    index = TensorIndex(directory)
    table = leaf_table(cfg)
    check_no_extra_tensors(index, table, cfg, directory)
    params: dict = {}
    try:
        for leaf in tqdm(table, desc=f"loading {os.path.basename(directory.rstrip('/'))}",
                         disable=not progress, leave=False):
            want = get_path(abstract, leaf.path).shape
            value = leaf.read(index, want, dtype)
            sharding = None if shardings is None else get_path(shardings, leaf.path)
            _set(params, leaf.path, _place(value, sharding))
    finally:
        index.close()
    return params


def _read_leaf(index: TensorIndex, leaf: Leaf, want: tuple[int, ...], dtype) -> np.ndarray:
    per_expert = want[1:] if leaf.stacked else want
    out = np.empty(want, dtype) if leaf.stacked else None
    for e, name in enumerate(leaf.hf_names):
        f = index.file_of(name)
        raw = f.get(name)
        hf_shape = leaf.hf_shape(per_expert)
        if raw.shape != hf_shape:
            raise CheckpointError(
                f"{f.path}: tensor {name!r} has shape {raw.shape}, expected {hf_shape} from config.json"
            )
        if not np.issubdtype(raw.dtype, np.floating) and raw.dtype.name != "bfloat16":
            raise CheckpointError(f"{f.path}: tensor {name!r} has dtype {raw.dtype}, expected a float type")
        value = np.array(leaf.to_ours(raw, per_expert), dtype=dtype)  # copies off the mmap
        f.release(name)
        if not leaf.stacked:
            return value
        out[e] = value
    return out


def check_no_extra_tensors(index: TensorIndex, table: list[Leaf], cfg: ModelConfig, directory: str) -> None:
    """Refuse a checkpoint holding tensors the config does not describe (a config/weights mismatch)."""
    expected = {n for leaf in table for n in leaf.hf_names}
    # Tied checkpoints sometimes still carry lm_head.weight; it must equal the embedding, so skip it.
    extra = sorted(set(index.where) - expected - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    extra = [n for n in extra if not re.search(r"rotary_emb\.inv_freq$", n)]
    if extra:
        raise CheckpointError(
            f"{directory}: unexpected tensor(s) for this config: {extra[:5]}"
            f"{' …' if len(extra) > 5 else ''} (does config.json match the weights?)"
        )


def _place(value: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jax.device_put(value)
    # Each device reads only its slice: works on multi-host meshes too.
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


# ---------------------------------------------------------------------------
# Export

def save_hf(cfg: ModelConfig, params: dict, out_dir: str | os.PathLike, *,
            dtype: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
            extra_files: dict[str, str] | None = None, generation_ids: GenerationIds | None = None) -> str:
    """Write HF-loadable safetensors (sharded with an index past `max_shard_bytes`) + config.json.

    config.json carries `generation_ids` (default none) as its eos/bos/pad ids, so
    `load_pair` and transformers read back the ones given.

    Written into a temporary sibling directory, then renamed into place, so a
    crash never leaves a half-written checkpoint. `extra_files` maps file names
    to source paths copied alongside (tokenizer files).
    """
    out_dir = os.fspath(out_dir)
    table = leaf_table(cfg)
    np_dtype = np.dtype(jnp.dtype(dtype or get_path(params, table[0].path).dtype))
    tmp = staging_dir(out_dir)
    try:
        _write_shards(tmp, params, table, np_dtype, max_shard_bytes, progress)
        hf_cfg = cfg.to_hf_dict(dtype=str(np_dtype) if np_dtype.name != "bfloat16" else "bfloat16",
                                generation_ids=generation_ids)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, os.path.join(tmp, name))
        atomic_replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def hf_tensors(params: dict, table: list[Leaf], np_dtype):
    """(HF name, numpy array) pairs, one leaf at a time (host memory ~ one leaf)."""
    for leaf in table:
        yield from leaf.tensors(params, np_dtype)


def _write_shards(tmp, params, table, np_dtype, max_shard_bytes, progress) -> None:
    # A stacked expert leaf is written as one HF tensor per expert, all in the leaf's shard.
    sizes = [int(np.prod(get_path(params, leaf.path).shape)) * np_dtype.itemsize for leaf in table]
    weight_map, total = {}, 0
    for fname, span in tqdm(plan_shards(sizes, max_shard_bytes), desc="writing safetensors",
                            disable=not progress, leave=False):
        tensors = list(hf_tensors(params, [table[i] for i in span], np_dtype))
        total += write_safetensors(os.path.join(tmp, fname), tensors)
        weight_map.update({name: fname for name, _ in tensors})
    write_shard_index(tmp, weight_map, total)


def plan_shards(sizes: list[int], max_shard_bytes: int) -> list[tuple[str, range]]:
    """Consecutive tensors (of these byte sizes) grouped into shard files: (file name, positions).

    A shard is closed when the next tensor would take it past `max_shard_bytes`
    (a tensor over the limit gets a shard of its own). The files are named as
    transformers names them: `model.safetensors` alone, else `model-0000k-of-0000n.safetensors`.
    """
    starts, size = [0], 0
    for i, nbytes in enumerate(sizes):
        if i > starts[-1] and size + nbytes > max_shard_bytes:
            starts.append(i)
            size = 0
        size += nbytes
    spans = [range(lo, hi) for lo, hi in zip(starts, starts[1:] + [len(sizes)])]
    n = len(spans)
    return [("model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors", span)
            for k, span in enumerate(spans)]


def write_shard_index(directory: str, weight_map: dict[str, str], total_bytes: int) -> None:
    """The index of a sharded checkpoint (tensor name -> file); a single file needs none."""
    if len(set(weight_map.values())) > 1:
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)


def staging_dir(out_dir: str) -> str:
    """A temporary sibling of out_dir to build it in (renamed into place when complete)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir.rstrip("/")) + "-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the checkpoint should not be
    return tmp


def atomic_replace_dir(tmp: str, out_dir: str) -> None:
    """Move the finished `tmp` (a `staging_dir`) to `out_dir`, replacing what was there."""
    if os.path.lexists(out_dir):
        old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(out_dir) + "-", dir=os.path.dirname(tmp))
        os.rename(out_dir, os.path.join(old, "x"))
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)
