"""`dami demo`: the static λ sweep on the shipped toy pair (the README's main command).

Loads the pair, runs held-out problems at λ = 0, 0.1, …, 1 as one vmapped
program (`pair.sweep`), refines the grid where outputs start thinking, and
reports per λ: accuracy (overall and per difficulty k), mean generated
tokens, and the share of outputs containing `</think>`. Also the per-query
oracle (the cheapest λ of the grid that answers right). Writes sweep.json and
pareto.png.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from dami_jax.toyworld import MAX_NEW_TOKENS, default_pair_dirs
from dami_jax.toyworld import language as L

HELD_OUT_SEED = 20261127  # training draws from other seeds


def run_grid(pair, problems, lams) -> list[dict]:
    """Per-λ records with per-query `correct`, `tokens`, `think` lists."""
    from dami_jax.pair import sweep

    prompts = [L.to_ids(L.prompt_tokens(p)) for p in problems]
    outs = sweep(pair, prompts, np.asarray(lams, np.float32), MAX_NEW_TOKENS)
    records = []
    for lam, out in zip(lams, outs):
        texts = [L.decode(ids) for ids in out.token_lists()]
        records.append({
            "lam": round(float(lam), 4),
            "correct": [L.grade(p, t) for p, t in zip(problems, texts)],
            "tokens": [int(n) for n in out.lengths],
            "think": [L.THINK_END in t for t in texts],
        })
    return records


def summarize(record: dict, ks: list[int]) -> dict:
    correct, tokens, think = (np.asarray(record[k]) for k in ("correct", "tokens", "think"))
    kk = np.asarray(ks)
    return {
        "lam": record["lam"],
        "accuracy": float(correct.mean()),
        "mean_tokens": float(tokens.mean()),
        "think_share": float(think.mean()),
        "accuracy_by_k": {int(k): float(correct[kk == k].mean()) for k in sorted(set(ks))},
        "tokens_by_k": {int(k): float(tokens[kk == k].mean()) for k in sorted(set(ks))},
        "think_share_by_k": {int(k): float(think[kk == k].mean()) for k in sorted(set(ks))},
    }


def oracle(records: list[dict]) -> dict:
    """Per query, the cheapest λ of the grid that answers right (else the cheapest overall)."""
    correct = np.array([r["correct"] for r in records])  # (L, Q)
    tokens = np.array([r["tokens"] for r in records], float)
    cost = np.where(correct, tokens, tokens + 1e6)
    pick = np.argmin(cost, axis=0)
    q = np.arange(correct.shape[1])
    return {"policy": "oracle", "accuracy": float(correct[pick, q].mean()),
            "mean_tokens": float(tokens[pick, q].mean()),
            "lam_mean": float(np.mean([records[i]["lam"] for i in pick]))}


def refine(summaries: list[dict], points: int = 4) -> list[float]:
    """Extra λ between the grid points where the think share crosses 0.5."""
    for a, b in zip(summaries, summaries[1:]):
        if a["think_share"] < 0.5 <= b["think_share"]:
            return [round(float(x), 4) for x in np.linspace(a["lam"], b["lam"], points + 2)[1:-1]]
    return []


def switch_lambda(summaries: list[dict], k: int) -> float | None:
    """The λ where difficulty k's think share first reaches 0.5 (linear interpolation)."""
    pts = [(s["lam"], s["think_share_by_k"][k]) for s in summaries]
    for (l0, s0), (l1, s1) in zip(pts, pts[1:]):
        if s0 < 0.5 <= s1:
            return l0 + (0.5 - s0) * (l1 - l0) / (s1 - s0)
    return None


def print_table(summaries: list[dict], orc: dict, ks: list[int]) -> None:
    head = f"{'λ':>6} {'acc':>6} {'tokens':>7} {'think':>6}  " + " ".join(f"acc k={k}" for k in ks)
    print(head)
    print("-" * len(head))
    for s in summaries:
        per_k = " ".join(f"{s['accuracy_by_k'][k]:>7.3f}" for k in ks)
        print(f"{s['lam']:>6.3f} {s['accuracy']:>6.3f} {s['mean_tokens']:>7.1f} {s['think_share']:>6.2f}  {per_k}")
    print(f"{'oracle':>6} {orc['accuracy']:>6.3f} {orc['mean_tokens']:>7.1f}")


def evaluate_pair(pair, problems, lams, refine_switch: bool = False) -> tuple[list[dict], dict]:
    """Per-λ summaries and the oracle (with the switch λ by k) of `problems` on a grid;
    `refine_switch` adds grid points where the think share crosses 0.5."""
    ks = sorted({p.k for p in problems})
    kk = [p.k for p in problems]
    records = run_grid(pair, problems, lams)
    extra = refine([summarize(r, kk) for r in records]) if refine_switch else []
    if extra:
        records = sorted(records + run_grid(pair, problems, extra), key=lambda r: r["lam"])
    summaries = [summarize(r, kk) for r in records]
    orc = oracle(records)
    orc["switch_lambda_by_k"] = {k: switch_lambda(summaries, k) for k in ks}
    return summaries, orc


def held_out_problems(per_k: int, seed: int = HELD_OUT_SEED):
    return L.sample_problems(per_k * L.MAX_OPS, seed=seed, ks=list(range(1, L.MAX_OPS + 1)))


def run_demo(out_dir: str | None = None, pair_dir: str | None = None, per_k: int = 20,
             seed: int = HELD_OUT_SEED, world: str = "v1") -> list[dict]:
    """The sweep on `pair_dir`, by default the shipped pair of `world` (v1 or v2)."""
    from dami_jax.pair import load_pair
    from dami_jax.toyworld import PAIR_DIRS

    if world not in PAIR_DIRS:
        raise ValueError(f"unknown toy world {world!r}; expected one of {sorted(PAIR_DIRS)}")
    t0 = time.perf_counter()
    instruct, thinking = default_pair_dirs(pair_dir or PAIR_DIRS[world])
    pair = load_pair(instruct, thinking)
    ks = list(range(1, L.MAX_OPS + 1))
    problems = held_out_problems(per_k, seed)
    grid = [round(x, 2) for x in np.linspace(0, 1, 11)]
    summaries, orc = evaluate_pair(pair, problems, grid, refine_switch=True)
    print(f"toy pair ({world}) {os.path.dirname(instruct)}: {len(problems)} held-out problems, "
          f"{per_k} per difficulty k, greedy, max {MAX_NEW_TOKENS} new tokens")
    print_table(summaries, orc, ks)
    print("λ where thinking switches on (think share 0.5), by k: "
          + ", ".join(f"k={k}: {v:.3f}" if v is not None else f"k={k}: -"
                      for k, v in orc["switch_lambda_by_k"].items()))
    print(f"[{time.perf_counter() - t0:.1f} s]")
    result = summaries + [orc]
    if out_dir:
        _write(out_dir, result, summaries, orc, world)
    return result


def _write(out_dir: str, result: list[dict], summaries: list[dict], orc: dict, world: str) -> None:
    from dami_jax.eval.plots import pareto_plot

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(result, f, indent=2)
    curve = [(s["lam"], s["mean_tokens"], s["accuracy"]) for s in summaries]
    pareto_plot({"oracle": (orc["mean_tokens"], orc["accuracy"])}, curve,
                os.path.join(out_dir, "pareto.png"), title=f"toy pair ({world}): static λ sweep")
    print(f"wrote {out_dir}/sweep.json and {out_dir}/pareto.png")
