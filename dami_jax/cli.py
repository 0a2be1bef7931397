"""The `dami` command: convert, merge, generate, demo, sweep, eval, analyze, train-pref, serve, ...

Each subcommand is a small function over the library; heavy imports happen
inside them so `dami --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback

from dami_jax import compilation_cache, distributed
from dami_jax.errors import InputError
from dami_jax.eval.pairs import TOY_PAIRS, add_pair_arguments

DTYPES = ("float32", "bfloat16", "float16")


def _convert(args) -> None:
    from dami_jax.checkpoint.hf import load_hf, resolve_model_dir
    from dami_jax.checkpoint.store import save_params
    from dami_jax.config import ModelConfig

    src = resolve_model_dir(args.src)
    cfg = ModelConfig.from_hf(src)
    params = load_hf(src, dtype=args.dtype, cfg=cfg)
    out = save_params(cfg, params, args.out, source=src)
    print(f"converted {src} -> {out} ({args.dtype})")


def _merge(args) -> None:
    from dami_jax.checkpoint.hf import DEFAULT_MAX_SHARD_BYTES
    from dami_jax.checkpoint.merge import merge_checkpoints

    out = merge_checkpoints(args.instruct, args.thinking, args.lam, args.out, schedule=args.schedule,
                            dtype=args.dtype, max_shard_bytes=args.max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
                            progress=not args.no_progress, tokenizer_from=args.tokenizer_from,
                            allow_extrapolation=args.allow_extrapolation)
    print(f"merged λ={args.lam} -> {out}")


def _generate(args) -> None:
    from dami_jax.eval.pairs import check_policy, open_pair
    from dami_jax.generate import Greedy, Sample, chat_prompt, split_thinking
    from dami_jax.policies.base import build_policy
    from dami_jax.policies.execute import answer

    pair_cfg = _pair_config(args)
    distributed.init_from_args(args)  # first: checking a pref policy reads its model onto a device
    spec = check_policy(args.policy, pair_cfg)  # the pair config's own (conf: its calibration), checked
    pair = open_pair(pair_cfg)
    policy = build_policy(spec, pair)
    sampling = Greedy() if args.temperature == 0 else Sample(args.temperature, args.top_k, args.top_p)

    def answers(questions: list[str]) -> list[dict]:
        prompts = [chat_prompt(pair.tokenizer, q) for q in questions]
        out, chosen = answer(pair, policy, prompts, args.max_new_tokens or pair_cfg.max_new_tokens, mode=args.mode,
                             sampling=sampling, seed=args.seed, **pair_cfg.engine_size())
        rows = []
        for q, lam, ids, reason in zip(questions, chosen.lam, out.token_lists(), out.finish_reasons):
            text = pair.tokenizer.decode(ids[:-1] if reason == "stop" else ids, skip_special_tokens=False)
            thinking, reply = split_thinking(text)  # the stop token is left out, `</think>` kept to split on
            rows.append({"prompt": q, "policy": policy.spec, "lam": round(float(lam), 4), "answer": reply,
                         "thinking": thinking, "tokens": len(ids), "finish_reason": reason})
        return rows

    # Several processes: each answers its shard (whole engine batches), process 0 prints all in order.
    rows = distributed.map_sharded(answers, args.prompt, block=pair_cfg.batch_size)
    if distributed.is_writer():
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))


def _demo(args) -> None:
    from dami_jax.toyworld.demo import run_demo

    run_demo(args.out, pair_dir=args.pair, per_k=args.per_k, world=args.world)


def _toyworld(args) -> None:
    from dami_jax.toyworld import train

    train.main(args.rest)  # argparse allows only action "train"


def _pair_config(args):
    """The pair config of `--pair` and `--set` (read, not loaded)."""
    from dami_jax.eval.pairs import load_pair_config

    return load_pair_config(args.pair, args.set)


def _run_policies(args, policies: list[str]) -> None:
    from dami_jax.eval.pairs import check_policies, open_pair
    from dami_jax.eval.run import load_problems, run_eval

    # Everything that can be wrong is found before the pair loads: the config, the policies (built
    # without the pair, their files read), the benchmarks (each is read here; run_eval reads it
    # again, from the file or the datasets cache).
    pair_cfg = _pair_config(args)
    distributed.init_from_args(args)  # before the policies: checking a pref policy reads its model onto a device
    policies = [p.strip() for p in policies]
    check_policies(policies, pair_cfg)
    benches = [b.strip() for b in args.bench.split(",")]
    for bench in benches:
        load_problems(bench, args.limit)
    pair = open_pair(pair_cfg)
    run_eval(pair, pair_cfg, benches, policies, samples=args.samples, out_dir=args.out, limit=args.limit,
             seed=args.seed)


def _eval(args) -> None:
    _run_policies(args, args.policies.split(","))


def _sweep(args) -> None:
    # A static sweep is an eval of static:λ policies: same records (resumable), grading, table,
    # results.json/csv and Pareto plot (the static curve).
    _run_policies(args, [f"static:{lam:g}" for lam in args.lams])


def _lam_grid(text: str) -> list[float]:
    """`--lams 0,0.25,1` -> [0.0, 0.25, 1.0]; argparse reports an ArgumentTypeError as exit 2."""
    lams = []
    for item in text.split(","):
        try:
            lam = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not a number (expected e.g. 0,0.5,1)") from None
        if math.isnan(lam) or not 0.0 <= lam <= 1.0:
            raise argparse.ArgumentTypeError(f"λ={item.strip()} is outside [0, 1]")
        lams.append(lam)
    if len({f"{x:g}" for x in lams}) != len(lams):  # the policy names, static:<λ:g>, must differ
        raise argparse.ArgumentTypeError(f"duplicate λ in {text!r}")
    return lams


def _whole_number(minimum: int):
    """An argparse type: an int >= minimum."""
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return int(text)

    return parse


_positive_int = _whole_number(1)


def _number_in(lo: float, hi: float, lo_open: bool = False):
    """An argparse type: a float in [lo, hi] (or (lo, hi] when lo_open)."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (lo < x if lo_open else lo <= x) or not x <= hi:
            raise argparse.ArgumentTypeError(f"{text} is outside {'(' if lo_open else '['}{lo:g}, {hi:g}]")
        return x

    return parse


def _byte_size(text: str) -> int:
    """Bytes from '500000000', '500MB', '2GiB', '4G' (decimal or binary suffixes)."""
    units = {"": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
             "kib": 2**10, "mib": 2**20, "gib": 2**30}
    s = text.strip().lower()
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2000000000, 500MB, 2GiB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be > 0, got {text!r}")
    return int(value)


def _train_pref(args) -> None:
    from dami_jax.pref.config import load_pref_config
    from dami_jax.pref.pipeline import load_task, run

    cfg = load_pref_config(args.config, args.overrides)
    task = load_task(cfg)  # the pair config and the problems, checked before any process waits or loads
    distributed.init_from_args(args)
    run(cfg, args.out, args.work, progress=not args.no_progress, task=task)


def _serve(args) -> None:
    from dami_jax.serve import main as serve_main

    serve_main(args.rest)


def _read_prompts(path: str) -> tuple[list, list[int] | None]:
    """Calibration prompts: JSONL rows with a "question" (and, on every row or none, an
    "instruct_wrong" 0/1 label; an "image": a path or a list, relative to the file, for a
    vision-language pair), or plain text, one prompt per line. (problems, labels or None)."""
    from dami_jax.eval.benchmarks import Problem, image_sources

    problems, labels = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line.startswith("{"):
                if line:
                    problems.append(Problem(f"line-{lineno}", line, ""))
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row.get("question"), str) or not row["question"].strip():
                raise InputError(f"{path} line {lineno}: expected a non-empty string field 'question', "
                                 f"got fields {sorted(row)}")
            if "instruct_wrong" in row:
                if row["instruct_wrong"] not in (0, 1):
                    raise InputError(f"{path} line {lineno}: instruct_wrong must be 0 or 1, got {row['instruct_wrong']!r}")
                labels.append(int(row["instruct_wrong"]))
            images = image_sources(row["image"], os.path.dirname(os.path.abspath(path)),
                                   f"{path} line {lineno}") if "image" in row else ()
            missing = [i for i in images if isinstance(i, str) and not os.path.isfile(i)]
            if missing:  # found now, not after the pair has loaded
                raise InputError(f"{path} line {lineno}: no image file {missing[0]}")
            problems.append(Problem(f"line-{lineno}", row["question"], "", images))
    if len(problems) < 2:
        raise InputError(f"{path}: calibration needs >= 2 prompts, found {len(problems)}")
    if labels and len(labels) != len(problems):
        raise InputError(f"{path}: {len(labels)} of {len(problems)} prompts carry instruct_wrong; label all or none")
    return problems, labels or None


def _calibrate(args) -> None:
    from dami_jax.eval.pairs import open_pair
    from dami_jax.eval.run import pair_processor, problem_inputs, toy_benchmark
    from dami_jax.policies.base import pair_fingerprint
    from dami_jax.policies.calibrate import calibration_from_scores, sharded_signals, signal_summary

    pair_cfg = _pair_config(args)
    conf_cfg = pair_cfg.conf
    out_path = args.out or pair_cfg.conf_calibration
    if not out_path:
        raise InputError("give --out PATH (the pair config names no conf_calibration to write)")
    labels = None
    if args.prompts:
        problems, labels = _read_prompts(args.prompts)
    elif args.pair in TOY_PAIRS:
        problems = toy_benchmark(per_k=50, seed=args.seed)
    else:
        raise InputError("--prompts FILE is required for a pair other than 'toy' or 'toy-v2'")
    distributed.init_from_args(args)
    pair = open_pair(pair_cfg)
    # As eval asks them: the chat template (a vision-language pair's processor, with the images).
    prompts, pixels = problem_inputs(pair, pair_cfg, problems, pair_processor(pair, pair_cfg))
    # Both signals are measured (D too, while w_D = 0: s is the same), so the summary shows each one.
    out = sharded_signals(pair, prompts, conf_cfg, with_js=True, **pixels)
    cal = calibration_from_scores(out["score"], conf_cfg, pair_fingerprint(pair))
    if not distributed.is_writer():
        return
    cal.save(out_path)
    print(f"calibrated conf on {len(problems)} prompts (w_entropy={conf_cfg.w_entropy:g}, w_js={conf_cfg.w_js:g}, "
          f"rho={conf_cfg.rho}, tau_per_iqr={conf_cfg.tau_per_iqr}): mu={cal.mu:.4f} tau={cal.tau:.4f} -> {out_path}")
    _print_signals(signal_summary(out, labels))


def _print_signals(summary: dict) -> None:
    """One row per signal: spread, how far it only repeats the others (Spearman) and, with labels,
    how well it ranks the prompts the Instruct model gets wrong (AUROC)."""
    names = {"entropy": "entropy A", "js": "JS D", "maxprob": "max-prob M"}
    cols = ["mean", "std", "q25", "median", "q75", "spearman_score", "spearman_entropy", "spearman_js",
            "spearman_maxprob"] + (["auroc_wrong"] if any("auroc_wrong" in r for r in summary.values()) else [])
    print("signal        " + "".join(f"{c:>17}" for c in cols))
    for k, row in summary.items():
        print(f"{names[k]:<14}" + "".join(f"{row[c]:>17.4f}" if c in row else f"{'-':>17}" for c in cols))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dami", description="DAMI: dynamic model interpolation in JAX")
    parser.add_argument("--debug", action="store_true", help="on bad input, show the traceback too")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="HF safetensors -> Orbax params checkpoint (fast launches)")
    p.add_argument("src", help="HF model directory or hub id")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.set_defaults(func=_convert)

    p = sub.add_parser(
        "merge", help="write Θ(λ) = λ·Θ_T + (1 − λ)·Θ_I as an HF checkpoint (streaming, tensor by tensor)")
    p.add_argument("--instruct", required=True, help="Instruct model: HF directory or hub id")
    p.add_argument("--thinking", required=True, help="Thinking model: HF directory or hub id")
    p.add_argument("--lam", type=float, required=True, help="λ in [0, 1] (0: Instruct, 1: Thinking)")
    p.add_argument("--schedule", default=None, help="YAML λ schedule (per module kind / layer range)")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="output dtype (default: the inputs' dtype)")
    p.add_argument("--max-shard-bytes", type=_byte_size, default=None,
                   help="shard size limit, e.g. 2GiB (default 4GiB)")
    p.add_argument("--tokenizer-from", choices=["thinking", "instruct"], default="thinking",
                   help="whose config.json, tokenizer and generation config to copy")
    p.add_argument("--allow-extrapolation", action="store_true", help="accept λ outside [0, 1]")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_merge)

    p = sub.add_parser("generate", help="answer prompts with a λ policy; prints the chosen λ beside each answer")
    add_pair_arguments(p)
    p.add_argument("--policy", default="conf", help="conf, routing, pref, budget[:N] or static:λ (default conf)")
    p.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None, help="default: the pair config's")
    p.add_argument("--mode", choices=["delta", "merged"], default="delta",
                   help="delta: Θ_I + λ·Δ per row; merged: Θ(λ) materialized (same tokens)")
    p.add_argument("--temperature", type=_number_in(0, math.inf), default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=_whole_number(0), default=0, help="0: no top-k cut")
    p.add_argument("--top-p", type=_number_in(0, 1, lo_open=True), default=1.0)
    p.add_argument("--seed", type=int, default=0)
    distributed.add_process_args(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("demo", help="static λ sweep on the shipped toy Instruct/Thinking pair")
    p.add_argument("--out", default=None, help="write sweep.json and pareto.png here")
    p.add_argument("--world", choices=["v1", "v2"], default="v1",
                   help="the toy world whose shipped pair runs (v2: docs/toyworld_v2.md)")
    p.add_argument("--pair", default=None, help="a toy pair directory (default: the world's shipped one)")
    p.add_argument("--per-k", type=int, default=20, help="held-out problems per difficulty k")
    p.set_defaults(func=_demo)

    p = sub.add_parser("eval", help="every policy on math benchmarks: accuracy, tokens, speed")
    p.add_argument("--policies", default="static:0,static:0.5,static:0.8,static:1,conf,routing,budget",
                   help="comma-separated policy specs")
    _add_run_arguments(p, out="runs/eval")
    p.set_defaults(func=_eval)

    p = sub.add_parser("sweep", help="static λ sweep on a pair: accuracy, tokens and think share per λ")
    p.add_argument("--lams", type=_lam_grid, default=[round(0.1 * i, 1) for i in range(11)],
                   help="comma-separated λ in [0, 1] (default 0,0.1,...,1)")
    _add_run_arguments(p, out="runs/sweep")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("calibrate", help="label-free DAMI-Conf calibration (mu, tau) on a prompt set, "
                       "with each signal's statistics")
    p.add_argument("policy", choices=["conf"])
    add_pair_arguments(p)
    p.add_argument("--prompts", default=None, help="JSONL with 'question' fields (optional 0/1 "
                   "'instruct_wrong' labels: AUROC per signal; 'image' paths for a Qwen3-VL pair), or one "
                   "prompt per line")
    p.add_argument("--out", default=None, help="calibration JSON to write (default: the pair's conf_calibration)")
    p.add_argument("--seed", type=int, default=7, help="toy calibration problems (not the eval seed)")
    distributed.add_process_args(p)
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("toyworld", help="toyworld train --out DIR [--config FILE] [key=value ...]")
    p.add_argument("action", choices=["train"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the toy trainer")
    p.set_defaults(func=_toyworld)

    p = sub.add_parser("train-pref", help="train the DAMI-Pref reward model (resumable; = python train_pref.py)")
    p.add_argument("--config", required=True, help="YAML of PrefConfig fields (configs/pref_toy.yaml)")
    p.add_argument("--out", default="runs/pref", help="reward model, metrics.jsonl, report.json")
    p.add_argument("--work", default=None, help="resumable state (default OUT/work); under several processes "
                   "a directory every process sees (Orbax checkpoints the reward model from all of them)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. steps=500")
    distributed.add_process_args(p)
    p.set_defaults(func=_train_pref)

    _add_analyze_parser(sub)

    # No option prefix: every argument, --help included, goes on to serve.py's own parser.
    p = sub.add_parser("serve", help="OpenAI-compatible server (= python serve.py; see dami serve --help)",
                       add_help=False, prefix_chars="\0")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of serve.py")
    p.set_defaults(func=_serve)
    return parser


def _analyze(args) -> None:
    from dami_jax.analysis import commands

    getattr(commands, args.analysis.replace("-", "_"))(args)


def _add_analyze_parser(sub) -> None:
    """`dami analyze frontier|cka|barrier|think-ratio`: the pilot study (dami_jax/analysis)."""
    p = sub.add_parser("analyze", help="pilot study: frontier, CKA along λ, loss barrier, thinking ratio")
    kinds = p.add_subparsers(dest="analysis", required=True)
    lams = dict(type=_lam_grid, default=[round(0.1 * i, 1) for i in range(11)],
                help="comma-separated λ grid holding 0 and 1 (default 0,0.1,...,1)")
    helps = {"frontier": "monotonicity, convexity, chord and hull, thinking stages, per-query continuity",
             "think-ratio": "thinking share and length by λ, benchmark and difficulty",
             "cka": "linear CKA of hidden states along λ vs Θ(0), Θ(1) and the next λ, per layer",
             "barrier": "mean NLL of texts along λ (whole model, attention, MLP, layer halves) and the barrier"}
    for name, help_text in helps.items():
        q = kinds.add_parser(name, help=help_text)
        add_pair_arguments(q)
        q.add_argument("--out", default="runs/analyze", help=f"{name.replace('-', '_')}.json and figures")
        q.add_argument("--bench", default="toy", help="comma-separated benchmarks (as dami eval --bench)")
        limit = 48 if name == "barrier" else None  # barrier: 11 λ × 5 paths × 2 text sets of forward passes
        q.add_argument("--limit", type=_positive_int, default=limit,
                       help=f"first N problems of each benchmark (default {limit or 'all'})")
        q.add_argument("--lams", **lams)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--no-progress", action="store_true")
        if name in ("frontier", "think-ratio"):
            q.add_argument("--run", default=None, help="a sweep/eval run directory or records .jsonl to read "
                           "(default: sweep the pair on --bench/--limit/--lams into OUT/sweep, reused by a rerun)")
        if name == "frontier":
            q.add_argument("--tol", type=_number_in(0, 1), default=0.01,
                           help="noise allowance of the verdicts, in accuracy (tokens: that share of the largest)")
        if name == "cka":
            q.add_argument("--pooling", choices=["mean", "last", "tokens"], default="mean",
                           help="one input per prompt (mean or last token) or per token")
            q.add_argument("--batch", type=_positive_int, default=64, help="prompts per forward pass")
        if name == "barrier":
            q.add_argument("--paths", default="full,attn,mlp,early,late",
                           help="full, attn, mlp, early, late (layer halves) or schedule YAML files")
            q.add_argument("--texts", default=None, help="JSONL of {prompt, response} or {text} rows (default: "
                           "the Thinking and Instruct models' greedy answers to --bench)")
            q.add_argument("--max-new-tokens", type=_positive_int, default=None, help="default: the pair config's")
            q.add_argument("--batch", type=_positive_int, default=16, help="texts per forward pass")
            q.add_argument("--lam-chunk", type=_positive_int, default=None,
                           help="λ per forward pass (default all; the logits of each are held at once)")
        q.set_defaults(func=_analyze)


def _add_run_arguments(p: argparse.ArgumentParser, out: str) -> None:
    """What `eval` and `sweep` share: the pair, the problems, samples and where results go."""
    add_pair_arguments(p)
    p.add_argument("--bench", default="toy", help="comma-separated: toy, gsm8k, math500, aime24, aime25, "
                   "amc23, or a .jsonl path")
    p.add_argument("--samples", type=_positive_int, default=1,
                   help="samples per problem (>1: Thinking sampling defaults)")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N problems of each benchmark")
    p.add_argument("--out", default=out, help="records, results.json/csv, pareto_<bench>.png")
    p.add_argument("--seed", type=int, default=0)
    distributed.add_process_args(p)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; bad input is one line on stderr and exit status 2.

    Bad input is an `InputError` (ConfigError, CheckpointError, PairMismatchError, ...)
    or a path that does not exist. Anything else is a bug and propagates with its
    traceback; `--debug` prints the traceback of bad input too.
    """
    args = build_parser().parse_args(argv)
    try:
        compilation_cache.enable()
        args.func(args)
    except (InputError, FileNotFoundError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"dami {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
