"""DAMI-Conf signals on the toy world: how well each predicts "the Instruct model answers wrong".

Method:
  * held-out problems: `--n` toy problems from `--seed` (balanced over k = 1..6;
    the trainer evaluates on seed 10000, so the default 31337 is not its eval set);
    prompts are the chat-templated ids (`language.prompt_tokens`, checked against
    the tokenizer's chat template);
  * label: the Instruct model's greedy answer (λ = 0, up to 88 new tokens) graded
    by `language.grade`; positive class = wrong;
  * signals: `score_prompts` (the jitted DAMI-Conf scoring) with mean and with max
    aggregation; per signal its AUROC for "wrong" (rank statistic, ties averaged),
    the mean AUROC within each k (does it see errors beyond difficulty?) and
    Spearman with k;
  * combinations: logistic regressions on (A, D) and (A, D, M), cross-fitted over
    2 folds (each half scored by weights fit on the other half, so the AUROC is
    not in-sample), plus the weights of configs/policy_conf.yaml;
  * λ(q): the unsupervised calibration (μ, τ from `--calib` unlabeled problems of
    seed + 1) with the YAML weights, applied to the held-out problems: Spearman
    of λ with k and mean λ per k.

Usage:
  python benchmarks/conf_signals.py                       # the shipped toy pair
  python benchmarks/conf_signals.py --json runs/conf_signals.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIR = os.path.join(ROOT, "dami_jax", "toyworld", "assets", "pair")
SIGNALS = ("entropy", "js", "maxprob")


def ranks(x) -> np.ndarray:
    """Ranks 1..n with ties averaged."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return (sums / counts)[inv]


def auroc(score, positive) -> float:
    """P(score of a positive > score of a negative), ties half (Mann-Whitney U)."""
    pos = np.asarray(positive, bool)
    n1, n0 = pos.sum(), (~pos).sum()
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((ranks(score)[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def spearman(a, b) -> float:
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def within_k_auroc(score, wrong, ks) -> float:
    vals = [auroc(score[ks == k], wrong[ks == k]) for k in np.unique(ks)]
    vals = [v for v in vals if v == v]
    return float(np.mean(vals)) if vals else float("nan")


def cross_fit(x, wrong, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold logistic scores (2 folds) and the weights fit on all rows (L1-normalized)."""
    from dami_jax.policies import logistic_fit

    if len(np.unique(wrong)) < 2:  # one class: nothing to fit
        return np.zeros(len(x)), np.full(x.shape[1], np.nan)
    fold = np.random.default_rng(seed).permutation(len(x)) % 2
    out = np.zeros(len(x))
    for f in (0, 1):
        w, b = logistic_fit(x[fold != f], wrong[fold != f])
        out[fold == f] = x[fold == f] @ w + b
    w, _ = logistic_fit(x, wrong)
    return out, w / np.abs(w).sum()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default=PAIR, help="directory holding instruct/ and thinking/")
    ap.add_argument("--n", type=int, default=300, help="held-out problems")
    ap.add_argument("--calib", type=int, default=300, help="unlabeled calibration problems (seed + 1)")
    ap.add_argument("--seed", type=int, default=31337)
    ap.add_argument("--config", default=None, help="ConfConfig YAML (default: the dataclass defaults with the toy pair's "
                    "weights, w_A 1, w_D 0, under which the recorded figures were measured)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    import dami_jax as dj
    from dami_jax.generate.chat import chat_prompt
    from dami_jax.pair import load_pair
    from dami_jax.policies import calibrate_conf, load_conf_config, score_prompts
    from dami_jax.toyworld import language as L

    pair = load_pair(os.path.join(args.pair, "instruct"), os.path.join(args.pair, "thinking"))
    cfg = load_conf_config(args.config, [] if args.config else ["w_entropy=1", "w_js=0"])
    problems = L.sample_problems(args.n, args.seed)
    prompts = [L.to_ids(L.prompt_tokens(p)) for p in problems]
    assert prompts[0] == chat_prompt(pair.tokenizer, problems[0].text), "prompt ids differ from the template"
    ks = np.asarray([p.k for p in problems])

    gen = dj.generate(pair.cfg, pair.instruct, prompts, 88, stop_tokens=pair.stop_tokens)
    texts = [L.decode(t) for t in gen.token_lists()]
    wrong = ~np.asarray([L.grade(p, t) for p, t in zip(problems, texts)])
    acc_by_k = {int(k): float(1 - wrong[ks == k].mean()) for k in np.unique(ks)}

    rows, results = [], {}

    def add(name, agg, score):
        r = {"auroc": auroc(score, wrong), "auroc_within_k": within_k_auroc(score, wrong, ks),
             "spearman_k": spearman(score, ks)}
        results[f"{name}/{agg}"] = r
        rows.append([name, agg, r["auroc"], r["auroc_within_k"], r["spearman_k"]])

    signals = {}
    for agg in ("mean", "max"):
        out = score_prompts(pair, prompts, dataclasses.replace(cfg, aggregate=agg), with_js=True)
        signals[agg] = out
        for name in SIGNALS:
            add(name, agg, out[name])
        add("yaml weights", agg, sum(w * out[k] for w, k in zip(cfg.weights, SIGNALS)))
        for combo in (("entropy", "js"), SIGNALS):
            x = np.stack([out[k] for k in combo], 1)
            oof, w = cross_fit(x, wrong, args.seed)
            label = "logit(" + ",".join(k[0].upper() for k in combo) + ")"
            add(label + " 2-fold", agg, oof)
            results[f"{label} 2-fold/{agg}"]["weights_all_rows"] = dict(zip(combo, w.tolist()))

    cal_problems = L.sample_problems(args.calib, args.seed + 1)
    cal = calibrate_conf(pair, [L.to_ids(L.prompt_tokens(p)) for p in cal_problems], cfg)
    lam = score_prompts(pair, prompts, cfg, cal.mu, cal.tau)["lam"]
    lam_summary = {"mu": cal.mu, "tau": cal.tau, "spearman_lam_k": spearman(lam, ks),
                   "auroc_lam": auroc(lam, wrong),
                   "mean_lam_by_k": {int(k): float(lam[ks == k].mean()) for k in np.unique(ks)}}
    n_content = signals[cfg.aggregate]["n_content"]

    _common.print_table(
        f"DAMI-Conf signals vs 'Instruct wrong' on {args.n} toy problems "
        f"(Instruct accuracy {1 - wrong.mean():.3f})",
        ["signal", "agg", "AUROC", "AUROC within k", "Spearman k"], rows,
        [f"Instruct accuracy by k: {acc_by_k}",
         f"content positions per probe: mean {n_content.mean():.2f}, min {n_content.min()}",
         f"λ (YAML weights, {cfg.aggregate}, unsupervised calibration on {args.calib}): "
         f"Spearman(λ, k) = {lam_summary['spearman_lam_k']:.3f}, AUROC(λ) = {lam_summary['auroc_lam']:.3f}, "
         f"mean λ by k = {', '.join(f'{v:.2f}' for v in lam_summary['mean_lam_by_k'].values())}"])
    _common.write_json(args.json, {
        "benchmark": "conf_signals", "args": vars(args), "environment": _common.environment(),
        "conf_config": dataclasses.asdict(cfg), "instruct_accuracy": float(1 - wrong.mean()),
        "instruct_accuracy_by_k": acc_by_k, "signals": results, "lambda": lam_summary,
    })


if __name__ == "__main__":
    main()
