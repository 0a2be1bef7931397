"""Compile time of the lock-step generator's programs, unrolled layers vs `scan_layers`, from
abstract params.

No weights are made: params are `qwen3.abstract_params` ShapeDtypeStructs, and
the two programs `generate_lockstep` runs are lowered and compiled exactly as it
builds them (generate/decode.py `_compiled`):
  * prefill: a left-padded prompt bucket into a fresh KV cache, the first token;
  * decode: the jitted while_loop of one-token steps over the cache (the step
    is what XLA compiles; the loop adds a few scalar ops).
For each (program, layers) the time of `jax.jit(...).lower(...)` (tracing, the
JAX side) and of `.compile()` (XLA) is measured once, in this process, with no
persistent compilation cache; the ratio is unrolled / scanned.

Usage:
  python benchmarks/compile.py                       # qwen3-4b bfloat16, batch 1, on this backend
  python benchmarks/compile.py --preset tiny         # smoke check, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ["DAMI_JAX_CACHE"] = "off"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402


def log(msg: str) -> None:
    print(f"[compile] {msg}", file=sys.stderr, flush=True)


def measure(cfg, args) -> list[dict]:
    """Lower and compile generate's prefill, then its decode loop (whose state is the prefill's
    output, read from the lowered prefill: tracing it beforehand would warm the decode's cache)."""
    import jax
    import jax.numpy as jnp

    from dami_jax.generate.decode import _compiled, bucket_length
    from dami_jax.generate.sampling import Greedy
    from dami_jax.models import qwen3

    width = bucket_length(args.prompt_len, cfg.max_position_embeddings)
    prefill, decode = _compiled(cfg, Greedy(), args.new_tokens, width + args.new_tokens, stacked=False)
    params = qwen3.abstract_params(cfg, args.dtype)
    b = args.batch
    tokens = jax.ShapeDtypeStruct((b, width), jnp.int32)
    rest = (jax.ShapeDtypeStruct((b, 1), jnp.int32), jax.random.key(0), jax.ShapeDtypeStruct((b,), jnp.int32))
    out, state = [], None
    for name, fn in (("prefill", prefill), ("decode", decode)):
        fn_args = (params, tokens, tokens, None, *rest) if name == "prefill" else (params, state, None, *rest)
        t0 = time.perf_counter()
        lowered = fn.lower(*fn_args)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        state = lowered.out_info
        out.append({"program": name, "lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0})
        log(f"{name}, {'scanned' if cfg.scan_layers else 'unrolled'} layers: lower {t1 - t0:.1f} s, "
            f"compile {t2 - t1:.1f} s")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen3-4b", choices=sorted(_common.PRESETS))
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--layout", default="auto", choices=["auto", "cpu", "readable"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", default=None, help="default benchmarks/results/compile_<preset>_<backend>.json")
    args = ap.parse_args(argv)

    import jax

    from dami_jax.models.kv_cache import resolve_layout

    load_start = os.getloadavg()[0]
    backend = jax.default_backend()
    base = dataclasses.replace(_common.model_config(args.preset), layout=args.layout)
    results = []
    for scan in (False, True):
        results += [{**r, "scan_layers": scan} for r in measure(dataclasses.replace(base, scan_layers=scan), args)]

    rows, ratios = [], {}
    for name in ("prefill", "decode"):
        unrolled, scanned = (next(r for r in results if r["program"] == name and r["scan_layers"] == s)
                             for s in (False, True))
        ratios[name] = unrolled["total_s"] / scanned["total_s"]
        for r in (unrolled, scanned):
            rows.append([name, "scan" if r["scan_layers"] else "unrolled", r["lower_s"], r["compile_s"],
                         r["total_s"], unrolled["total_s"] / r["total_s"]])
    env = _common.environment()
    layout = resolve_layout(args.layout)
    _common.print_table(
        f"Compile time: {args.preset} {args.dtype}, {base.num_layers} layers, layout {layout}, batch {args.batch}, "
        f"{env['device']} ({backend})",
        ["program", "layers", "lower s", "compile s", "total s", "unrolled / this"], rows,
        [f"prompt bucket for {args.prompt_len} tokens, cache of bucket + {args.new_tokens} slots; abstract params, "
         "no persistent compilation cache; one measurement each",
         f"load average (1 min) at start / end: {load_start:.1f} / {os.getloadavg()[0]:.1f} on "
         f"{os.cpu_count()} CPUs (a shared machine slows both columns alike only roughly)"])
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"compile_{args.preset}_{backend}.json")
    _common.write_json(path, {
        "benchmark": "compile", "args": vars(args), "layout": layout, "environment": env,
        "loadavg_1m_start": load_start, "config": _common.PRESETS[args.preset], "results": results,
        "ratio_unrolled_over_scanned": ratios,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
