"""Interpolation engine: merge bandwidth, delta-vs-merged decode, vmapped λ sweep.

Random params of a Qwen3 shape (default Qwen3-0.6B: 28 layers, hidden 1024,
intermediate 3072, 16/8 heads, head_dim 128, vocab 151936, tied), float32 (--dtype), one
process; every ratio's reference is measured in the same run.

(a) Merge bandwidth. Bytes moved per merge = 3 x weight bytes (read Θ_I, read
    Θ_T, write Θ(λ)); GB/s = that / best time. Reference: a multi-threaded copy
    of a 1 GiB float32 array into a preallocated one (one thread per core, NumPy
    copyto; and XLA's copy into a donated buffer), counted as read + write; the
    best of both, measured before and after, is the "copy" bandwidth. Rows:
      interpolate (library)   `dj.interpolate(Θ_I, Θ_T, λ)` as shipped: fresh output
                              buffers every call;
      interpolate into buffer `dj.interpolate(Θ_I, Θ_T, λ, out=Θ(λ)_prev)`: the
                              previous Θ(λ)'s buffers donated and overwritten in
                              place (no fresh pages to fault in);
      numpy kernel            `dami_jax.checkpoint.merge`'s block kernel (threads x cache-sized
                              chunks) into preallocated NumPy arrays, in memory;
      merge_checkpoints       `dami merge` file to file: both checkpoints written
                              with `save_hf` first (page cache warm), output
                              shards written to the same temp dir; peak RSS growth
                              (anonymous memory, the part a merge allocates) noted.
    Target: interpolate >= 0.7 of copy.
(b) Decode step time of delta-mode params (Θ_I, Δ) with per-row λ over merged
    params Θ(λ), `dami_jax.generate.decode.generate_lockstep`, greedy, no stop token,
    batch 1 and 8. Step = (t[N tokens] - t[1 token]) / (N - 1); delta and merged
    runs alternate round by round and the minimum of each is kept. Physical floor
    2x (twice the weight bytes); target <= 2.2x. Merged params are Θ(0.8) =
    Θ_I + 0.8·Δ built from the delta stack (so only Θ_I, Δ and Θ(0.8) are resident;
    the bytes read per step are the same for any λ); delta rows all use λ=0.8 so
    the tokens of both modes can be compared (a sanity note). Rows measure the
    library as shipped ("library"): dami_jax/models/qwen3.py's delta ops contract
    the stacked (Θ_I, Δ) weight in place (no per-step copies of w[0], w[1]) and
    contract o_proj as one (n·h) axis.
(c) A K=11 λ sweep (0, 0.1, ..., 1) on one batch: `dami_jax.pair.sweep` (one
    vmapped program over the stack of 11 merged models) vs 11 sequential runs of
    `generate` on `pair.merged(λ)`; both include building the merged params. On a
    smaller model (default 4 layers of the same width, vocab 16384: 11 stacked
    copies of a 151936 x 1024 embedding would not fit this machine's memory).

Usage:
  nice python benchmarks/interpolate.py                    # full run, writes runs/bench/interpolate.json
  python benchmarks/interpolate.py --preset tiny --sweep-vocab 512 --no-file   # smoke check
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402

GB = 1e9
LAM = 0.8


def log(msg: str) -> None:
    print(f"[interpolate] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# (a) merge bandwidth

def copy_bandwidth(nbytes: int, threads: int, repeats: int) -> dict[str, float]:
    """Read + write bytes/s of a multi-threaded copy into a preallocated array."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = nbytes // 4
    out = {}
    if jax.default_backend() == "cpu":
        src = np.full(n, 1.5, np.float32)
        dst = np.zeros(n, np.float32)  # written once: no page faults inside the timing
        bounds = np.linspace(0, n, threads + 1).astype(np.int64)
        with ThreadPoolExecutor(threads) as pool:
            def np_copy():
                list(pool.map(lambda k: np.copyto(dst[bounds[k]:bounds[k + 1]], src[bounds[k]:bounds[k + 1]]),
                              range(threads)))

            out["numpy_copy_mt"] = 2 * src.nbytes / _common.best_time(np_copy, repeats)
        del src, dst
    x = jax.jit(lambda: jnp.full((n,), 1.5, jnp.float32))()
    copy = jax.jit(lambda buf, x: x * 1.0, donate_argnums=0, keep_unused=True)
    buf = [jnp.zeros_like(x)]

    def xla_copy():
        buf[0] = copy(buf[0], x)
        buf[0].block_until_ready()

    out["xla_copy_donated"] = 2 * x.nbytes / _common.best_time(xla_copy, repeats)
    return out


def bench_merge(cfg, ti, tt, weight_bytes: int, args, threads: int) -> list[dict]:
    import jax
    import numpy as np

    from dami_jax.checkpoint import merge as merge_mod
    from dami_jax.interpolate import interpolate

    rows = []
    moved = 3 * weight_bytes

    log("interpolate (library)")

    def lib():
        out = interpolate(ti, tt, LAM)
        jax.block_until_ready(out)
        del out

    t = _common.best_time(lib, args.repeats)
    rows.append(dict(name="interpolate (library)", time_s=t, bytes_s=moved / t))

    log("interpolate into a donated buffer (library, out=)")
    buf = [interpolate(ti, tt, LAM)]
    want = np.array(jax.tree.leaves(buf[0])[0])  # a copy: buf[0] is donated below

    def donated():
        buf[0] = interpolate(ti, tt, LAM, out=buf[0])
        jax.block_until_ready(buf[0])

    t = _common.best_time(donated, args.repeats)
    same = bool(np.array_equal(np.asarray(jax.tree.leaves(buf[0])[0]), want))
    rows.append(dict(name="interpolate into buffer (library, out=)", time_s=t, bytes_s=moved / t, equal_to_library=same))
    del buf, want
    if jax.default_backend() != "cpu":  # the rest runs on host memory
        return rows

    log("numpy kernel of dami_jax.checkpoint.merge (in memory)")
    li = [np.asarray(x).reshape(-1) for x in jax.tree.leaves(ti)]  # zero-copy views of the CPU buffers
    lt = [np.asarray(x).reshape(-1) for x in jax.tree.leaves(tt)]
    outs = [np.zeros_like(x) for x in li]
    lam32 = np.float32(LAM)
    with merge_mod._Worker(threads) as worker:
        def kernel():
            for o, a, b in zip(outs, li, lt):
                worker._compute(o, a, b, lam32)

        t = _common.best_time(kernel, args.repeats)
    rows.append(dict(name="numpy kernel (merge.py, in memory)", time_s=t, bytes_s=moved / t))
    del outs, li, lt

    if not args.no_file:
        rows.append(bench_merge_files(cfg, ti, tt, weight_bytes, args, threads))
    return rows


def bench_merge_files(cfg, ti, tt, weight_bytes: int, args, threads: int) -> dict:
    import dami_jax as dj
    from dami_jax.checkpoint.merge import merge_checkpoints

    tmp = tempfile.mkdtemp(prefix="dami-bench-merge-", dir=args.tmp)
    try:
        log(f"saving both checkpoints to {tmp} (save_hf)")
        dj.save_hf(cfg, ti, os.path.join(tmp, "instruct"), progress=False)
        dj.save_hf(cfg, tt, os.path.join(tmp, "thinking"), progress=False)
        times, peaks = [], []
        for k in range(args.file_repeats + 1):  # the first run warms the page cache
            log(f"merge_checkpoints run {k}")
            base = _common.proc_status_kb("RssAnon", "VmRSS")
            with _common.RssSampler() as sampler:
                t = time.perf_counter()
                merge_checkpoints(os.path.join(tmp, "instruct"), os.path.join(tmp, "thinking"), LAM,
                                  os.path.join(tmp, "merged"), progress=False, threads=threads)
                times.append(time.perf_counter() - t)
            peaks.append(1024 * (sampler.peak["RssAnon"] - base["RssAnon"]))
        t = min(times[1:]) if len(times) > 1 else times[0]
        return dict(name="merge_checkpoints (file to file)", time_s=t, bytes_s=3 * weight_bytes / t,
                    all_times_s=times, peak_anon_growth_bytes=max(peaks))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# (b) delta vs merged decode

def bench_decode(cfg, delta, merged, args, label: str) -> list[dict]:
    import numpy as np

    from dami_jax.generate.decode import generate_lockstep as generate

    rng = np.random.default_rng(0)
    rows = []
    n = args.new_tokens
    for b in args.batches:
        prompts = rng.integers(0, cfg.vocab_size, (b, args.prompt_len)).tolist()
        lam = np.full((b,), LAM, np.float32)
        runs = {"merged": lambda k: generate(cfg, merged, prompts, k, stop_tokens=[]),
                "delta": lambda k: generate(cfg, delta, prompts, k, stop_tokens=[], lam=lam)}
        times = {m: {n: [], 1: []} for m in runs}
        tokens = {}
        for m, run in runs.items():
            log(f"{label}: compile + warm-up {m}, batch {b}")
            t0 = time.perf_counter()
            run(n)
            run(1)
            log(f"  {time.perf_counter() - t0:.1f} s")
        for r in range(args.decode_repeats):
            for m, run in runs.items():  # alternate modes round by round
                for k in (n, 1):
                    t = time.perf_counter()
                    out = run(k)
                    times[m][k].append(time.perf_counter() - t)
                    if k == n:
                        tokens[m] = out.tokens
            log(f"  round {r}: " + ", ".join(
                f"{m} {1e3 * (min(times[m][n]) - min(times[m][1])) / (n - 1):.0f} ms/step" for m in runs))
        step = {m: (min(times[m][n]) - min(times[m][1])) / (n - 1) for m in runs}
        agree = float((tokens["delta"] == tokens["merged"]).mean())
        rows.append(dict(label=label, batch=b, merged_step_s=step["merged"], delta_step_s=step["delta"],
                         ratio=step["delta"] / step["merged"], token_agreement=agree, times=times))
    return rows


def merged_from_delta(delta):
    """Θ(0.8) = Θ_I + 0.8·Δ from the delta stack (Θ_I and Θ_T need not stay resident)."""
    import jax
    import jax.numpy as jnp

    merged = jax.jit(lambda d: jax.tree.map(lambda x: (x[0] + jnp.float32(LAM) * x[1]).astype(x.dtype), d))(delta)
    jax.block_until_ready(merged)
    return merged


# ---------------------------------------------------------------------------
# (c) vmapped sweep vs sequential merged runs

def bench_sweep(args) -> dict:
    import jax
    import numpy as np

    import dami_jax as dj
    from dami_jax.pair import ModelPair, sweep

    base = dict(_common.PRESETS[args.preset])
    base.update(num_layers=args.sweep_layers, vocab_size=args.sweep_vocab)
    cfg = dj.ModelConfig(**base, max_position_embeddings=4096)
    ti, tt = dj.init_params(cfg, 0, args.dtype), dj.init_params(cfg, 1, args.dtype)
    pair = ModelPair(cfg, ti, tt)
    lams = np.linspace(0, 1, args.sweep_k).astype(np.float32)
    prompts = np.random.default_rng(1).integers(0, cfg.vocab_size, (args.sweep_batch, args.prompt_len)).tolist()
    n = args.sweep_tokens

    def vmapped():
        return [o.tokens for o in sweep(pair, prompts, lams, n, stop_tokens=[])]

    def sequential():
        return [dj.generate(cfg, pair.merged(float(lam)), prompts, n, stop_tokens=[]).tokens for lam in lams]

    log(f"(c) sweep K={len(lams)} on {args.sweep_layers} layers, vocab {args.sweep_vocab}: warm-up")
    tok_v, tok_s = vmapped(), sequential()
    tv, ts = [], []
    for r in range(args.repeats):
        t = time.perf_counter()
        vmapped()
        tv.append(time.perf_counter() - t)
        t = time.perf_counter()
        sequential()
        ts.append(time.perf_counter() - t)
        log(f"  round {r}: vmapped {tv[-1]:.2f} s, sequential {ts[-1]:.2f} s")
    agree = float(np.mean([np.mean(a == b) for a, b in zip(tok_v, tok_s)]))
    wb = sum(x.nbytes for x in jax.tree.leaves(ti))
    return dict(k=len(lams), layers=args.sweep_layers, vocab=args.sweep_vocab, batch=args.sweep_batch,
                new_tokens=n, weight_bytes=wb, vmapped_s=min(tv), sequential_s=min(ts),
                speedup=min(ts) / min(tv), token_agreement=agree)


# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen3-0.6b", choices=sorted(_common.PRESETS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="params of both models")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of (a) and (c) (min kept)")
    ap.add_argument("--file-repeats", type=int, default=1, help="timed merge_checkpoints runs after one warm-up")
    ap.add_argument("--copy-bytes", type=float, default=2**30, help="size of the copy-bandwidth array")
    ap.add_argument("--no-file", action="store_true", help="skip merge_checkpoints (writes 3 models to --tmp)")
    ap.add_argument("--tmp", default=None, help="directory for the merge_checkpoints files (default $TMPDIR)")
    ap.add_argument("--batch", default="1,8", help="(b) batch sizes")
    ap.add_argument("--new-tokens", type=int, default=8, help="(b) tokens per timed call")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--decode-repeats", type=int, default=3, help="(b) alternating rounds")
    ap.add_argument("--sweep-layers", type=int, default=4)
    ap.add_argument("--sweep-vocab", type=int, default=16384)
    ap.add_argument("--sweep-k", type=int, default=11)
    ap.add_argument("--sweep-batch", type=int, default=4)
    ap.add_argument("--sweep-tokens", type=int, default=16)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c")
    ap.add_argument("--json", default="runs/bench/interpolate.json", help="write results here ('' for none)")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batch.split(",") if b]
    skip = set(filter(None, args.skip.split(",")))
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2")

    import jax

    import dami_jax as dj
    from dami_jax.interpolate import weight_bytes

    threads = len(os.sched_getaffinity(0))
    cfg = _common.model_config(args.preset)
    results: dict = {"merge": [], "decode": [], "sweep": None}

    log(f"{args.preset} {args.dtype} on {jax.default_backend()}, {threads} threads: init params")
    ti, tt = dj.init_params(cfg, 0, args.dtype), dj.init_params(cfg, 1, args.dtype)
    jax.block_until_ready((ti, tt))
    wb = weight_bytes(ti)

    bw: dict[str, float] = {}
    if "a" not in skip:
        log(f"copy bandwidth ({args.copy_bytes / 2**30:.2f} GiB, {threads} threads)")
        bw = copy_bandwidth(int(args.copy_bytes), threads, args.repeats)
        results["merge"] = bench_merge(cfg, ti, tt, wb, args, threads)
        log("copy bandwidth again")
        for k, v in copy_bandwidth(int(args.copy_bytes), threads, args.repeats).items():
            bw[k] = max(bw[k], v)
    copy_bw = max(bw.values()) if bw else None

    if "c" not in skip:
        results["sweep"] = bench_sweep(args)

    if "b" not in skip:
        log("(b) delta params and Θ(0.8)")
        from dami_jax.interpolate import delta_params

        delta = delta_params(ti, tt)  # peak: Θ_I, Θ_T and the (Θ_I, Δ) stack = 4 model copies
        jax.block_until_ready(delta)
        del ti, tt
        merged = merged_from_delta(delta)
        results["decode"] = bench_decode(cfg, delta, merged, args, "library")

    columns = ["measurement", "time", "GB/s", "ratio", "target"]
    rows = []
    if bw:
        rows.append(["(a) copy, multi-threaded (reference)", None, copy_bw / GB, 1.0, None])
    for r in results["merge"]:
        r["copy_fraction"] = r["bytes_s"] / copy_bw
        rows.append([f"(a) {r['name']}", f"{r['time_s']:.3g} s", r["bytes_s"] / GB, r["copy_fraction"],
                     ">= 0.7 of copy" if r["name"].startswith("interpolate") else None])
    for r in results["decode"]:
        rows.append([f"(b) merged decode step, batch {r['batch']} ({r['label']})",
                     f"{1e3 * r['merged_step_s']:.3g} ms", wb / r["merged_step_s"] / GB, 1.0, None])
        rows.append([f"(b) delta decode step, batch {r['batch']} ({r['label']})",
                     f"{1e3 * r['delta_step_s']:.3g} ms", 2 * wb / r["delta_step_s"] / GB, r["ratio"],
                     "<= 2.2x merged"])
    s = results["sweep"]
    if s:
        rows.append([f"(c) {s['k']} sequential merged runs", f"{s['sequential_s']:.3g} s", None, 1.0, None])
        rows.append([f"(c) one vmapped sweep, K={s['k']}", f"{s['vmapped_s']:.3g} s", None, s["speedup"],
                     "speed-up"])

    notes = [f"weights: {wb / 1e9:.3f} GB per model ({args.preset}, {args.dtype}); a merge moves 3x that"]
    if bw:
        notes.append("copy bandwidth (read + write): " + ", ".join(f"{k} {v / GB:.1f} GB/s" for k, v in bw.items()))
    for r in results["merge"]:
        if "peak_anon_growth_bytes" in r:
            notes.append(f"merge_checkpoints: peak anonymous RSS growth {r['peak_anon_growth_bytes'] / 2**20:.0f} MiB "
                         f"(one model: {wb / 2**20:.0f} MiB); runs {', '.join(f'{t:.2f}' for t in r['all_times_s'])} s "
                         "(first: page cache warm-up)")
        if "equal_to_library" in r:
            notes.append(f"interpolate into buffer: result equal to the library's: {r['equal_to_library']}")
    if results["decode"]:
        notes.append(f"(b) GB/s column: weight bytes read per step / step time (delta reads 2x); "
                     f"{args.new_tokens} tokens per timed call, prompt {args.prompt_len}, "
                     f"min of {args.decode_repeats} alternating rounds")
        for r in results["decode"]:
            notes.append(f"(b) {r['label']} batch {r['batch']}: delta vs merged tokens {r['token_agreement']:.0%} equal")
    if s:
        notes.append(f"(c) model: {s['layers']} layers of {args.preset} width, vocab {s['vocab']} "
                     f"({s['weight_bytes'] / 1e9:.2f} GB per model); batch {s['batch']}, {s['new_tokens']} tokens, "
                     f"merged params built inside both timings; tokens equal: {s['token_agreement']:.0%}")
    env = _common.environment()
    notes.append(f"machine: {env['cpu_model']}, {threads} cores, load average {env['loadavg_1m']:.1f} at the end")
    _common.print_table(f"Interpolation engine: {args.preset} {args.dtype} ({jax.default_backend()})", columns, rows, notes)
    _common.write_json(args.json or None, {
        "benchmark": "interpolate", "args": vars(args), "environment": env,
        "config": dataclasses.asdict(cfg), "weight_bytes": wb, "copy_bandwidth_bytes_s": bw, **results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
