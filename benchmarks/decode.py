"""Decode throughput of `dj.generate` (the engine), the lock-step generator and HF transformers
`generate`, against the roofline.

All implementations run the same random weights (`dj.init_params` in the target
dtype; HF loads them from a `dj.save_hf` copy), the same prompts (one random
prompt of `--prompt-len` tokens per row, no padding), greedy decoding and no stop
token, so every row generates exactly `--new-tokens` tokens. Runners: `lockstep`
(`generate.decode.generate_lockstep`: a dense cache, the reference), `dami_jax`
(`dj.generate`: one `dj.Engine` sized for the batch per call, paged KV, decode bursts of
8 steps per device call) and `hf`.

Method (decode separated from prefill and compilation):
  * warm-up: one call with N = --new-tokens and one with N = 1 (compiles both
    JAX programs; first-call allocations for torch);
  * then --repeats rounds; in each, each implementation in turn makes an N-token
    call and a 1-token call, timed end to end (tokens back on the host). Taking
    turns inside a round exposes both to the same machine load; the minimum of
    each is kept (the machine is shared: the minimum is the least disturbed run);
  * decode step time = (t_N - t_1) / (N - 1): a 1-token call is exactly the
    prefill plus the first sampled token, so the difference is N - 1 decode steps
    (our 1-token call allocates bucket + 1 cache slots instead of bucket + N; the
    prefill's attention over those empty slots is negligible next to its matmuls).
    decode tok/s = batch / step time (tokens across the batch).

Roofline (memory bound decode): a decode step must read every weight once.
Weight bytes = the nbytes of every leaf of the params pytree: all layers, the
final norm and the tied embedding table counted once (it is read in full as the
lm_head; the embedding lookup reads only `batch` rows, not counted). KV-cache
reads are not in the roofline; they are reported (JSON) for our preallocated
cache, which every step reads in full (prompt bucket + N slots).
roofline step time = weight bytes / read bandwidth; fraction = roofline / measured.
Read bandwidth is measured in the same run, before and after decoding (best kept):
  CPU: a >= 1 GiB float32 matrix-vector product by jitted jnp, NumPy (BLAS, all
       threads) and torch.mv; the fastest is the roofline's bandwidth.
  GPU: a jitted full reduction of a large float32 array (read only) and a jitted
       copy (read + write bytes); the fastest, plus the H100 SXM nominal 3.35 TB/s.

Usage:
  python benchmarks/decode.py                                   # qwen3-0.6b, float32, batch 1,16
  python benchmarks/decode.py --preset tiny                     # smoke check, seconds
  python benchmarks/decode.py --preset qwen3-4b --dtype bfloat16 --no-hf   # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch may share the GPU
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402


def log(msg: str) -> None:
    print(f"[decode] {msg}", file=sys.stderr, flush=True)


def time_decode(runners: dict, new_tokens: int, repeats: int, batch: int) -> dict[str, dict]:
    """Times of run(n) for n = new_tokens and n = 1 for each runner (see the module docstring).

    The runners take turns within each round, so a change in the machine's load
    between rounds hits every implementation alike. run(n) returns the tokens.
    """
    out = {}
    for name, run in runners.items():
        t0 = time.perf_counter()
        run(new_tokens)
        run(1)
        out[name] = dict(warmup_s=time.perf_counter() - t0, all_total_s=[], all_prefill_s=[])
    for _ in range(repeats):
        for name, run in runners.items():
            t = time.perf_counter()
            out[name]["tokens"] = run(new_tokens)
            out[name]["all_total_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            run(1)
            out[name]["all_prefill_s"].append(time.perf_counter() - t)
    for name, r in out.items():
        r.update(total_s=min(r["all_total_s"]), prefill_s=min(r["all_prefill_s"]))
        r["step_s"] = (r["total_s"] - r["prefill_s"]) / max(new_tokens - 1, 1)
        log(f"  {name}: warm-up {r['warmup_s']:.1f} s, prefill+1 {r['prefill_s']:.3f} s, "
            f"{1e3 * r['step_s']:.2f} ms/step, {batch / r['step_s']:.1f} tok/s")
    return out


def jax_runner(cfg, params, prompts, lockstep: bool = False):
    """dj.generate (the engine), or the lock-step generator over a dense cache."""
    import dami_jax as dj
    from dami_jax.generate.decode import generate_lockstep

    generate = generate_lockstep if lockstep else dj.generate

    def run(n):
        out = generate(cfg, params, prompts, n, stop_tokens=[])
        if not (out.lengths == n).all():
            raise RuntimeError(f"expected {n} tokens per row, got lengths {out.lengths.tolist()}")
        return out.tokens

    return run


def load_hf_model(ckpt_dir: str, dtype: str, device: str):
    import torch
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(ckpt_dir, dtype=getattr(torch, dtype)).to(device).eval()


def hf_runner(model, prompts, device: str):
    import torch

    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)

    def run(n):
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        out = out[:, ids.shape[1]:].cpu().numpy()  # .cpu() synchronizes a GPU
        if out.shape[1] != n:
            raise RuntimeError(f"HF generated {out.shape[1]} tokens, expected {n}")
        return out

    return run


def agreement(a, b) -> dict:
    """How far greedy tokens of two implementations agree (random weights: near-ties can diverge)."""
    import numpy as np

    same = a == b
    prefix = np.where(same.all(axis=1), a.shape[1], np.argmin(same, axis=1))
    return {"rows_identical": float(same.all(axis=1).mean()), "mean_common_prefix": float(prefix.mean()),
            "token_match": float(same.mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen3-0.6b", choices=sorted(_common.PRESETS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds after the warm-up (min kept)")
    ap.add_argument("--no-hf", action="store_true", help="skip HF transformers (e.g. on a GPU with CPU torch)")
    ap.add_argument("--bw-bytes", type=float, default=None,
                    help="size of the bandwidth probe array (default 1 GiB on CPU, 2 GiB on GPU; "
                         "64 MiB for --preset tiny)")
    ap.add_argument("--layout", default="auto", choices=["auto", "cpu", "readable"],
                    help="the model's execution layout (ModelConfig.layout)")
    ap.add_argument("--scan-layers", action="store_true", help="the layer loop as one lax.scan")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (the step time is a difference against a 1-token run)")
    batches = [int(b) for b in args.batch.split(",") if b]

    import jax

    load_start = os.getloadavg()[0]
    backend = jax.default_backend()
    cfg = dataclasses.replace(_common.model_config(args.preset), layout=args.layout, scan_layers=args.scan_layers)
    bw_bytes = int(args.bw_bytes or (64 * 2**20 if args.preset == "tiny" else
                                     (2**30 if backend == "cpu" else 2 * 2**30)))

    hf_device = None
    if not args.no_hf:
        import torch

        if backend == "cpu":
            hf_device = "cpu"
        elif torch.cuda.is_available():
            hf_device = "cuda"
        else:
            ap.error(f"JAX runs on {backend} but torch has no CUDA: pass --no-hf")

    log(f"{args.preset} {args.dtype} on {backend}: measuring read bandwidth ({bw_bytes / 2**30:.2f} GiB)")
    bw = _common.measure_read_bandwidth(bw_bytes)

    results, weights = run_all(args, cfg, batches, hf_device)
    gc.collect()  # the models are gone: room for the probe's arrays
    log("measuring read bandwidth again")
    for k, v in _common.measure_read_bandwidth(bw_bytes).items():
        bw[k] = max(bw[k], v)
    report(args, backend, results, weights, bw, load_start)
    return 0


def run_all(args, cfg, batches: list[int], hf_device: str | None) -> tuple[list[dict], dict]:
    """Time both implementations at each batch size; returns the rows and the weights' size."""
    import jax
    import numpy as np

    import dami_jax as dj
    from dami_jax.generate.decode import bucket_length

    log("init params")
    params = dj.init_params(cfg, 0, dtype=args.dtype)
    leaves = jax.tree.leaves(params)
    jax.block_until_ready(leaves)
    weights = {"bytes": int(sum(x.nbytes for x in leaves)), "params": int(sum(x.size for x in leaves))}
    cache_slots = bucket_length(args.prompt_len, cfg.max_position_embeddings - 1) + args.new_tokens
    kv_bytes_per_row = 2 * cfg.num_layers * cache_slots * cfg.num_kv_heads * cfg.head_dim * leaves[0].dtype.itemsize
    del leaves

    hf_model = None
    if hf_device:
        with tempfile.TemporaryDirectory(prefix="dami-bench-decode-") as tmp:
            log(f"saving HF copy of the weights to {tmp}")
            dj.save_hf(cfg, params, tmp, progress=False)
            hf_model = load_hf_model(tmp, args.dtype, hf_device)
    rng = np.random.default_rng(0)
    results = []
    for b in batches:
        prompts = rng.integers(0, cfg.vocab_size, (b, args.prompt_len)).tolist()
        runners = {"lockstep": jax_runner(cfg, params, prompts, lockstep=True),
                   "dami_jax": jax_runner(cfg, params, prompts)}
        if hf_model is not None:
            runners["hf"] = hf_runner(hf_model, prompts, hf_device)
        log(f"batch {b}: {', '.join(runners)}")
        timed = time_decode(runners, args.new_tokens, args.repeats, b)
        ours = timed["lockstep"]
        results.append(dict(impl="lockstep", batch=b, kv_bytes_per_step=b * kv_bytes_per_row, **ours))
        results.append(dict(impl="dami_jax", batch=b, agreement=agreement(ours["tokens"], timed["dami_jax"]["tokens"]),
                            **timed["dami_jax"]))
        if "hf" in timed:
            results.append(dict(impl="hf", batch=b, agreement=agreement(ours["tokens"], timed["hf"]["tokens"]),
                                **timed["hf"]))
    for r in results:
        del r["tokens"]
    return results, weights


def report(args, backend: str, results: list[dict], weights: dict, bw: dict, load_start: float) -> None:
    """Ratios (vs HF, vs the roofline) into the rows; print the table; write the JSON."""
    bw_method = max(bw, key=bw.get)
    roofline_step = weights["bytes"] / bw[bw_method]
    nominal = _common.H100_SXM_NOMINAL_BYTES_S if backend == "gpu" else None
    hf_rate = {r["batch"]: r["batch"] / r["step_s"] for r in results if r["impl"] == "hf"}
    lockstep_step = {r["batch"]: r["step_s"] for r in results if r["impl"] == "lockstep"}
    columns = ["impl", "batch", "prefill+1 tok s", "decode ms/step", "decode tok/s", "x HF", "x lockstep",
               "of roofline"]
    columns += ["of nominal"] if nominal else []
    rows = []
    for r in results:
        r["tok_s"] = r["batch"] / r["step_s"]
        r["per_row_tok_s"] = 1.0 / r["step_s"]
        r["vs_hf"] = r["tok_s"] / hf_rate[r["batch"]] if r["batch"] in hf_rate else None
        r["vs_lockstep"] = lockstep_step[r["batch"]] / r["step_s"]
        r["roofline_fraction"] = roofline_step / r["step_s"]
        r["nominal_roofline_fraction"] = weights["bytes"] / nominal / r["step_s"] if nominal else None
        rows.append([r["impl"], r["batch"], r["prefill_s"], 1e3 * r["step_s"], r["tok_s"], r["vs_hf"],
                     r["vs_lockstep"], r["roofline_fraction"]] + ([r["nominal_roofline_fraction"]] if nominal else []))
    notes = [
        f"weights read per step: {weights['bytes'] / 1e9:.3f} GB ({weights['params'] / 1e6:.0f}M params, "
        f"{args.dtype}; all layers + final norm + tied embedding once as lm_head)",
        f"read bandwidth: {bw[bw_method] / 1e9:.1f} GB/s by {bw_method} (best of "
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bw.items()) + " GB/s)",
        f"roofline at batch 1: {1 / roofline_step:.1f} tok/s ({1e3 * roofline_step:.1f} ms/step)"
        + (f"; nominal {nominal / 1e12:.2f} TB/s: {nominal / weights['bytes']:.1f} tok/s" if nominal else ""),
        f"decode step = (t[{args.new_tokens} tok] - t[1 tok]) / {args.new_tokens - 1}, min of {args.repeats} "
        f"timed rounds after a warm-up; prompt {args.prompt_len} tokens, greedy, no stop token",
        f"load average (1 min) at start / end: {load_start:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
        "CPUs (above the CPU count, other processes disturbed the timings)",
    ]
    for r in results:
        if "agreement" in r:
            a = r["agreement"]
            notes.append(f"batch {r['batch']} {r['impl']} tokens vs {'HF' if r['impl'] == 'hf' else 'lockstep'}: "
                         f"{a['token_match']:.0%} equal, "
                         f"{a['rows_identical']:.0%} rows identical (random weights: near-ties may diverge)")
    env = _common.environment()
    _common.print_table(f"Decode throughput: {args.preset} {args.dtype}, {args.new_tokens} new tokens, "
                        f"{env['device']} ({backend})", columns, rows, notes)
    _common.write_json(args.json, {
        "benchmark": "decode", "args": vars(args), "environment": env, "loadavg_1m_start": load_start,
        "config": _common.PRESETS[args.preset], "weight_bytes": weights["bytes"], "n_params": weights["params"],
        "bandwidth_bytes_s": bw, "bandwidth_method": bw_method, "roofline_step_s": roofline_step,
        "nominal_bandwidth_bytes_s": nominal, "results": results,
    })


if __name__ == "__main__":
    sys.exit(main())
