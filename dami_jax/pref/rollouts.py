"""DAMI-Pref step 1 (DESIGN 1.3): n sampled answers per (prompt, λ) on a grid, cached as JSONL.

    ro = collect_rollouts(pair, prompts, grader, "runs/pref/rollouts.jsonl",
                          lams=DEFAULT_GRID, n_samples=4, sampling=Sample(0.6, 20, 0.95))
    ro.acc()   # (Q, L) share correct      ro.cost()  # (Q, L) mean generated tokens

The file starts with one header line (the pair's fingerprint, the grid, the
sampling settings and a hash of the prompts), then one record per answer:
`{"prompt": i, "lam": λ, "sample": s, "correct": bool, "tokens": n}`. Work runs in
units of (sample s, chunk of prompts), each one `sweep` call over the whole grid
with its own seed, appended and flushed as a whole; a rerun skips the complete
units, so an interrupted collection resumes where it stopped. A file from another
pair or other settings is refused with a `ConfigError`. Under several processes
(dami_jax/distributed.py) each process runs one unit of every round of units, and
process 0 alone reads and appends the file, in the same order as one process.

`grader(prompt_index, token_ids) -> bool` judges one answer (the stop token included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from dami_jax import distributed
from dami_jax.config import ConfigError
from dami_jax.errors import InputError
from dami_jax.generate.sampling import Sample
from dami_jax.pair import sweep
from dami_jax.policies.base import pair_fingerprint
from dami_jax.pref.config import DEFAULT_GRID

VERSION = 1


@dataclasses.dataclass
class Rollouts:
    lams: np.ndarray  # (L,) the grid
    correct: np.ndarray  # (Q, L, S) bool
    tokens: np.ndarray  # (Q, L, S) int32 generated tokens
    header: dict

    def acc(self) -> np.ndarray:
        return self.correct.mean(axis=2)

    def cost(self) -> np.ndarray:
        return self.tokens.mean(axis=2)


def check_grid(lams) -> np.ndarray:
    """The λ grid as float32 (L,): non-empty, 1-D, finite, in [0, 1], no duplicates."""
    arr = np.asarray(lams, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise InputError(f"the λ grid must be a non-empty 1-D list of values in [0, 1], got {list(np.ravel(arr))}")
    bad = arr[~np.isfinite(arr) | (arr < 0) | (arr > 1)]
    if bad.size:
        raise InputError(f"λ grid value {bad[0]} is outside [0, 1] (grid {arr.tolist()})")
    if len(np.unique(arr)) != arr.size:
        raise InputError(f"the λ grid has duplicate values: {arr.tolist()}")
    return arr.astype(np.float32)


def prompts_digest(prompts) -> str:
    return hashlib.sha256(json.dumps([[int(t) for t in p] for p in prompts]).encode()).hexdigest()[:16]


def _header(pair, prompts, lams, n_samples, sampling, max_new_tokens, batch, seed) -> dict:
    return {"dami_rollouts": VERSION, "fingerprint": pair_fingerprint(pair),
            "lams": [round(float(x), 6) for x in lams], "n_samples": int(n_samples),
            "n_prompts": len(prompts), "prompts": prompts_digest(prompts),
            "sampling": dataclasses.asdict(sampling), "max_new_tokens": int(max_new_tokens),
            "batch": int(batch), "seed": int(seed)}


def _read(path: str) -> tuple[dict, list[dict], int]:
    """(header, records, byte length of the complete lines); a torn last line is ignored."""
    with open(path, "rb") as f:
        raw = f.read()
    good = raw[: raw.rfind(b"\n") + 1]
    lines = good.decode().splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
        records = [json.loads(x) for x in lines[1:] if x.strip()]
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not a rollouts JSONL file ({e})") from e
    if not isinstance(header, dict) or header.get("dami_rollouts") != VERSION:
        raise ConfigError(f"{path}: not a rollouts file (first line must be a header with dami_rollouts={VERSION})")
    return header, records, len(good)


def _check_header(path: str, found: dict, want: dict) -> None:
    if found["fingerprint"] != want["fingerprint"]:
        raise ConfigError(f"{path}: rollouts were made for pair {found['fingerprint']}, but this pair is "
                          f"{want['fingerprint']}; use another file (or delete this one) for this pair")
    for key in want:
        if found.get(key) != want[key]:
            raise ConfigError(f"{path}: rollouts were made with {key}={found.get(key)!r}, this run asks "
                              f"{key}={want[key]!r}; use another file or the same settings")


def _to_arrays(header: dict, records: list[dict], path: str) -> Rollouts:
    lams = np.asarray(header["lams"], np.float32)
    q, s = header["n_prompts"], header["n_samples"]
    correct = np.zeros((q, len(lams), s), bool)
    tokens = np.full((q, len(lams), s), -1, np.int32)
    for r in records:
        k = int(np.argmin(np.abs(lams - r["lam"])))
        correct[r["prompt"], k, r["sample"]] = bool(r["correct"])
        tokens[r["prompt"], k, r["sample"]] = int(r["tokens"])
    return Rollouts(lams, correct, tokens, header)


def load_rollouts(path: str | os.PathLike, pair=None) -> Rollouts:
    """A complete rollouts file; with `pair`, refused unless made for that pair."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"no rollouts file at {path}")
    header, records, _ = _read(path)
    if pair is not None and header["fingerprint"] != pair_fingerprint(pair):
        raise ConfigError(f"{path}: rollouts were made for pair {header['fingerprint']}, but this pair is "
                          f"{pair_fingerprint(pair)}")
    ro = _to_arrays(header, records, path)
    missing = int((ro.tokens < 0).sum())
    if missing:
        raise ConfigError(f"{path}: incomplete rollouts ({missing} answers missing); rerun collect_rollouts to finish")
    return ro


def collect_rollouts(pair, prompts: list[list[int]], grader: Callable[[int, list[int]], bool],
                     path: str | os.PathLike, *, lams=None, n_samples: int = 4,
                     sampling: Sample = Sample(0.6, 20, 0.95), max_new_tokens: int = 96,
                     batch: int = 128, seed: int = 0, progress: bool = True, engine: dict | None = None) -> Rollouts:
    """Generate (or finish generating) the rollouts in `path`; returns them complete.

    Each unit (a chunk of `batch` prompts, one sample) runs the whole λ grid as rows of one
    engine in delta mode (`pair.sweep`), sized by `engine` (max_rows, kv_bytes: the pair config's
    `engine_size()`; the answers do not depend on it)."""
    lams = check_grid(DEFAULT_GRID if lams is None else lams)
    if n_samples < 1 or batch < 1:
        raise InputError(f"n_samples and batch must be >= 1, got {n_samples}, {batch}")
    if not isinstance(sampling, Sample):
        raise InputError(f"rollouts need a Sample sampler (n samples per (q, λ)), got {sampling!r}")
    if not prompts:
        raise InputError("collect_rollouts needs at least one prompt")
    path = os.fspath(path)
    want = _header(pair, prompts, lams, n_samples, sampling, max_new_tokens, batch, seed)
    writer = distributed.is_writer()  # under several processes process 0 alone reads and writes the file
    records: list[dict] = distributed.from_writer(lambda: _open_for_append(path, want))
    done = {(r["prompt"], round(float(r["lam"]), 6), r["sample"]) for r in records}
    chunks = [list(range(i, min(i + batch, len(prompts)))) for i in range(0, len(prompts), batch)]
    grid = [round(float(x), 6) for x in lams]
    units = [(s, c) for s in range(n_samples) for c in range(len(chunks))
             if any((i, lam, s) not in done for i in chunks[c] for lam in grid)]

    def run(mine):  # this process's units -> the records of each
        return [_unit_records(pair, prompts, chunks[c], s, grader, lams, grid, sampling, max_new_tokens, seed, c,
                              engine or {}) for s, c in mine]

    rounds = [units[i: i + distributed.process_count()] for i in range(0, len(units), distributed.process_count())]
    with open(path, "a") if writer else contextlib.nullcontext() as f:
        for group in tqdm(rounds, desc="rollouts", disable=not (progress and writer), dynamic_ncols=True):
            for lines in distributed.map_sharded(run, group):  # one unit per process, in unit order
                records += lines
                if writer:
                    f.write("\n".join(json.dumps(r) for r in lines) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
    return _to_arrays(want, records, path)


def _open_for_append(path: str, want: dict) -> list[dict]:
    """The records already in `path` (checked against `want`, a torn last line cut), or a new file."""
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        header, records, good = _read(path)
        _check_header(path, header, want)
        with open(path, "r+b") as f:  # drop a torn last line before appending
            f.truncate(good)
        return records
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(want) + "\n")
    return []


def _unit_records(pair, prompts, chunk, s, grader, lams, grid, sampling, max_new_tokens, seed, c,
                  engine: dict) -> list[dict]:
    """One unit: sample s of the prompts in `chunk` over the whole grid, graded (its seed is its own)."""
    unit_seed = int(np.random.SeedSequence([seed, s, c]).generate_state(1)[0] & 0x7FFFFFFF)
    outs = sweep(pair, [prompts[i] for i in chunk], lams, max_new_tokens, sampling=sampling, seed=unit_seed,
                 **engine)
    return [{"prompt": i, "lam": lam, "sample": s, "correct": bool(grader(i, ids)), "tokens": int(out.lengths[row])}
            for lam, out in zip(grid, outs) for row, (i, ids) in enumerate(zip(chunk, out.token_lists()))]
