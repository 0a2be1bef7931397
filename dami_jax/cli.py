"""The `dami` command: convert, merge, generate, demo, sweep, eval, train-pref, serve, ...

Each subcommand is a small function over the library; heavy imports happen
inside them so `dami --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from dami_jax import compilation_cache


def _convert(args) -> None:
    from dami_jax.checkpoint.hf import load_hf, resolve_model_dir
    from dami_jax.checkpoint.store import save_params
    from dami_jax.config import ModelConfig

    src = resolve_model_dir(args.src)
    cfg = ModelConfig.from_hf(src)
    params = load_hf(src, dtype=args.dtype, cfg=cfg)
    out = save_params(cfg, params, args.out, source=src)
    print(f"converted {src} -> {out} ({args.dtype})")


def _generate(args) -> None:
    from dami_jax.generate import Greedy, Sample, chat_prompt, split_thinking
    from dami_jax.pair import generate_pair, load_pair

    pair = load_pair(args.instruct, args.thinking, dtype=args.dtype)
    prompts = [chat_prompt(pair.tokenizer, q) for q in args.prompt]
    sampling = Greedy() if args.temperature == 0 else Sample(args.temperature, args.top_k, args.top_p)
    out = generate_pair(pair, prompts, args.lam, args.max_new_tokens, mode=args.mode,
                        sampling=sampling, seed=args.seed)
    for q, ids, reason in zip(args.prompt, out.token_lists(), out.finish_reasons):
        thinking, answer = split_thinking(pair.tokenizer.decode(ids, skip_special_tokens=False))
        print(json.dumps({"prompt": q, "lam": args.lam, "thinking": thinking, "answer": answer,
                          "tokens": len(ids), "finish_reason": reason}, ensure_ascii=False))


def _demo(args) -> None:
    from dami_jax.toyworld.demo import run_demo

    run_demo(args.out, pair_dir=args.pair, per_k=args.per_k)


def _toyworld(args) -> None:
    from dami_jax.toyworld import train

    if args.action != "train":
        raise ValueError(f"unknown toyworld action {args.action!r}; expected 'train'")
    train.main(args.rest)


def _run_policies(args, policies: list[str]) -> None:
    from dami_jax.eval.pairs import load_pair_config, open_pair
    from dami_jax.eval.run import run_eval

    pair_cfg = load_pair_config(args.pair, args.set)
    pair = open_pair(pair_cfg)
    run_eval(pair, pair_cfg, args.bench.split(","), policies, samples=args.samples,
             out_dir=args.out, limit=args.limit, seed=args.seed)


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


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _train_pref(args) -> None:
    from dami_jax.pref.config import load_pref_config
    from dami_jax.pref.pipeline import run

    cfg = load_pref_config(args.config, args.overrides)
    run(cfg, args.out, args.work, progress=not args.no_progress)


def _serve(args) -> None:
    from dami_jax.serve import main as serve_main

    serve_main(args.rest)


def _calibrate(args) -> None:
    import json as _json

    from dami_jax.eval.benchmarks import math_prompt
    from dami_jax.eval.pairs import load_pair_config, open_pair
    from dami_jax.eval.run import toy_benchmark
    from dami_jax.generate.chat import chat_prompt
    from dami_jax.policies.calibrate import calibrate_conf
    from dami_jax.policies.conf import load_conf_config

    if args.policy != "conf":
        raise ValueError(f"only 'conf' calibrates (routing reuses it), got {args.policy!r}")
    conf_cfg = load_conf_config(args.conf_config, args.conf_set)
    pair_cfg = load_pair_config(args.pair, args.set)
    pair = open_pair(pair_cfg)
    if args.prompts:  # one JSON object with a "question" per line, or plain text lines
        with open(args.prompts) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        questions = [_json.loads(ln)["question"] if ln.startswith("{") else ln for ln in lines]
    elif args.pair == "toy":
        questions = [p.question for p in toy_benchmark(per_k=50, seed=args.seed)]
    else:
        raise ValueError("--prompts FILE is required for a pair other than 'toy'")
    wrap = math_prompt if pair_cfg.math_instruction else (lambda q: q)
    cal = calibrate_conf(pair, [chat_prompt(pair.tokenizer, wrap(q)) for q in questions], conf_cfg)
    cal.save(args.out)
    print(f"calibrated conf on {len(questions)} prompts (rho={conf_cfg.rho}, tau_per_iqr={conf_cfg.tau_per_iqr}): "
          f"mu={cal.mu:.4f} tau={cal.tau:.4f} -> {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dami", description="DAMI: dynamic model interpolation in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="HF safetensors -> Orbax params checkpoint (fast launches)")
    p.add_argument("src", help="HF model directory or hub id")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_convert)

    p = sub.add_parser("generate", help="answer prompts at a given λ")
    p.add_argument("--instruct", required=True)
    p.add_argument("--thinking", required=True)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--mode", choices=["delta", "merged"], default="merged")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_generate)

    p = sub.add_parser("demo", help="static λ sweep on the shipped toy Instruct/Thinking pair")
    p.add_argument("--out", default=None, help="write sweep.json and pareto.png here")
    p.add_argument("--pair", default=None, help="a toy pair directory (default: the shipped one)")
    p.add_argument("--per-k", type=int, default=20, help="held-out problems per difficulty k")
    p.set_defaults(func=_demo)

    p = sub.add_parser("eval", help="every policy on math benchmarks: accuracy, tokens, speed")
    p.add_argument("--policies", default="static:0,static:0.5,static:0.8,static:1,conf,routing,budget:48",
                   help="comma-separated policy specs")
    _add_run_arguments(p, out="runs/eval")
    p.set_defaults(func=_eval)

    p = sub.add_parser("sweep", help="static λ sweep on a pair: accuracy, tokens and think share per λ")
    p.add_argument("--lams", type=_lam_grid, default=[round(0.1 * i, 1) for i in range(11)],
                   help="comma-separated λ in [0, 1] (default 0,0.1,...,1)")
    _add_run_arguments(p, out="runs/sweep")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("calibrate", help="label-free DAMI-Conf calibration (mu, tau) on a prompt set")
    p.add_argument("policy", choices=["conf"])
    p.add_argument("--pair", default="toy")
    p.add_argument("--prompts", default=None, help="JSONL with 'question' fields, or one prompt per line")
    p.add_argument("--out", required=True, help="calibration JSON to write")
    p.add_argument("--seed", type=int, default=7, help="toy calibration problems (not the eval seed)")
    p.add_argument("--set", action="append", default=[], help="pair config override key=value")
    p.add_argument("--conf-config", default=None, help="ConfConfig YAML (default: its dataclass defaults)")
    p.add_argument("--conf-set", action="append", default=[],
                   help="Conf config override key=value, e.g. rho=0.7 (saved in the calibration)")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("toyworld", help="toyworld train --out DIR [--config FILE] [key=value ...]")
    p.add_argument("action", choices=["train"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the toy trainer")
    p.set_defaults(func=_toyworld)

    p = sub.add_parser("train-pref", help="train the DAMI-Pref reward model (resumable; = python train_pref.py)")
    p.add_argument("--config", required=True, help="YAML of PrefConfig fields (configs/pref_toy.yaml)")
    p.add_argument("--out", default="runs/pref", help="reward model, metrics.jsonl, report.json")
    p.add_argument("--work", default=None, help="resumable state (default OUT/work)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. steps=500")
    p.set_defaults(func=_train_pref)

    # No option prefix: every argument, --help included, goes on to serve.py's own parser.
    p = sub.add_parser("serve", help="OpenAI-compatible server (= python serve.py; see dami serve --help)",
                       add_help=False, prefix_chars="\0")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of serve.py")
    p.set_defaults(func=_serve)

    for register in _optional_commands():
        register(sub)
    return parser


def _add_run_arguments(p: argparse.ArgumentParser, out: str) -> None:
    """What `eval` and `sweep` share: the pair, the problems, samples and where results go."""
    p.add_argument("--pair", default="toy", help="'toy' or a pair YAML (configs/pair_*.yaml)")
    p.add_argument("--bench", default="toy", help="comma-separated: toy, gsm8k, math500, aime24, aime25, "
                   "amc23, or a .jsonl path")
    p.add_argument("--samples", type=_positive_int, default=1,
                   help="samples per problem (>1: Thinking sampling defaults)")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N problems of each benchmark")
    p.add_argument("--out", default=out, help="records, results.json/csv, pareto_<bench>.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="pair config override key=value (repeatable)")


def _optional_commands():
    """Subcommands defined next to the code they drive."""
    from dami_jax import merge

    yield merge.add_merge_parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        compilation_cache.enable()
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: a message, not a traceback
        print(f"dami {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
