"""Decode attention of one layer: today's dense cache vs the paged XLA path (dami_jax.engine).

One decode step (one query per row) of 8 rows, 8 kv heads, GQA 2 (16 query heads), head
dim 128, float32:
- dense: `dami_jax.models.qwen3.attend` over a dense KVCache of 16K slots per row (layouts
  (B·K, S, H) and (B·K, H, S), as models/kv_cache.py holds them), masked to each row's length;
- paged: `dami_jax.engine.paged_attention` (impl="xla") over a pool of 16-token pages, each
  row's pages scattered at random through the pool, reading only the pages a row holds.

Row lengths: ragged (8192, 1024, 512, 512, 256, 256, 128, 128), where paging should win, and
all 8192, where it may lose (it reads half the dense cache, but through a gather). Both
paths run in the same process, interleaved, min of the repeats kept; outputs are checked
equal. (That the cache write stays in place is a test: tests/test_paged_attention.py.)

    python benchmarks/paged_attention.py --json benchmarks/results/paged_attention_cpu.json
"""

from __future__ import annotations

import argparse
import sys

import _common

CASES = {
    "ragged": [8192, 1024, 512, 512, 256, 256, 128, 128],
    "all 8192": [8192] * 8,
}
KV_HEADS, GROUPS, HEAD, SLOTS, PAGE = 8, 2, 128, 16384, 16


def main(argv=None) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dami_jax.engine.paged_attention import paged_attention
    from dami_jax.models.qwen3 import attend

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pages-per-block", type=int, default=8)
    ap.add_argument("--items-per-chunk", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    dense = jax.jit(attend)
    paged = jax.jit(lambda *a: paged_attention(*a, pages_per_block=args.pages_per_block,
                                               items_per_chunk=args.items_per_chunk))
    rng = np.random.default_rng(0)
    b, kh, g, h = 8, KV_HEADS, GROUPS, HEAD
    results = []
    for case, lengths in CASES.items():
        print(f"[paged_attention] {case}", file=sys.stderr, flush=True)
        lengths = np.asarray(lengths)
        q = rng.standard_normal((b, kh * g, h), np.float32)
        keys = [rng.standard_normal((n, kh, h), np.float32) for n in lengths]
        values = [rng.standard_normal((n, kh, h), np.float32) for n in lengths]

        # Dense: slots [0, n) of row b hold its tokens; the rest is zeros, masked.
        k_dense = np.zeros((b, kh, SLOTS, h), np.float32)
        v_dense = np.zeros((b, kh, h, SLOTS), np.float32)
        for i, n in enumerate(lengths):
            k_dense[i, :, :n] = keys[i].transpose(1, 0, 2)
            v_dense[i, :, :, :n] = values[i].transpose(1, 2, 0)
        dense_args = (jnp.asarray(q.reshape(b * kh, g, h)), jnp.asarray(k_dense.reshape(b * kh, SLOTS, h)),
                      jnp.asarray(v_dense.reshape(b * kh, h, SLOTS)),
                      jnp.asarray(np.arange(SLOTS)[None, None, :] < lengths[:, None, None]))
        del k_dense, v_dense

        # Paged: each row's pages at random places in a pool just large enough.
        pages_per_row = -(-lengths // PAGE)
        num_pages = 1 + int(pages_per_row.sum())
        order = 1 + rng.permutation(num_pages - 1)
        page_table = np.zeros((b, SLOTS // PAGE), np.int32)
        k_pool = np.zeros((kh, num_pages, PAGE, h), np.float32)
        v_pool = np.zeros((kh, num_pages, PAGE, h), np.float32)
        start = 0
        for i, n in enumerate(lengths):
            pages = order[start: start + pages_per_row[i]]
            start += pages_per_row[i]
            page_table[i, : len(pages)] = pages
            pos = np.arange(n)
            k_pool[:, pages[pos // PAGE], pos % PAGE] = keys[i].transpose(1, 0, 2)
            v_pool[:, pages[pos // PAGE], pos % PAGE] = values[i].transpose(1, 0, 2)
        paged_args = (jnp.asarray(q), jnp.asarray(k_pool), jnp.asarray(v_pool),
                      jnp.arange(b + 1, dtype=jnp.int32), jnp.asarray(lengths, jnp.int32), jnp.asarray(page_table))
        del k_pool, v_pool

        out_dense = np.asarray(dense(*dense_args)).reshape(b, kh, h, g).transpose(0, 1, 3, 2).reshape(b, kh * g, h)
        out_paged = np.asarray(paged(*paged_args))
        err = float(np.abs(out_dense - out_paged).max())
        assert err < 1e-4, f"{case}: paged and dense attention differ by {err}"
        best = {"dense": float("inf"), "paged": float("inf")}
        for _ in range(args.repeats):  # interleaved: load changes hit both alike
            for name, f, a in (("dense", dense, dense_args), ("paged", paged, paged_args)):
                best[name] = min(best[name], _common.best_time(lambda: f(*a).block_until_ready(), 1,
                                                               warmup=False))
        results.append(dict(case=case, lengths=lengths.tolist(), tokens=int(lengths.sum()),
                            dense_slots=SLOTS, dense_ms=1e3 * best["dense"], paged_ms=1e3 * best["paged"],
                            speedup=best["dense"] / best["paged"], max_abs_diff=err))
        del dense_args, paged_args

    env = _common.environment()
    _common.print_table(
        "Decode attention, one layer (8 rows, 8 kv heads, GQA 2, head 128, float32): dense 16K-slot cache vs paged",
        ["rows", "tokens", "dense ms", "paged ms", "speed-up", "max |diff|"],
        [[r["case"], r["tokens"], r["dense_ms"], r["paged_ms"], r["speedup"], r["max_abs_diff"]] for r in results],
        [f"paged: pages of {PAGE} tokens, {args.pages_per_block} pages per item, {args.items_per_chunk} items per "
         f"loop step; min of {args.repeats} interleaved runs",
         f"load average (1 min): {env['loadavg_1m']:.1f} on {env['cpu_count']} CPUs (shared machine: noisy)"])
    _common.write_json(args.json, {"benchmark": "paged_attention", "args": vars(args), "environment": env,
                                   "results": results})


if __name__ == "__main__":
    main()
