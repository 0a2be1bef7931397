"""Decode attention over the KV cache: the operand order of its two dots on XLA:CPU.

dami_jax's cache holds keys (B·K, S, H) and values (B·K, H, S) (models/kv_cache.py).
One decode step's attention per layer is two batched products over B·K, with only
G = heads / kv_heads query rows against S cache slots. Timed at decode shapes:

- "query first" (the reference here, dami_jax's code until 2026-11-27):
  q (G, H) x k (S, H)ᵀ -> scores (G, S), masked softmax, p (G, S) x v (H, S)ᵀ -> (G, H);
- `dami_jax.models.attention.attend_cpu`: k (S, H) x q (G, H)ᵀ -> (S, G), an optimization barrier,
  the small transpose to (G, S), masked softmax, v (H, S) x p (G, S)ᵀ -> (H, G).

Same math, float32; outputs are checked equal. Also timed: one plain read of the keys
(the bandwidth floor of the first dot).

    python benchmarks/attention_dots.py --json benchmarks/results/attention_dots_cpu.json
"""

from __future__ import annotations

import argparse
import sys

import _common

# (name, B, kv heads K, query rows per kv head G, cache slots S, head dim H)
SHAPES = [
    ("toy rollouts", 1024, 2, 2, 112, 32),
    ("toy rollouts", 2048, 2, 2, 112, 32),
    ("qwen3-0.6b b1", 1, 8, 2, 144, 128),
    ("qwen3-0.6b b16", 16, 8, 2, 144, 128),
    ("qwen3-0.6b b16", 16, 8, 2, 1024, 128),
    ("qwen3-4b b16", 16, 8, 4, 1024, 128),
]


def query_first(q, k, v, allowed_bts):
    """(B·K, H, G) like `attend`, with the query rows as each dot's left operand."""
    import jax
    import jax.numpy as jnp

    b = allowed_bts.shape[0]
    scores = jnp.einsum("nqh,nsh->nqs", q, k) * (k.shape[-1] ** -0.5)
    scores = scores.reshape(b, -1, *scores.shape[1:])
    scores = jnp.where(allowed_bts[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).reshape(q.shape[0], -1, k.shape[1])
    return jnp.einsum("nqs,nhs->nqh", probs, v).swapaxes(1, 2)


def main(argv=None) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from dami_jax.models.attention import attend_cpu as attend

    fns = {"query first": jax.jit(query_first), "cache first": jax.jit(attend)}
    read = jax.jit(lambda k: jnp.sum(k, axis=2))
    rows = []
    for name, b, kh, g, s, h in SHAPES:
        print(f"[attention_dots] {name} S={s}", file=sys.stderr, flush=True)
        keys = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(keys[0], (b * kh, g, h), jnp.float32)
        k = jax.random.normal(keys[1], (b * kh, s, h), jnp.float32)
        v = jax.random.normal(keys[2], (b * kh, h, s), jnp.float32)
        allowed = jax.random.uniform(keys[3], (b, 1, s)) < 0.9  # one query token (T = 1)
        inputs = (q, k, v, allowed)
        outs = {o: np.asarray(f(*inputs)) for o, f in fns.items()}
        np.testing.assert_allclose(outs["cache first"], outs["query first"], rtol=1e-4, atol=1e-4)
        # Interleaved repeats, min kept: load changes hit both orders alike.
        best = {o: float("inf") for o in fns}
        for _ in range(args.repeats):
            for o, f in fns.items():
                best[o] = min(best[o], _common.best_time(lambda: f(*inputs).block_until_ready(), 1, warmup=False))
        t_read = _common.best_time(lambda: read(k).block_until_ready(), args.repeats)
        rows.append(dict(shape=name, B=b, K=kh, G=g, S=s, H=h, cache_mb=2 * k.nbytes / 1e6,
                         query_first_ms=1e3 * best["query first"], cache_first_ms=1e3 * best["cache first"],
                         speedup=best["query first"] / best["cache first"], read_keys_ms=1e3 * t_read))
    _common.print_table(
        "Decode attention of one layer (float32): query-first dots vs dami_jax (cache first)",
        ["shape", "B", "K", "G", "S", "H", "K+V MB", "query first ms", "dami_jax ms", "speedup", "read K ms"],
        [[r["shape"], r["B"], r["K"], r["G"], r["S"], r["H"], r["cache_mb"], r["query_first_ms"],
          r["cache_first_ms"], r["speedup"], r["read_keys_ms"]] for r in rows],
        [f"min of {args.repeats} interleaved runs; outputs equal within 1e-4",
         f"load average (1 min): {_common.environment()['loadavg_1m']:.1f} on {_common.environment()['cpu_count']} CPUs"])
    _common.write_json(args.json, {"benchmark": "attention_dots", "args": vars(args),
                                   "environment": _common.environment(), "results": rows})


if __name__ == "__main__":
    main()
