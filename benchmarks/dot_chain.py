"""The decode step's weight matmuls alone, in XLA and in PyTorch: the kernel-bound ceiling.

A decode step of a dense Qwen3 multiplies B activation rows with every weight
once: per layer q, k, v, o, gate, up, down, then the lm_head. This script runs
exactly those products (same shapes, same dtype, chained so nothing is skipped;
no attention, norms or sampling) as one jitted XLA program and as the same
sequence of torch matmuls, and reports their time and effective read bandwidth
next to the bandwidth probe of decode.py. It separates what the model code adds
from what the machine's matmul kernels allow:

    python benchmarks/dot_chain.py --json benchmarks/results/dot_chain_cpu.json

Whole-step decode time close to the XLA chain time means the model adds little;
a chain well below the probe bandwidth means the roofline is out of reach for
these kernels at these shapes, whatever the model code does.
"""

from __future__ import annotations

import argparse
import sys
import time

import _common


def log(msg: str) -> None:
    print(f"[dot_chain] {msg}", file=sys.stderr, flush=True)


def weight_shapes(cfg) -> tuple[list[dict[str, tuple[int, int]]], tuple[int, int]]:
    """(per-layer {name: (in, out)}, lm_head (vocab, hidden)) of a dense Qwen3."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = dict(q=(d, q), k=(d, kv), v=(d, kv), o=(q, d), gate=(d, f), up=(d, f), down=(f, d))
    return [layer] * cfg.num_layers, (cfg.vocab_size, d)


def chain(x, layers, head, matmul, silu, pad_to, normalize):
    """The products of one decode step, each output feeding the next input.

    matmul(x, w) multiplies by a weight as stored ((in, out) or (out, in))."""
    for w in layers:
        q = matmul(x, w["q"])
        qkv = q + pad_to(matmul(x, w["k"]) + matmul(x, w["v"]), q.shape[1])
        x = x + matmul(qkv, w["o"])
        x = x + matmul(silu(matmul(x, w["gate"])) * matmul(x, w["up"]), w["down"])
        x = normalize(x)  # unit rows: no overflow, and no denormals (slow in torch)
    return matmul(x, head)


def jax_runner(cfg, rows: int, out_in: bool):
    """out_in: weights stored (out, in) as dami_jax and HF do (x·Wᵀ); else (in, out) (x·W)."""
    import jax
    import jax.numpy as jnp

    layers_s, head_s = weight_shapes(cfg)
    keys = iter(jax.random.split(jax.random.key(0), 8 * len(layers_s) + 1))
    rand = lambda s: jax.random.normal(next(keys), s, jnp.float32) * 0.02  # noqa: E731
    flip = (lambda s: s[::-1]) if out_in else (lambda s: s)
    layers = [{n: rand(flip(s)) for n, s in w.items()} for w in layers_s]
    head = rand(head_s if out_in else head_s[::-1])
    pad = lambda y, n: jnp.pad(y, ((0, 0), (0, n - y.shape[1])))  # noqa: E731
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    mm = (lambda x, w: jnp.einsum("bi,oi->bo", x, w)) if out_in else jnp.matmul
    step = jax.jit(lambda ws, h, x: chain(x, ws, h, mm, jax.nn.silu, pad, unit))
    x = jnp.ones((rows, cfg.hidden_size), jnp.float32)
    nbytes = sum(a.nbytes for a in jax.tree.leaves(layers)) + head.nbytes
    return (lambda: step(layers, head, x).block_until_ready()), nbytes


def torch_runner(cfg, rows: int):
    """Weights (out, in) and F.linear, as HF's nn.Linear runs them."""
    import torch

    torch.manual_seed(0)
    layers_s, head_s = weight_shapes(cfg)
    layers = [{n: torch.randn(s[::-1]) * 0.02 for n, s in w.items()} for w in layers_s]
    head = torch.randn(head_s) * 0.02
    pad = lambda y, n: torch.nn.functional.pad(y, (0, n - y.shape[1]))  # noqa: E731
    x = torch.ones(rows, cfg.hidden_size)

    @torch.no_grad()
    def run():
        return chain(x, layers, head, torch.nn.functional.linear, torch.nn.functional.silu, pad,
                     lambda x: x / x.norm(dim=-1, keepdim=True))

    return run, None


def best_of(runners: dict, repeats: int) -> dict[str, float]:
    """Minimum seconds of each runner; they take turns so load changes hit all alike."""
    for run in runners.values():
        run()  # compile / first-touch
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    return {name: min(ts) for name, ts in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen3-0.6b", choices=sorted(_common.PRESETS))
    ap.add_argument("--batch", default="1,16", help="comma-separated activation rows")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cfg = _common.model_config(args.preset)
    log("measuring read bandwidth")
    bw = _common.measure_read_bandwidth(1 << 30)
    probe = max(bw, key=bw.get)
    rows = []
    for b in [int(x) for x in args.batch.split(",")]:
        log(f"batch {b}")
        run_jax, nbytes = jax_runner(cfg, b, out_in=True)
        runners = {"xla (out,in)": run_jax, "xla (in,out)": jax_runner(cfg, b, out_in=False)[0]}
        if not args.no_torch:
            runners["torch (out,in)"] = torch_runner(cfg, b)[0]
        best = best_of(runners, args.repeats)
        for name, s in best.items():
            rows.append(dict(impl=name, batch=b, ms=1e3 * s, gb_s=nbytes / s / 1e9,
                             of_probe=nbytes / s / bw[probe]))
        del runners, run_jax
    _common.print_table(
        f"Decode-step matmuls alone: {args.preset} float32 ({nbytes / 1e9:.3f} GB of weights)",
        ["impl", "batch", "ms/step", "GB/s", "of probe bandwidth"],
        [[r["impl"], r["batch"], r["ms"], r["gb_s"], r["of_probe"]] for r in rows],
        [f"probe: {bw[probe] / 1e9:.1f} GB/s ({probe}); min of {args.repeats} interleaved runs",
         f"load average (1 min): {_common.environment()['loadavg_1m']:.1f} on {_common.environment()['cpu_count']} CPUs"])
    _common.write_json(args.json, {"benchmark": "dot_chain", "args": vars(args), "environment": _common.environment(),
                                   "weight_bytes": nbytes, "bandwidth": bw, "results": rows})


if __name__ == "__main__":
    main()
