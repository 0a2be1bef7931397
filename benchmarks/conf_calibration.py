"""Accuracy and tokens of DAMI-Conf on a toy pair over a grid of its knobs (ρ, τ/IQR, λ_max).

How the shipped toy calibration's ρ and τ were chosen, on problem sets that are not the eval's
(`dami eval --bench toy` uses seed 20261127):
  * the pair's shipped calibration supplies the Conf config (weights, probe) and its sorted
    calibration scores (`dami calibrate conf --seed 7`: 300 unlabeled toy prompts);
  * for each (ρ, τ/IQR): μ, τ = `quantile_calibration(scores, ρ, τ/IQR)`, λ(q) from `score_prompts`
    with that μ, τ (as the policy computes it) on each `--seeds` problem set (300 problems, 50 per k), greedy generation at those λ in
    delta mode (as `dami eval` runs the policy), graded by the toy grader;
  * reference: λ = 1 on the same problems (accuracy, mean tokens); target of issue 5: accuracy
    within 1 point of λ = 1 at ≤ 75% of its tokens.
With `--pair toy-v2` the same on world v2's pair (docs/toyworld_v2.md), on its development seed
10000, with the λ ceiling λ_max in the grid too (v2's accuracy peaks at middle λ); issue 19's
target there: accuracy ≥ λ = 1's at ≤ 80% of its tokens.

Usage:
  python benchmarks/conf_calibration.py                                   # the recorded grid, ~3 min
  python benchmarks/conf_calibration.py --seeds 4242 --rhos 0.7 --taus 0.1
  python benchmarks/conf_calibration.py --pair toy-v2 --seeds 10000 --rhos 0.5,0.6,0.7 --taus 0.1,0.02 \
      --lam-maxs 0.4,0.5,0.6,0.7,1.0                                   # v2's development grid
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402
import numpy as np  # noqa: E402


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="4242,5151", help="toy problem sets (not the eval's 20261127)")
    ap.add_argument("--rhos", default="0.5,0.6,0.65,0.7,0.75")
    ap.add_argument("--taus", default="0.455,0.2,0.1,0.02", help="tau_per_iqr values")
    ap.add_argument("--lam-maxs", default="1.0", help="lam_max values (the λ an uncertain query tends to)")
    ap.add_argument("--pair", default="toy", choices=["toy", "toy-v2"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from dami_jax.eval.pairs import load_pair_config, open_pair
    from dami_jax.generate.chat import chat_prompt
    from dami_jax.pair import generate_pair
    from dami_jax.policies import score_prompts
    from dami_jax.policies.calibrate import Calibration, quantile_calibration
    from dami_jax.toyworld import language as L

    pair_cfg = load_pair_config(args.pair)
    pair = open_pair(pair_cfg)
    cal = Calibration.load(pair_cfg.conf_calibration)
    rows, results = [], []
    for seed in map(int, args.seeds.split(",")):
        problems = L.sample_problems(50 * L.MAX_OPS, seed=seed)
        prompts = [chat_prompt(pair.tokenizer, p.text) for p in problems]

        def run(lam):
            out = generate_pair(pair, prompts, lam, pair_cfg.max_new_tokens)
            correct = [L.grade(p, L.decode(t)) for p, t in zip(problems, out.token_lists())]
            return float(np.mean(correct)), float(out.lengths.mean())

        acc1, tok1 = run(1.0)
        rows.append([seed, "λ = 1", None, None, acc1, tok1, 1.0])
        for rho, tpi, lam_max in itertools.product(floats(args.rhos), floats(args.taus), floats(args.lam_maxs)):
            mu, tau = quantile_calibration(cal.scores, rho, tpi, cal.conf.min_tau)
            conf = dataclasses.replace(cal.conf, rho=rho, tau_per_iqr=tpi, lam_max=lam_max)
            lam = score_prompts(pair, prompts, conf, mu, tau)["lam"]
            acc, tok = run(lam)
            rows.append([seed, rho, tpi, lam_max, acc, tok, tok / tok1])
            results.append(dict(seed=seed, rho=rho, tau_per_iqr=tpi, lam_max=lam_max, mu=mu, tau=tau,
                                accuracy=acc, mean_tokens=tok, token_ratio=tok / tok1, mean_lam=float(lam.mean()),
                                lam1_accuracy=acc1, lam1_tokens=tok1))
            print(f"[conf_calibration] seed {seed} rho {rho} tau/iqr {tpi} lam_max {lam_max}: {acc:.3f} at "
                  f"{tok / tok1:.0%}", file=sys.stderr, flush=True)
    target = ("accuracy >= λ = 1's at <= 0.8 of its tokens (issue 19)" if args.pair == "toy-v2"
              else "accuracy within 0.01 of λ = 1 at <= 0.75 of its tokens")
    _common.print_table(f"DAMI-Conf on the {args.pair} pair by its knobs (dev problem sets)",
                        ["seed", "rho", "tau/IQR", "lam_max", "accuracy", "mean tokens", "x λ=1 tokens"], rows,
                        [f"calibration scores: {len(cal.scores)} prompts of {pair_cfg.conf_calibration}",
                         f"target: {target}"])
    _common.write_json(args.json, {"benchmark": "conf_calibration", "args": vars(args),
                                   "environment": _common.environment(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
