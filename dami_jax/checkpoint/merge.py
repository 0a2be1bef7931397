"""`dami merge`: write Θ(λ) = λ·Θ_T + (1 − λ)·Θ_I as a Hugging Face checkpoint, streaming.

The merge never holds a model in memory. Both checkpoints are memory-mapped;
every output tensor is computed block by block (float32 arithmetic with the
formula of `dami_jax.interpolate`, then cast) and written straight
into its output shard, whose header is known in advance from the input headers.
Input pages are released after each tensor, so the resident set stays near a
few blocks (plus the OS page cache, which the kernel may drop at will).

Elementwise work runs on all cores (NumPy releases the GIL); the next block is
computed while the previous one is written. HF tensor names are mapped to our
param paths through `leaf_table` only to look up the schedule's λ multiplier.

The output directory is built in a temporary sibling and renamed into place, so
a crash never leaves a half-written checkpoint. It holds the safetensors shards
(with an index past `max_shard_bytes`), the config.json of the tokenizer source
(the Thinking model by default) with its dtype updated, that model's tokenizer
and generation files, and `dami_merge.json` recording how it was made.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from dami_jax.checkpoint.hf import (DEFAULT_MAX_SHARD_BYTES, TensorIndex, atomic_replace_dir,
                                    check_no_extra_tensors, get_path, leaf_table, plan_shards,
                                    resolve_model_dir, staging_dir, write_shard_index)
from dami_jax.checkpoint.safetensors_io import CheckpointError, encode_header
from dami_jax.checkpoint.tokenizer_files import copy_tokenizer_files
from dami_jax.config import ModelConfig
from dami_jax.errors import InputError
from dami_jax.interpolate import check_lam
from dami_jax.models import qwen3
from dami_jax.pair import check_same_architecture
from dami_jax.schedule import Schedule

OUT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
              "float16": np.dtype(np.float16)}
BLOCK_ELEMS = 1 << 22  # elements per written block (16 MiB of float32)
CHUNK_ELEMS = 1 << 14  # elements per arithmetic chunk (fits L1/L2 with its temporaries)


@dataclasses.dataclass(frozen=True)
class _Item:
    """One output tensor: its HF name, our leaf path (for the schedule) and its effective λ."""
    name: str
    path: tuple
    shape: tuple[int, ...]
    lam: np.float32
    nbytes: int


# ---------------------------------------------------------------------------
# Public entry

def merge_checkpoints(instruct: str | os.PathLike, thinking: str | os.PathLike, lam: float,
                      out_dir: str | os.PathLike, schedule: Schedule | str | dict | None = None,
                      dtype: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      progress: bool = True, tokenizer_from: str = "thinking",
                      allow_extrapolation: bool = False, threads: int | None = None) -> str:
    """Write the merged checkpoint Θ(λ) of two HF safetensors checkpoints to `out_dir`.

    lam: one λ (0: Instruct, 1: Thinking). schedule: a `Schedule`, a YAML path or
    a dict (per-module/layer multipliers of λ, as in `interpolate`). dtype: the
    output dtype (float32, bfloat16, float16); default the inputs' dtype when
    they share one, else float32. max_shard_bytes: shard size limit (an index
    is written when there is more than one shard). tokenizer_from: "thinking"
    or "instruct": whose config.json, tokenizer and generation files are copied.
    Returns `out_dir`.
    """
    lam32 = check_lam(lam, allow_extrapolation)
    if lam32.ndim != 0:
        raise InputError(f"merge takes one λ, got {lam32.shape[0]} values (use `dami sweep` for a grid)")
    if tokenizer_from not in ("thinking", "instruct"):
        raise InputError(f"tokenizer_from must be 'thinking' or 'instruct', got {tokenizer_from!r}")
    if max_shard_bytes <= 0:
        raise InputError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    dirs = {"instruct": resolve_model_dir(instruct), "thinking": resolve_model_dir(thinking)}
    out_dir = os.fspath(out_dir)
    for role, d in dirs.items():
        _refuse_converted(d, role)
        if os.path.abspath(d) == os.path.abspath(out_dir):
            raise InputError(f"--out {out_dir} is the {role} checkpoint; choose another directory")
    cfg_i, cfg_t = ModelConfig.from_hf(dirs["instruct"]), ModelConfig.from_hf(dirs["thinking"])
    check_same_architecture(cfg_i, cfg_t)
    cfg = cfg_t if tokenizer_from == "thinking" else cfg_i
    schedule = _as_schedule(schedule, cfg.num_layers)

    index_i, index_t = TensorIndex(dirs["instruct"]), TensorIndex(dirs["thinking"])
    try:
        items, in_dtypes = _plan(cfg, index_i, index_t, lam32, schedule, dirs)
        out_dtype = _out_dtype(dtype, in_dtypes)
        items = [dataclasses.replace(it, nbytes=int(np.prod(it.shape, dtype=np.int64)) * out_dtype.itemsize)
                 for it in items]
        tmp = staging_dir(out_dir)
        try:
            metadata = {"format": "pt", "dami_lam": repr(float(lam32))}
            with _Worker(threads) as worker:
                _write_all(tmp, items, index_i, index_t, out_dtype, max_shard_bytes, metadata, worker, progress)
            src = dirs[tokenizer_from]
            _write_config(src, tmp, out_dtype)
            copy_tokenizer_files(src, tmp)
            with open(os.path.join(tmp, "dami_merge.json"), "w") as f:
                json.dump({"instruct": os.fspath(instruct), "thinking": os.fspath(thinking),
                           "lam": float(lam32), "dtype": _dtype_name(out_dtype),
                           "schedule": None if schedule is None else dataclasses.asdict(schedule),
                           "tokenizer_from": tokenizer_from}, f, indent=2)
            atomic_replace_dir(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        index_i.close()
        index_t.close()
    return out_dir


# ---------------------------------------------------------------------------
# Planning: names, shapes, dtypes and λ of every output tensor, checked up front.

def _refuse_converted(directory: str, role: str) -> None:
    from dami_jax.checkpoint import store

    if store.is_converted(directory):
        raise CheckpointError(
            f"{directory} ({role}) is a `dami convert` output; merge streams HF safetensors checkpoints. "
            "Pass the HF source directory, or load both with load_pair and use interpolate + save_hf."
        )


def _as_schedule(schedule, num_layers: int) -> Schedule | None:
    if schedule is None or isinstance(schedule, Schedule):
        if schedule is not None and schedule.num_layers != num_layers:
            raise InputError(f"schedule was built for {schedule.num_layers} layers, the models have {num_layers}")
        return schedule
    if isinstance(schedule, dict):
        return Schedule.from_dict(schedule, num_layers)
    return Schedule.from_yaml(os.fspath(schedule), num_layers)


def _plan(cfg: ModelConfig, index_i: TensorIndex, index_t: TensorIndex, lam32, schedule, dirs):
    table = leaf_table(cfg)
    check_no_extra_tensors(index_i, table, cfg, dirs["instruct"])
    check_no_extra_tensors(index_t, table, cfg, dirs["thinking"])
    abstract = qwen3.abstract_params(cfg)
    items, dtypes = [], set()
    for leaf in table:
        want = get_path(abstract, leaf.path).shape
        per = want[1:] if leaf.stacked else want
        hf_shape = leaf.hf_shape(per)
        scale = np.float32(1.0 if schedule is None else schedule.scale(leaf.path))
        eff = np.float32(np.float32(lam32) * scale)  # the float32 product interpolate computes
        for name in leaf.hf_names:
            for index in (index_i, index_t):
                f = index.file_of(name)
                if f.shape(name) != hf_shape:
                    raise CheckpointError(
                        f"{f.path}: tensor {name!r} has shape {f.shape(name)}, expected {hf_shape} from config.json")
                dt = f.dtype(name)
                if dt.name != "bfloat16" and not np.issubdtype(dt, np.floating):
                    raise CheckpointError(f"{f.path}: tensor {name!r} has dtype {dt}, expected a float type")
                dtypes.add(dt)
            items.append(_Item(name, leaf.path, hf_shape, eff, 0))
    return items, dtypes


def _out_dtype(dtype, in_dtypes) -> np.dtype:
    if dtype is None:
        return next(iter(in_dtypes)) if len(in_dtypes) == 1 else OUT_DTYPES["float32"]
    name = str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
    if name not in OUT_DTYPES:
        raise InputError(f"dtype must be one of {sorted(OUT_DTYPES)}, got {dtype!r}")
    return OUT_DTYPES[name]


def _dtype_name(dt: np.dtype) -> str:
    return "bfloat16" if dt.name == "bfloat16" else str(dt)


# ---------------------------------------------------------------------------
# Writing: shards planned from sizes, headers first, tensors streamed block by block.

def _write_all(tmp, items, index_i, index_t, out_dtype, max_shard_bytes, metadata, worker, progress):
    weight_map, total = {}, 0
    bar = tqdm(total=sum(it.nbytes for it in items), unit="B", unit_scale=True, desc="merging",
               disable=not progress, leave=False)
    with bar:
        for fname, span in plan_shards([it.nbytes for it in items], max_shard_bytes):
            shard = [items[i] for i in span]
            with open(os.path.join(tmp, fname), "wb") as f:
                f.write(encode_header([(it.name, out_dtype, it.shape) for it in shard], metadata))
                for it in shard:
                    fi, ft = index_i.file_of(it.name), index_t.file_of(it.name)
                    worker.tensor(f, fi.get(it.name), ft.get(it.name), it.lam, out_dtype, bar)
                    fi.release(it.name)
                    ft.release(it.name)
                    weight_map[it.name] = fname
                    total += it.nbytes
                worker.flush()  # every block of this shard written before the file closes
    write_shard_index(tmp, weight_map, total)


class _Worker:
    """Computes output blocks on a thread pool; a writer thread overlaps the file writes.

    Two block buffers alternate: block k+1 is computed while block k is written.
    """

    def __init__(self, threads: int | None):
        self.threads = max(1, threads or len(os.sched_getaffinity(0)))
        self._buffers: dict = {}
        self._pending = [None, None]
        self._turn = 0

    def __enter__(self):
        self.pool = ThreadPoolExecutor(self.threads)
        self.writer = ThreadPoolExecutor(1)
        return self

    def __exit__(self, *exc):
        self.flush()
        self.writer.shutdown()
        self.pool.shutdown()

    def _buffer(self, slot: int, dtype: np.dtype) -> np.ndarray:
        key = (slot, dtype)
        if key not in self._buffers:
            self._buffers[key] = np.empty(BLOCK_ELEMS, dtype)
        return self._buffers[key]

    def flush(self):
        for i, fut in enumerate(self._pending):
            if fut is not None:
                fut.result()
                self._pending[i] = None

    def tensor(self, f, a_i: np.ndarray, a_t: np.ndarray, lam: np.float32, out_dtype: np.dtype, bar) -> None:
        """Write lerp(a_i, a_t, lam) cast to out_dtype to `f`, block by block.

        Returns once every block is computed (the inputs may then be released); the
        last block's write may still be in flight until `flush`.
        """
        flat_i, flat_t = a_i.reshape(-1), a_t.reshape(-1)
        size = flat_i.size
        for start in range(0, size, BLOCK_ELEMS):
            stop = min(start + BLOCK_ELEMS, size)
            slot = self._turn
            self._turn ^= 1
            if self._pending[slot] is not None:  # this buffer's previous write must be done
                self._pending[slot].result()
            out = self._buffer(slot, out_dtype)[: stop - start]
            self._compute(out, flat_i[start:stop], flat_t[start:stop], lam)
            self._pending[slot] = self.writer.submit(_write_block, f, out, bar)

    def _compute(self, out, x_i, x_t, lam):
        n = out.size
        parts = min(self.threads, max(1, n // CHUNK_ELEMS))
        bounds = np.linspace(0, n, parts + 1).astype(np.int64)
        if parts == 1:
            _lerp_range(out, x_i, x_t, lam, 0, n)
            return
        futs = [self.pool.submit(_lerp_range, out, x_i, x_t, lam, int(lo), int(hi))
                for lo, hi in zip(bounds[:-1], bounds[1:])]
        for fut in futs:
            fut.result()


def _write_block(f, out: np.ndarray, bar) -> None:
    f.write(out.view(np.uint8).data)
    bar.update(out.nbytes)


_local = threading.local()


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray]:
    buf = getattr(_local, "buf", None)
    if buf is None or buf.shape[1] < n:
        buf = _local.buf = np.empty((2, max(n, CHUNK_ELEMS)), np.float32)
    return buf[0, :n], buf[1, :n]


def _lerp_range(out, x_i, x_t, lam, lo, hi) -> None:
    """out[lo:hi] = cast(λ·t + (1 − λ)·i), computed in float32 as `interpolate` does.

    Within one float32 rounding of `interpolate` (XLA may contract the sum into a
    fused multiply-add, as its CPU backend does; NumPy rounds each product), so
    within one ulp of the output dtype. λ = 0 and λ = 1 copy the endpoint exactly.
    """
    if lam == 0 or lam == 1:
        src = x_i if lam == 0 else x_t
        if src.dtype == out.dtype:
            np.copyto(out[lo:hi], src[lo:hi])
        else:  # through float32, as interpolate casts
            for s in range(lo, hi, CHUNK_ELEMS):
                e = min(s + CHUNK_ELEMS, hi)
                a, _ = _scratch(e - s)
                np.copyto(a, src[s:e], casting="unsafe")
                np.copyto(out[s:e], a, casting="unsafe")
        return
    one_minus = np.float32(1.0) - lam
    direct = out.dtype == np.float32
    for s in range(lo, hi, CHUNK_ELEMS):
        e = min(s + CHUNK_ELEMS, hi)
        a, b = _scratch(e - s)
        if x_t.dtype == np.float32:
            np.multiply(x_t[s:e], lam, out=a)
        else:
            np.copyto(a, x_t[s:e], casting="unsafe")
            a *= lam
        if x_i.dtype == np.float32:
            np.multiply(x_i[s:e], one_minus, out=b)
        else:
            np.copyto(b, x_i[s:e], casting="unsafe")
            b *= one_minus
        if direct:
            np.add(a, b, out=out[s:e])
        else:
            a += b
            np.copyto(out[s:e], a, casting="unsafe")


def _write_config(src: str, tmp: str, out_dtype: np.dtype) -> None:
    """The source config.json as is (every field transformers knows), dtype updated."""
    with open(os.path.join(src, "config.json")) as f:
        raw = json.load(f)
    name = _dtype_name(out_dtype)
    raw["torch_dtype"] = name
    raw["dtype"] = name
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
