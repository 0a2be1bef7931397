"""RQ5: how much the interpolated model thinks, by λ and by group of queries.

A group is a benchmark (one records file each) or, within one, a difficulty
read from the problem id: the toy world's ids `toy-k<k>-<i>` carry the number
of operations k. Per (group, λ): the share of outputs that think (`</think>`
present), the mean generated tokens of all outputs and of the thinking ones,
and the accuracy.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from dami_jax.analysis.sweep import static_lam

_DIFFICULTY = re.compile(r"-k(\d+)-")


def difficulty(problem_id: str) -> str | None:
    """`k3` for a toy id `toy-k3-17`; None when the id carries no difficulty."""
    m = _DIFFICULTY.search(str(problem_id))
    return f"k{m.group(1)}" if m else None


def _cell(records: list[dict]) -> dict:
    think = np.array([bool(r["think"]) for r in records])
    tokens = np.array([r["tokens"] for r in records], dtype=np.float64)
    return {"n": len(records), "think_share": float(think.mean()), "mean_tokens": float(tokens.mean()),
            "mean_thinking_tokens": float(tokens[think].mean()) if think.any() else None,
            "accuracy": float(np.mean([bool(r["correct"]) for r in records]))}


def by_lam(records: list[dict]) -> dict[str, dict]:
    """{λ (as in the policy, e.g. "0.5"): cell} over static records, λ ascending."""
    cells = defaultdict(list)
    for r in records:
        cells[static_lam(r["policy"])].append(r)
    return {f"{lam:g}": _cell(cells[lam]) for lam in sorted(cells)}


def think_ratio_report(sweeps: dict[str, list[dict]]) -> dict:
    """{"benchmarks": {bench: by λ}, "difficulty": {bench: {k: by λ}}} from {bench: static records};
    a benchmark whose ids carry no difficulty has no entry under "difficulty"."""
    out = {"benchmarks": {}, "difficulty": {}}
    for bench, records in sweeps.items():
        out["benchmarks"][bench] = by_lam(records)
        groups = defaultdict(list)
        for r in records:
            groups[difficulty(r["id"])].append(r)
        if None not in groups:
            out["difficulty"][bench] = {k: by_lam(groups[k]) for k in sorted(groups, key=lambda k: int(k[1:]))}
    return out
