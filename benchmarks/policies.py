"""Cost of the DAMI-Conf scoring against generation of the same batch at λ = 1.

Requirement: Conf scoring time ≤ 5% of the generation time of the same batch at λ = 1.
The Routing policy runs the same scoring (`score_prompts` with the calibration's
ConfConfig, then a threshold on s), so its cost is the Conf cost.

Method (compilation excluded, reported separately):
  * every timed thing is a host-to-host call (results back as numpy): the Conf
    policy call `policy(prompts, pair)` as eval/serve run it (`score_prompts`:
    batches of `batch_size`, rows padded to a power of two, one jitted
    probe + teacher-forced program per batch), and generation at λ = 1 through
    `dami_jax.policies.execute.answer` with `static:1` (what `dami eval` runs:
    `generate_pair`, delta mode, greedy);
  * one untimed first call of each (compile + run; its time minus the steady
    time is printed as compile), then --repeats rounds in which the callers take
    turns (a change of machine load hits all alike); the minimum of each is kept;
  * (a) toy: the shipped pair and the toy benchmark of `dami eval --bench toy`
    (300 problems, one batch of 300 as in the toy pair config, max 96 new
    tokens; λ = 1 stops by itself after its real answer length). Also timed:
    the floor of any Conf scoring, the Instruct model's prompt pass plus the
    first answer token (`generate`, 1 token: Conf needs at least that much to
    see p_I), the Routing policy, the Conf policy with `batch_size` = the whole batch
    (one jitted call instead of 10 batches of 32) and λ = 1 in merged mode (the
    Thinking weights alone, 1× weight bytes per step: the stricter reference);
  * (b) larger random-weight pair (`--preset` shapes, `--layers`, `--vocab`),
    `--batch` random prompts of `--prompt-len` tokens, no stop token, so λ = 1
    generates exactly `--think-len` tokens per row (checked). Also timed: the
    jitted scoring `conf_signals` on the exact rows (no row padding) and a
    1-token generation (prefill + first token). Per-token decode time
    step = (t[L] − t[1]) / (L − 1), and the derived ratio at other lengths
    conf / (t[1] + (L − 1)·step).

Usage:
  nice python benchmarks/policies.py --json out/policies.json       # about 8 min on 2 CPU cores
  nice python benchmarks/policies.py --think-len 1024 --large-repeats 2 \
      --json benchmarks/results/policies_cpu.json                    # the recorded figures, about 12 min
  python benchmarks/policies.py --no-large                      # toy only, about a minute
  python benchmarks/policies.py --preset tiny --layers 0 --vocab 0 --think-len 64   # smoke check
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402
import numpy as np  # noqa: E402

TARGET = 0.05  # Conf scoring ≤ 5% of the λ = 1 generation of the same batch


def log(msg: str) -> None:
    print(f"[policies] {msg}", file=sys.stderr, flush=True)


def timed_rounds(callers: dict, repeats: int) -> dict[str, dict]:
    """First (compile) call of each caller, then `repeats` rounds taking turns; min kept."""
    out = {}
    for name, fn in callers.items():
        t = time.perf_counter()
        fn()
        out[name] = {"first_call_s": time.perf_counter() - t, "all_s": []}
        log(f"  {name}: first call {out[name]['first_call_s']:.2f} s")
    for i in range(repeats):
        for name, fn in callers.items():
            t = time.perf_counter()
            fn()
            out[name]["all_s"].append(time.perf_counter() - t)
        log(f"  round {i + 1}/{repeats}: " + ", ".join(f"{k} {v['all_s'][-1]:.2f} s" for k, v in out.items()))
    for r in out.values():
        r["s"] = min(r["all_s"])
        r["compile_s"] = max(r["first_call_s"] - r["s"], 0.0)
    return out


# ---------------------------------------------------------------------------
# (a) the shipped toy pair, as `dami eval --pair toy --bench toy` runs it.

def run_toy(args) -> dict:
    import dami_jax as dj
    from dami_jax.eval.pairs import expand_policy, open_pair, toy_pair_config
    from dami_jax.eval.run import toy_benchmark
    from dami_jax.generate.chat import chat_prompt
    from dami_jax.pair import generate_pair
    from dami_jax.policies.base import build_policy
    from dami_jax.policies.conf import ConfPolicy
    from dami_jax.policies.execute import answer

    pair_cfg = toy_pair_config()
    if not pair_cfg.conf_calibration:
        raise SystemExit("the shipped toy pair has no conf_calibration.json")
    pair = open_pair(pair_cfg)
    problems = toy_benchmark(per_k=args.toy_per_k)[: pair_cfg.batch_size]  # the eval's first batch
    prompts = [chat_prompt(pair.tokenizer, p.question) for p in problems]
    conf = build_policy(expand_policy("conf", pair_cfg), pair)
    routing = build_policy(expand_policy("routing", pair_cfg), pair)
    static1 = build_policy("static:1", pair)
    gen = {}

    def delta():
        gen["delta"] = answer(pair, static1, prompts, pair_cfg.max_new_tokens)[0]

    def merged():
        gen["merged"] = generate_pair(pair, prompts, 1.0, pair_cfg.max_new_tokens, mode="merged")

    log(f"toy pair: {len(prompts)} prompts, max {pair_cfg.max_new_tokens} new tokens")
    one_batch = ConfPolicy(dataclasses.replace(
        conf.calibration, conf=dataclasses.replace(conf.calibration.conf, batch_size=len(prompts))))
    timed = timed_rounds({"conf": lambda: conf(prompts, pair), "routing": lambda: routing(prompts, pair),
                          "conf_one_batch": lambda: one_batch(prompts, pair),
                          "instruct_prefill_1": lambda: dj.generate(pair.cfg, pair.instruct, prompts, 1).lengths,
                          "gen_delta": delta, "gen_merged": merged}, args.repeats)
    lengths = gen["delta"].lengths
    assert (gen["merged"].tokens == gen["delta"].tokens).all(), "delta and merged λ=1 tokens differ"
    return {
        "prompts": len(prompts), "prompt_tokens_max": max(map(len, prompts)),
        "max_new_tokens": pair_cfg.max_new_tokens, "conf_batch_size": conf.calibration.conf.batch_size,
        "probe_tokens": conf.calibration.conf.probe_tokens,
        "gen_len_mean": float(lengths.mean()), "gen_len_max": int(lengths.max()),
        "finish_stop_share": float(np.mean([r == "stop" for r in gen["delta"].finish_reasons])),
        "timed": timed,
    }


# ---------------------------------------------------------------------------
# (b) a larger random-weight pair, λ = 1 generation of a fixed thinking length.

def large_config(args):
    cfg = _common.model_config(args.preset)
    over = {"max_position_embeddings": max(4096, args.prompt_len + args.think_len + 64)}
    if args.layers:
        over["num_layers"] = args.layers
    if args.vocab:
        over["vocab_size"] = args.vocab
    return dataclasses.replace(cfg, **over)


def run_large(args) -> dict:
    import jax
    import jax.numpy as jnp

    import dami_jax as dj
    from dami_jax.pair import ModelPair
    from dami_jax.policies.base import build_policy, pair_fingerprint
    from dami_jax.policies.calibrate import Calibration
    from dami_jax.policies.conf import (ConfPolicy, ScoreCoeffs, _padded_ids, conf_signals, format_token_ids,
                                        load_conf_config, padded_rows)
    from dami_jax.policies.execute import answer
    from dami_jax.policies.routing import RoutingPolicy

    cfg = large_config(args)
    log(f"random pair {args.preset}, {cfg.num_layers} layers, vocab {cfg.vocab_size}: init params")
    pair = ModelPair(cfg, dj.init_params(cfg, 0, args.dtype), dj.init_params(cfg, 1, args.dtype), tokenizer=None)
    n_params = int(sum(x.size for x in jax.tree.leaves(pair.instruct)))
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (args.batch, args.prompt_len)).tolist()
    conf_cfg = load_conf_config()
    # μ, τ do not change the cost (traced coefficients); a stand-in calibration keeps compiling in the
    # policy's first call.
    cal = Calibration(0.0, 1.0, conf_cfg, pair_fingerprint(pair), (0.0, 1.0))
    conf, routing = ConfPolicy(cal), RoutingPolicy(cal)
    static1 = build_policy("static:1", pair)

    # The jitted scoring alone on the exact rows: what `score_prompts` runs, minus its row padding.
    from dami_jax.generate.decode import left_pad

    tokens, mask = (jnp.asarray(a) for a in left_pad(prompts, args.prompt_len))
    excl, stops = _padded_ids(format_token_ids(pair, conf_cfg)), _padded_ids(pair.stop_tokens)
    coeffs = ScoreCoeffs.of(conf_cfg, cal.mu, cal.tau)

    def scoring_exact_rows():
        out = conf_signals(cfg, pair.instruct, pair.thinking, tokens, mask, excl, stops, coeffs,
                           probe_len=conf_cfg.probe_tokens, with_js=conf_cfg.w_js != 0)
        return jax.device_get(out["lam"])

    def gen(n):
        def run():
            out = answer(pair, static1, prompts, n)[0]
            if not (out.lengths == n).all():
                raise RuntimeError(f"expected {n} tokens per row, got {out.lengths.tolist()}")
        return run

    callers = {"conf": lambda: conf(prompts, pair), "conf_signals_exact_rows": scoring_exact_rows,
               "gen_1": gen(1), f"gen_{args.think_len}": gen(args.think_len)}
    if args.large_routing:
        callers["routing"] = lambda: routing(prompts, pair)
    log(f"batch {args.batch} x {args.prompt_len} prompt tokens, λ=1 for {args.think_len} tokens")
    timed = timed_rounds(callers, args.large_repeats)
    t1, tl = timed["gen_1"]["s"], timed[f"gen_{args.think_len}"]["s"]
    step = (tl - t1) / (args.think_len - 1)
    conf_rows = padded_rows(args.batch, conf_cfg.batch_size)
    return {
        "model": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                               "num_heads", "num_kv_heads", "head_dim")},
        "params_per_model": n_params, "dtype": args.dtype, "batch": args.batch, "prompt_len": args.prompt_len,
        "think_len": args.think_len, "probe_tokens": conf_cfg.probe_tokens, "conf_rows_after_padding": conf_rows,
        "timed": timed, "prefill_plus_1_s": t1, "step_s": step,
    }


# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds after the first call (min kept)")
    ap.add_argument("--large-repeats", type=int, default=2, help="timed rounds on the random pair")
    ap.add_argument("--toy-per-k", type=int, default=50, help="toy problems per k (the eval's 50: 300 prompts)")
    ap.add_argument("--no-toy", action="store_true")
    ap.add_argument("--no-large", action="store_true")
    ap.add_argument("--preset", default="qwen3-0.6b", choices=sorted(_common.PRESETS),
                    help="layer widths of the random pair")
    ap.add_argument("--layers", type=int, default=4, help="num_layers override (0: the preset's)")
    ap.add_argument("--vocab", type=int, default=32768,
                    help="vocab override (0: the preset's); 32768 keeps the embedding near its share "
                         "of the real 0.6B model at 4 layers")
    ap.add_argument("--batch", type=int, default=8, help="rows (the real pair configs' eval batch)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="params of the random pair")
    ap.add_argument("--think-len", type=int, default=512,
                    help="λ=1 tokens per row (measured); 512 keeps the default run near 10 min on 2 CPU cores")
    ap.add_argument("--derive", default="512,1024,2048,8192", help="other lengths for the derived ratio")
    ap.add_argument("--large-routing", action="store_true", help="also time the Routing policy on (b)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.think_len < 2:
        ap.error("--think-len must be >= 2 (the step time is a difference against a 1-token run)")

    load_start = os.getloadavg()[0]
    toy = None if args.no_toy else run_toy(args)
    large = None if args.no_large else run_large(args)
    load_end = os.getloadavg()[0]

    rows, notes, derived = [], [], {}
    if toy:
        ref = toy["timed"]["gen_delta"]["s"]
        for name, label in (("conf", f"conf policy ({toy['prompts']} prompts)"), ("routing", "routing policy"),
                            ("conf_one_batch", f"conf, batch_size={toy['prompts']}"),
                            ("instruct_prefill_1", "floor: Instruct prompt pass + 1 token"),
                            ("gen_delta", "λ=1 delta (eval)"), ("gen_merged", "λ=1 merged")):
            r = toy["timed"][name]
            r["ratio_to_gen_delta"] = r["s"] / ref
            r["ratio_to_gen_merged"] = r["s"] / toy["timed"]["gen_merged"]["s"]
            rows.append(["toy", label, r["s"], r["compile_s"], r["ratio_to_gen_delta"], r["ratio_to_gen_merged"]])
        notes.append(f"toy: {toy['prompts']} prompts (≤ {toy['prompt_tokens_max']} tokens), λ=1 answers "
                     f"{toy['gen_len_mean']:.1f} tokens mean / {toy['gen_len_max']} max "
                     f"({toy['finish_stop_share']:.0%} stopped by EOS), max_new_tokens {toy['max_new_tokens']}; "
                     f"Conf: {toy['probe_tokens']}-token probe, batches of {toy['conf_batch_size']}")
    if large:
        tl = f"gen_{large['think_len']}"
        ref = large["timed"][tl]["s"]
        labels = {"conf": f"conf policy ({large['batch']} rows -> {large['conf_rows_after_padding']})",
                  "conf_signals_exact_rows": f"conf_signals jitted ({large['batch']} rows)",
                  "routing": "routing policy", "gen_1": "λ=1 delta, 1 token",
                  tl: f"λ=1 delta, {large['think_len']} tokens"}
        for name, r in large["timed"].items():
            r["ratio_to_gen"] = r["s"] / ref
            rows.append(["random", labels[name], r["s"], r["compile_s"], r["ratio_to_gen"], None])
        t1, step = large["prefill_plus_1_s"], large["step_s"]
        lens = sorted({large["think_len"], *(int(x) for x in args.derive.split(",") if x)})
        for n in lens:
            g = t1 + (n - 1) * step
            derived[n] = {"gen_s": g, "conf_ratio": large["timed"]["conf"]["s"] / g,
                          "conf_signals_exact_rows_ratio": large["timed"]["conf_signals_exact_rows"]["s"] / g}
        m = large["model"]
        notes += [
            f"random: {m['num_layers']} layers, hidden {m['hidden_size']}, mlp {m['intermediate_size']}, heads "
            f"{m['num_heads']}/{m['num_kv_heads']}x{m['head_dim']}, vocab {m['vocab_size']} "
            f"({large['params_per_model'] / 1e6:.0f}M params per model, {large['dtype']}); batch {large['batch']} x "
            f"{large['prompt_len']} prompt tokens; λ=1 makes exactly {large['think_len']} tokens per row",
            f"random: prefill+1 token {t1:.2f} s, decode step {1e3 * step:.1f} ms (delta mode, batch "
            f"{large['batch']}); Conf = prefill + {large['probe_tokens']} steps of the Instruct model "
            "(and of the Thinking model when w_D ≠ 0)",
            "derived (not measured) ratio conf / (prefill+1 + (L-1)·step): " + ", ".join(
                f"L={n}: {d['conf_ratio']:.3f} (exact rows {d['conf_signals_exact_rows_ratio']:.3f})"
                for n, d in derived.items()),
        ]
    notes += [f"target: conf ≤ {TARGET:.0%} of the λ=1 generation of the same batch; routing runs the same "
              "scoring (plus a threshold), so its cost is the conf cost",
              f"min of {args.repeats} (toy) / {args.large_repeats} (random) interleaved rounds after a first "
              "(compile) call; load average (1 min) at "
              f"start / end {load_start:.1f} / {load_end:.1f} on {os.cpu_count()} CPUs"]
    _common.print_table("DAMI-Conf scoring vs λ=1 generation of the same batch",
                        ["pair", "what", "seconds", "compile s", "/ λ=1 (delta)", "/ λ=1 merged"], rows, notes)
    _common.write_json(args.json, {
        "benchmark": "policies", "args": vars(args), "environment": _common.environment(),
        "load_avg_start_end": [load_start, load_end], "target_ratio": TARGET,
        "toy": toy, "random_pair": large, "derived_ratio_by_length": derived,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
