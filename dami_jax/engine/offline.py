"""One batch of prompts through a fresh engine: what `dj.generate`, `generate_pair`, `sweep`
and the thinking-budget baseline run.

The engine is sized for the batch: `max_rows` rows at a time, and a pool holding that
many rows at their longest (prompt + max_new_tokens, within the context), rounded up to a
power of two of pages so that batches of other sizes reuse the compiled programs; pages
are reserved at admission (`reserve=True`): no preemption, so a row's numbers never
depend on what else was running.

`kv_bytes` sizes the pool instead, for real lengths (a 32K budget reserved per row would
hold a handful of rows): rows are admitted by the pages they hold, and the youngest is
preempted and recomputed when the pool runs out. Greedy tokens stay those of an
unpreempted run up to the rounding of a recomputed prefill against decode (exact in
float32 on CPU, tests/test_engine.py).
"""

from __future__ import annotations

import numpy as np

from dami_jax.engine.engine import Engine
from dami_jax.errors import InputError
from dami_jax.generate.decode import GenerateOutput
from dami_jax.generate.sampling import Greedy

MAX_ROWS = 64
PAGE_SIZE = 16


def context_of(cfg, max_cache: int | None) -> int:
    """Tokens one sequence may hold (prompt + generated): max_cache, at most the model's context."""
    if max_cache is not None and max_cache < 2:
        raise InputError(f"max_cache must be >= 2 tokens (a prompt token and a new one), got {max_cache}")
    return cfg.max_position_embeddings if max_cache is None else min(max_cache, cfg.max_position_embeddings)


def sized_engine(model, params, prompts, max_new_tokens, *, max_cache: int | None = None,
                 max_rows: int | None = None, kv_bytes: int | None = None, page_size: int = PAGE_SIZE,
                 max_tokens_per_step: int = 256, probe_tokens: int = 0) -> Engine:
    """An Engine (pair in delta mode, or cfg + params) sized for these prompts (see the module doc).
    probe_tokens: tokens of a probe each row may fork besides its own (early exit: its inducer and
    trial answer); reserved pages then cover that, plus the tail of the row's page it recomputes."""
    cfg = model if params is not None else model.cfg
    context = context_of(cfg, max_cache)
    max_rows = MAX_ROWS if max_rows is None else max_rows
    if max_rows < 1:
        raise InputError(f"max_rows must be >= 1, got {max_rows}")
    limits = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (len(prompts),))
    longest = max(min(len(p) + int(n), context) for p, n in zip(prompts, limits))
    rows = min(len(prompts), max_rows)
    probe_pages = -(-(page_size - 1 + probe_tokens) // page_size) if probe_tokens else 0
    pages = 1 + rows * (-(-longest // page_size) + probe_pages)
    if kv_bytes is None:
        kw = dict(num_pages=1 << (pages - 1).bit_length())
    else:
        kw = dict(kv_bytes=kv_bytes)
    return Engine(model, params, page_size=page_size, max_rows=max_rows, max_tokens_per_step=max_tokens_per_step,
                  max_context=context, reserve=kv_bytes is None, **kw)


def generate(cfg, params, prompts: list[list[int]], max_new_tokens, sampling=Greedy(), seed: int = 0,
             stop_tokens=None, lam=None, max_cache: int | None = None, row_ids=None, *,
             max_rows: int | None = None, kv_bytes: int | None = None, **pixel_inputs) -> GenerateOutput:
    """Generate up to `max_new_tokens` for each prompt (a list of token ids) on one engine
    sized for the batch (`sized_engine`): rows run until they stop, and a row that stops
    early costs what it generated.

    stop_tokens: ids ending a row (one list, or one list per row); default none, so rows
    end at max_new_tokens (to stop at EOS pass `ModelPair.stop_tokens` or
    `GenerationIds.from_hf(model_dir).eos`). lam: one λ per row (or one for all), for
    delta-mode params (DESIGN 2.2). max_cache: tokens one sequence may hold, prompt
    included (default: the model's context); a row that reaches it ends with "length" and
    sets `cache_full`. row_ids: the id seeding each row's sampling (default 0..B-1), so a
    row samples the same tokens whatever batch it is in. max_rows, kv_bytes: see
    `sized_engine`. `generate.decode.generate_lockstep` is the lock-step reference.
    pixel_inputs: Qwen3-VL images / video of the batch, as transformers takes them.
    """
    if not prompts:
        raise InputError("prompts is empty")
    engine = sized_engine(cfg, params, prompts, max_new_tokens, max_cache=max_cache, max_rows=max_rows,
                          kv_bytes=kv_bytes)
    return engine.generate(prompts, max_new_tokens, lam=lam, sampling=sampling, seed=seed,
                           stop_tokens=stop_tokens, row_ids=row_ids,  # None: Engine(cfg, ...) has no stop ids
                           **pixel_inputs)
