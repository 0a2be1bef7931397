"""The toy world as a DAMI-Pref task: prompts, a grader, and the policy-vs-λ evaluation."""

from __future__ import annotations

import numpy as np

from dami_jax.pair import generate_pair
from dami_jax.toyworld import language as L


def toy_task(n: int, seed: int):
    """(problems, prompt token ids, grader(i, ids) -> bool) for n toy problems (all difficulties)."""
    problems = L.sample_problems(n, seed)
    prompts = [L.to_ids(L.prompt_tokens(p)) for p in problems]

    def grader(i: int, ids) -> bool:
        return L.grade(problems[i], L.decode(ids))

    return problems, prompts, grader


def answers(pair, problems, prompts, lam, max_new_tokens: int, batch: int = 256):
    """Greedy answers at per-query λ (delta mode): (correct (Q,) bool, generated tokens (Q,) int)."""
    lam = np.broadcast_to(np.asarray(lam, np.float32), (len(prompts),))
    correct, tokens = [], []
    for s in range(0, len(prompts), batch):
        out = generate_pair(pair, prompts[s: s + batch], lam[s: s + batch], max_new_tokens, mode="delta")
        correct += [L.grade(p, L.decode(ids)) for p, ids in zip(problems[s: s + batch], out.token_lists())]
        tokens += [int(n) for n in out.lengths]
    return np.asarray(correct, bool), np.asarray(tokens)


def answer_stats(pair, problems, prompts, lam, max_new_tokens: int, batch: int = 256) -> dict:
    """`answers` summarized: accuracy, mean tokens, mean λ, accuracy and mean λ by difficulty k."""
    lam = np.broadcast_to(np.asarray(lam, np.float32), (len(prompts),))
    correct, tokens = answers(pair, problems, prompts, lam, max_new_tokens, batch)
    ks = np.asarray([p.k for p in problems])
    return {"accuracy": float(correct.mean()), "mean_tokens": float(tokens.mean()),
            "lam_mean": float(lam.mean()),
            "accuracy_by_k": {int(k): float(correct[ks == k].mean()) for k in sorted(set(ks.tolist()))},
            "lam_mean_by_k": {int(k): float(lam[ks == k].mean()) for k in sorted(set(ks.tolist()))}}


def evaluate_toy(pair, policy, n: int, seed: int, max_new_tokens: int) -> dict:
    """The pref policy against λ = 1 (Thinking) and λ = 0 (Instruct) on n held-out problems."""
    problems, prompts, _ = toy_task(n, seed)
    lam = policy(prompts, pair).lam
    rows = {"pref": answer_stats(pair, problems, prompts, lam, max_new_tokens),
            "static:1": answer_stats(pair, problems, prompts, 1.0, max_new_tokens),
            "static:0": answer_stats(pair, problems, prompts, 0.0, max_new_tokens)}
    top = rows["static:1"]
    rows["pref"]["accuracy_vs_static1"] = rows["pref"]["accuracy"] - top["accuracy"]
    rows["pref"]["token_ratio_vs_static1"] = rows["pref"]["mean_tokens"] / top["mean_tokens"]
    return {"n": n, "seed": seed, "greedy": True, "max_new_tokens": max_new_tokens, "policies": rows}


def print_eval(report: dict) -> None:
    print(f"toy eval: {report['n']} held-out problems (seed {report['seed']}), greedy")
    print(f"{'policy':>9} {'acc':>6} {'tokens':>7} {'λ mean':>7}")
    for name, r in report["policies"].items():
        print(f"{name:>9} {r['accuracy']:>6.3f} {r['mean_tokens']:>7.1f} {r['lam_mean']:>7.3f}")
    p = report["policies"]["pref"]
    print(f"pref vs λ=1: {100 * p['accuracy_vs_static1']:+.1f} accuracy points, "
          f"{100 * p['token_ratio_vs_static1']:.0f}% of its tokens")
