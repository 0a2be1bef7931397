"""The engine benchmark's workloads as data and its runners (benchmarks/engine.py times them).

A `Workload` is a list of `Request`s (prompt ids, max_new_tokens, stop ids, λ, the row id
seeding its sampling), the rows decoded at once and, for the engine, its KV pool. A runner
is a callable `runner(workload) -> list of token arrays` (each request's generated tokens,
a stop token included), built once per model; one that cannot serve a workload raises
`Unsupported`. The runners are described in engine.py's docstring.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from typing import Callable

import numpy as np


def log(msg: str) -> None:
    print(f"[engine] {msg}", file=sys.stderr, flush=True)


class Unsupported(Exception):
    """A runner that cannot serve a workload (λ or sampling on the single-model peer, a dense cache
    over the memory budget)."""


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    max_new_tokens: int
    stop_tokens: tuple[int, ...] = ()
    lam: float | None = None  # None: a single model; else a λ of the pair (delta mode)
    row_id: int = 0  # seeds this request's sampling: (seed, row_id, step)


@dataclasses.dataclass(frozen=True)
class Workload:
    requests: tuple[Request, ...]
    rows: int  # rows decoded at once: the lock-step batch, the engine's row cap
    sampling: object = None  # dj.Greedy() when None
    seed: int = 0
    pool_tokens: int | None = None  # engine only: tokens per layer its KV pool holds; None: rows x longest

    def processed_tokens(self, lengths) -> int:
        return int(sum(len(r.prompt) for r in self.requests) + sum(lengths))


Runner = Callable[[Workload], list]


# ---------------------------------------------------------------------------
# Runners.

def kv_bytes_per_token(cfg, itemsize: int) -> int:
    """Keys and values of one token over all layers."""
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize


def memory_budget() -> int:
    """Half the memory a cache would live in: the accelerator's, or on CPU the host's RAM."""
    import jax

    total = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    return (total or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2


def dense_cache_bytes(cfg, chunk, itemsize: int) -> int:
    """The lock-step KV cache for one chunk: rows x (prompt bucket + max_new_tokens, within the context)."""
    from dami_jax.generate.decode import bucket_length

    longest, new = max(len(r.prompt) for r in chunk), max(r.max_new_tokens for r in chunk)
    context = cfg.max_position_embeddings
    slots = min(bucket_length(longest, max(longest, context - new)) + new, context)
    return len(chunk) * slots * kv_bytes_per_token(cfg, itemsize)


def lockstep_runner(cfg, params) -> Runner:
    """The lock-step path (dense cache), `rows` requests at a time, each chunk to its longest.
    Unsupported when a chunk's dense cache would exceed `memory_budget()`."""
    import jax

    import dami_jax as dj
    from dami_jax.generate.decode import generate_lockstep

    itemsize = jax.tree.leaves(params)[0].dtype.itemsize
    budget = memory_budget()

    def run(work: Workload) -> list:
        out = []
        reqs = work.requests
        chunks = [reqs[start: start + work.rows] for start in range(0, len(reqs), work.rows)]
        need = max(dense_cache_bytes(cfg, chunk, itemsize) for chunk in chunks)
        if need > budget:
            raise Unsupported(f"lockstep's dense KV cache needs {need:,} B ({need / 1e9:.1f} GB), over its "
                              f"budget of {budget:,} B ({budget / 1e9:.1f} GB, half the memory)")
        for chunk in chunks:
            lams = [r.lam for r in chunk]
            if any(x is None for x in lams) and any(x is not None for x in lams):
                raise ValueError("a chunk mixes pair (λ) and single-model requests")
            stops = [list(r.stop_tokens) for r in chunk]
            res = generate_lockstep(cfg, params, [list(r.prompt) for r in chunk], max(r.max_new_tokens for r in chunk),
                              sampling=work.sampling or dj.Greedy(), seed=work.seed,
                              stop_tokens=stops if any(stops) else None,
                              lam=None if lams[0] is None else lams, row_ids=[r.row_id for r in chunk])
            out += [toks[: min(n, r.max_new_tokens)] for toks, n, r in zip(res.tokens, res.lengths, chunk)]
        return out

    return run


def engine_runner(cfg, params) -> Runner:
    """dj.Engine: paged KV (16-token pages, a pool of the workload's pool_tokens per layer, by default
    `rows` requests of the longest length; no reserve: rows hold the pages they fill and the youngest is
    preempted if the pool runs out), continuous batching with at most `rows` rows and 256 tokens a step.
    An engine is built once per shape and kept, as a long-running user would (building zeroes the pool:
    0.6 s for 1 GiB here, not a per-request cost), while the kept pools fit in `memory_budget()`; past
    that the oldest are dropped, and a rebuilt engine's pool allocation is timed with its call."""
    import jax

    import dami_jax as dj

    page = 16
    page_bytes = page * kv_bytes_per_token(cfg, jax.tree.leaves(params)[0].dtype.itemsize)
    budget = memory_budget()
    kept: dict[tuple, object] = {}  # (rows, pool pages, longest) -> Engine, oldest first

    def engine(rows: int, pool_pages: int, longest: int):
        key = (rows, pool_pages, longest)
        if key not in kept:
            while kept and (sum(k[1] for k in kept) + pool_pages) * page_bytes > budget:
                log(f"  engine: dropping the kept engine {next(iter(kept))} to fit a pool of {pool_pages} pages")
                del kept[next(iter(kept))]
            kept[key] = dj.Engine(cfg, params, num_pages=pool_pages + 1, page_size=page,  # + the null page
                                  max_rows=rows, max_tokens_per_step=256, max_context=longest)
        return kept[key]

    def run(work: Workload) -> list:
        reqs = work.requests
        longest = max(len(r.prompt) + r.max_new_tokens for r in reqs)
        pool_pages = work.rows * -(-longest // page) if work.pool_tokens is None else -(-work.pool_tokens // page)
        eng = engine(work.rows, pool_pages, longest)
        lams = [r.lam for r in reqs]
        res = eng.generate([list(r.prompt) for r in reqs], [r.max_new_tokens for r in reqs],
                           lam=None if lams[0] is None else lams, sampling=work.sampling or dj.Greedy(),
                           seed=work.seed, stop_tokens=[list(r.stop_tokens) for r in reqs],
                           row_ids=[r.row_id for r in reqs])
        return [toks[:n] for toks, n in zip(res.tokens, res.lengths)]

    return run


def hf_cb_runner(model) -> Runner:
    """transformers' continuous batching: the manager `generate_batch` wraps, with each request's own
    max_new_tokens and stop ids (generate_batch takes one of each for all)."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    def run(work: Workload) -> list:
        if work.sampling is not None or any(r.lam is not None for r in work.requests):
            raise Unsupported("hf_cb runs greedy single-model requests only")
        longest = max(len(r.prompt) + r.max_new_tokens for r in work.requests)
        page = 16
        cb = ContinuousBatchingConfig(page_size=page, num_blocks=work.rows * (-(-longest // page) + 1) + 1,
                                      max_batch_tokens=512, max_requests_per_batch=work.rows)
        gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0,
                               max_new_tokens=max(r.max_new_tokens for r in work.requests))
        results = {}
        with torch.inference_mode(), model.continuous_batching_context_manager(
                generation_config=gen, continuous_batching_config=cb, block=True, timeout=5) as manager:
            for i, r in enumerate(work.requests):
                manager.add_request(list(r.prompt), request_id=f"r{i}", max_new_tokens=r.max_new_tokens,
                                    eos_token_id=list(r.stop_tokens) or -1)
            while len(results) < len(work.requests):
                res = manager.get_result(timeout=1)
                if res is not None and res.is_finished():
                    if res.error is not None:
                        raise RuntimeError(f"hf_cb request {res.request_id} failed: {res.error}")
                    results[res.request_id] = np.asarray(res.generated_tokens, np.int32)
                elif res is None and not manager.is_running():
                    raise RuntimeError("hf_cb generation loop stopped")
        return [results[f"r{i}"] for i in range(len(work.requests))]

    return run


def make_runners(cfg, params, model: str, hf: bool) -> dict:
    import dami_jax as dj
    runners = {"lockstep": lockstep_runner(cfg, params), "engine": engine_runner(cfg, params)}
    if hf and model != "pair":
        from transformers import Qwen3ForCausalLM

        with tempfile.TemporaryDirectory(prefix="dami-bench-engine-") as tmp:
            dj.save_hf(cfg, params, tmp, progress=False)
            hf_model = Qwen3ForCausalLM.from_pretrained(tmp, attn_implementation="sdpa").eval()
        runners["hf_cb"] = hf_cb_runner(hf_model)
    return runners
