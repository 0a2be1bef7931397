"""Evaluation metrics: pure NumPy functions of per-sample results.

Accuracies are fractions in [0, 1]. An ungradable sample counts as wrong (it
stays in the denominator); `gradable_share` reports how many were gradable.
A per-item record is a dict with at least the fields in `RECORD_FIELDS`:
`id` (problem), `sample` (index of the sample for that problem), `correct`,
`gradable`, `tokens` (generated tokens), `pred` (canonical answer or None) and
`think` (the output contains `</think>`); records of several policies also carry
`policy`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

RECORD_FIELDS = ("id", "sample", "correct", "gradable", "tokens", "pred", "think")


def pass_at_k(n, c, k: int):
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), per item.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge
    binomials. `n` samples of which `c` are correct; arrays broadcast. Returns a
    float for scalar inputs, an array otherwise.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"pass_at_k: k must be an integer >= 1, got {k!r}")
    n_arr, c_arr = np.broadcast_arrays(np.asarray(n), np.asarray(c))
    if (n_arr < k).any():
        raise ValueError(f"pass_at_k: needs n >= k samples per item; got k={k}, smallest n={n_arr.min()}")
    if (c_arr < 0).any() or (c_arr > n_arr).any():
        raise ValueError("pass_at_k: correct counts must satisfy 0 <= c <= n")
    out = np.empty(n_arr.shape, dtype=np.float64)
    for idx in np.ndindex(n_arr.shape):
        ni, ci = int(n_arr[idx]), int(c_arr[idx])
        if ni - ci < k:  # every k-subset holds a correct sample
            out[idx] = 1.0
        else:
            out[idx] = 1.0 - np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1, dtype=np.float64))
    return float(out) if out.ndim == 0 else out


def mean_accuracy(correct_per_item: Sequence[Sequence[bool]]) -> float:
    """mean@k: the mean over items of each item's mean over its samples."""
    if len(correct_per_item) == 0:
        raise ValueError("mean_accuracy: no items")
    return float(np.mean([np.mean(np.asarray(c, dtype=np.float64)) for c in correct_per_item]))


def majority_vote(preds: Sequence[str | None], correct: Sequence[bool]) -> tuple[str | None, bool]:
    """(voted answer, its correctness) over one item's samples.

    The most common non-None answer wins; ties go to the answer seen first (the
    lowest sample index). No answer at all -> (None, False). Equal answers have
    equal grades; the winner is correct if any sample with it was graded correct.
    """
    if len(preds) != len(correct):
        raise ValueError(f"majority_vote: {len(preds)} preds but {len(correct)} correct flags")
    counts: dict[str, int] = {}
    for p in preds:
        if p is not None:
            counts[p] = counts.get(p, 0) + 1
    if not counts:
        return None, False
    best = max(counts, key=lambda p: counts[p])  # max keeps the first maximal key (insertion order)
    return best, any(bool(c) for p, c in zip(preds, correct) if p == best)


def token_stats(tokens: Sequence[int]) -> dict[str, float]:
    t = np.asarray(tokens, dtype=np.float64)
    if t.size == 0:
        raise ValueError("token_stats: no token counts")
    return {"mean_tokens": float(t.mean()), "median_tokens": float(np.median(t)), "total_tokens": int(t.sum())}


def thinking_share(think: Sequence[bool]) -> float:
    """Fraction of outputs that contain `</think>`."""
    if len(think) == 0:
        raise ValueError("thinking_share: no outputs")
    return float(np.mean(np.asarray(think, dtype=np.float64)))


def tokens_per_second(total_tokens: float, seconds: float) -> float:
    if seconds <= 0:
        raise ValueError(f"tokens_per_second: seconds must be > 0, got {seconds}")
    return float(total_tokens) / float(seconds)


def speedup(seconds: float, ref_seconds: float) -> float:
    """How many times faster than the reference (ref_seconds / seconds)."""
    if seconds <= 0 or ref_seconds <= 0:
        raise ValueError(f"speedup: times must be > 0, got {seconds} and reference {ref_seconds}")
    return float(ref_seconds) / float(seconds)


def group_items(records: Iterable[Mapping[str, Any]]) -> dict[Any, list[Mapping[str, Any]]]:
    """Records grouped by `id`, each group sorted by `sample`; checks fields and duplicates."""
    items: dict[Any, list] = defaultdict(list)
    policies = set()
    for i, r in enumerate(records):
        missing = [f for f in RECORD_FIELDS if f not in r]
        if missing:
            raise ValueError(f"record {i} (id={r.get('id')!r}) lacks field(s) {missing}; needs {list(RECORD_FIELDS)}")
        policies.add(r.get("policy"))
        items[r["id"]].append(r)
    if len(policies) > 1:
        raise ValueError(f"records mix policies {sorted(map(str, policies))}; use summarize_by_policy")
    for pid, rs in items.items():
        rs.sort(key=lambda r: r["sample"])
        samples = [r["sample"] for r in rs]
        if len(set(samples)) != len(samples):
            raise ValueError(f"item {pid!r} has duplicate sample indices {samples}")
    return dict(items)


def summarize(
    records: Iterable[Mapping[str, Any]],
    ks: Sequence[int] = (1,),
    wall_s: float | None = None,
    ref: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Summary of one policy's records: accuracy (mean over samples), pass@k and
    maj@k for each k in `ks` (maj@k votes over the first k samples), token and
    thinking statistics; tokens/s when `wall_s` is given. With `ref` (the summary
    of a reference run, e.g. the Thinking model) it adds `accuracy_delta`,
    `token_ratio` and, when both have `wall_s`, `speedup`."""
    items = group_items(records)
    if not items:
        raise ValueError("summarize: no records")
    groups = list(items.values())
    n = np.array([len(g) for g in groups])
    c = np.array([sum(bool(r["correct"]) for r in g) for g in groups])
    flat = [r for g in groups for r in g]
    out: dict[str, Any] = {
        "n_items": len(groups),
        "samples_per_item": int(n.min()),
        "n_samples": len(flat),
        "accuracy": mean_accuracy([[r["correct"] for r in g] for g in groups]),
        "gradable_share": float(np.mean([bool(r["gradable"]) for r in flat])),
        "thinking_share": thinking_share([bool(r["think"]) for r in flat]),
        **token_stats([r["tokens"] for r in flat]),
    }
    for k in ks:
        if k > n.min():
            raise ValueError(f"summarize: k={k} but some items have only {n.min()} samples")
        out[f"pass@{k}"] = float(np.mean(pass_at_k(n, c, k)))
        votes = [majority_vote([r["pred"] for r in g[:k]], [r["correct"] for r in g[:k]])[1] for g in groups]
        out[f"maj@{k}"] = float(np.mean(votes))
    if wall_s is not None:
        out["wall_s"] = float(wall_s)
        out["tokens_per_s"] = tokens_per_second(out["total_tokens"], wall_s)
    if ref is not None:
        out["accuracy_delta"] = out["accuracy"] - float(ref["accuracy"])
        out["token_ratio"] = out["mean_tokens"] / float(ref["mean_tokens"])
        if wall_s is not None and ref.get("wall_s"):
            out["speedup"] = speedup(wall_s, ref["wall_s"])
    return out


def summarize_by_policy(
    records: Iterable[Mapping[str, Any]],
    ks: Sequence[int] = (1,),
    wall_s: Mapping[str, float] | None = None,
    ref_policy: str | None = None,
) -> dict[str, dict[str, Any]]:
    """`summarize` per `policy` field; `ref_policy` names the reference run."""
    by_policy: dict[str, list] = defaultdict(list)
    for i, r in enumerate(records):
        if "policy" not in r:
            raise ValueError(f"record {i} (id={r.get('id')!r}) has no 'policy' field")
        by_policy[r["policy"]].append(r)
    if ref_policy is not None and ref_policy not in by_policy:
        raise ValueError(f"reference policy {ref_policy!r} not in records; policies: {sorted(by_policy)}")
    wall_s = wall_s or {}
    ref = None
    if ref_policy is not None:
        ref = summarize(by_policy[ref_policy], ks, wall_s.get(ref_policy))
    return {p: summarize(rs, ks, wall_s.get(p), ref) for p, rs in by_policy.items()}
