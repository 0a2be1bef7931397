"""The static sweep's frontier: monotone, convex, its stages, and how single queries move along λ.

The sweep gives one point per λ: mean generated tokens t(λ) and accuracy a(λ).
"Convex" is the paper's sense: accuracy gained per token falls as λ grows, so
every point lies on the frontier's hull. In the (tokens, error = 1 − accuracy)
plane that hull is the lower convex hull; a point's `hull_gap` is how many
accuracy points it lies below it (0 on the hull). The chord joins λ = 0 and
λ = 1; `chord_gap` is how far above it a point lies (what a middle λ gains over
mixing the two models' answers in proportion). Stage boundaries are the λ where
the share of outputs that think (`</think>` present) first reaches 0.1, 0.5 and
0.9, linear between grid points.

All functions here are NumPy over a handful of λ; the tolerance `tol` (in
accuracy or share units) absorbs sampling noise in the verdicts, and every gap
is reported so a reader can judge with another one.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from dami_jax.analysis.sweep import static_lam
from dami_jax.errors import InputError
from dami_jax.eval.metrics import summarize_by_policy

STAGE_LEVELS = (0.1, 0.5, 0.9)


def sweep_curve(records: list[dict]) -> dict[str, np.ndarray]:
    """Per λ (sorted): accuracy, mean tokens, thinking share and items, from static records."""
    summary = summarize_by_policy(records)
    lams = sorted(summary, key=static_lam)
    rows = [summary[p] for p in lams]
    return {"lam": np.array([static_lam(p) for p in lams]),
            "accuracy": np.array([r["accuracy"] for r in rows]),
            "mean_tokens": np.array([r["mean_tokens"] for r in rows]),
            "think_share": np.array([r["thinking_share"] for r in rows]),
            "n_items": np.array([r["n_items"] for r in rows])}


def monotone(values, tol: float = 0.0) -> dict:
    """Is the sequence non-decreasing up to `tol`? The worst drop is below the running maximum
    (so a slow slide is not forgiven step by step), with the index where it occurs."""
    v = np.asarray(values, dtype=np.float64)
    drop = np.maximum.accumulate(v) - v
    worst = int(np.argmax(drop))
    return {"monotone": bool(drop[worst] <= tol), "worst_drop": float(drop[worst]), "at": worst}


def lower_convex_hull(x, y) -> np.ndarray:
    """Indices of the lower convex hull of the points (x, y), by increasing x (monotone chain;
    of points sharing an x only the lowest can be on it; collinear points are dropped)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise InputError(f"lower_convex_hull: x and y must be 1-D of one non-zero length, got {x.shape}, {y.shape}")
    hull: list[int] = []
    for i in np.lexsort((y, x)):
        if hull and x[hull[-1]] == x[i]:
            continue  # same x, higher y
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (x[b] - x[a]) * (y[i] - y[a]) - (y[b] - y[a]) * (x[i] - x[a])
            if cross > 0:  # a -> b -> i turns left: b stays on the lower hull
                break
            hull.pop()
        hull.append(int(i))
    return np.asarray(hull, dtype=np.int64)


def hull_gaps(tokens, accuracy) -> tuple[np.ndarray, np.ndarray]:
    """(hull indices, each point's accuracy below the hull of (tokens, 1 − accuracy)), >= 0."""
    t = np.asarray(tokens, np.float64)
    err = 1.0 - np.asarray(accuracy, np.float64)
    hull = lower_convex_hull(t, err)
    below = err - np.interp(t, t[hull], err[hull])
    return hull, np.maximum(below, 0.0)


def chord_gaps(tokens, accuracy) -> np.ndarray:
    """Accuracy minus the chord from the first point (λ = 0) to the last (λ = 1), at each point's
    tokens; NaN where a point's tokens lie outside the chord's span or the span is empty."""
    t = np.asarray(tokens, np.float64)
    a = np.asarray(accuracy, np.float64)
    t0, t1 = t[0], t[-1]
    if t1 == t0:
        return np.full_like(a, np.nan)
    chord = a[0] + (a[-1] - a[0]) * (t - t0) / (t1 - t0)
    inside = (t >= min(t0, t1)) & (t <= max(t0, t1))
    return np.where(inside, a - chord, np.nan)


def crossings(lams, share, levels=STAGE_LEVELS) -> dict[str, float | None]:
    """{level: the first λ where share reaches it (linear between grid points), None if never}."""
    lams, share = np.asarray(lams, np.float64), np.asarray(share, np.float64)
    out = {}
    for level in levels:
        hit = np.nonzero(share >= level)[0]
        if hit.size == 0:
            out[f"{level:g}"] = None
            continue
        k = int(hit[0])
        if k == 0:
            out[f"{level:g}"] = float(lams[0])
            continue
        s0, s1 = share[k - 1], share[k]
        out[f"{level:g}"] = float(lams[k - 1] + (level - s0) * (lams[k] - lams[k - 1]) / (s1 - s0))
    return out


def check_grid(lams) -> None:
    lams = np.asarray(lams, np.float64)
    if lams.size < 3 or lams[0] != 0.0 or lams[-1] != 1.0:
        raise InputError(f"the frontier needs a sweep over >= 3 λ from 0 to 1, got λ = {lams.tolist()}")


def frontier_report(curve: dict[str, np.ndarray], tol: float = 0.01) -> dict:
    """Monotonicity (accuracy, tokens and thinking share in λ), convexity (hull gaps), the chord,
    the stage boundaries, for one sweep curve (`sweep_curve`)."""
    check_grid(curve["lam"])
    lams, acc, tok = curve["lam"], curve["accuracy"], curve["mean_tokens"]
    hull, below = hull_gaps(tok, acc)
    chord = chord_gaps(tok, acc)
    middle = chord[1:-1]
    return {
        "tol": tol,
        "points": [{"lam": float(l), "accuracy": float(a), "mean_tokens": float(t), "think_share": float(s),
                    "hull_gap": float(g), "chord_gap": None if np.isnan(c) else float(c)}
                   for l, a, t, s, g, c in zip(lams, acc, tok, curve["think_share"], below, chord)],
        "monotone": {name: {**m, "at": float(lams[m["at"]])} for name, m in
                     (("accuracy", monotone(acc, tol)), ("tokens", monotone(tok, tol * max(tok.max(), 1.0))),
                      ("think_share", monotone(curve["think_share"], tol)))},
        "convex": bool(below.max() <= tol),
        "max_hull_gap": float(below.max()),
        "hull_lams": [float(lams[i]) for i in hull],
        "middle_above_chord": int(np.sum(middle > tol)),
        "middle_below_chord": int(np.sum(middle < -tol)),
        "max_chord_gap": None if np.all(np.isnan(middle)) else float(np.nanmax(middle)),
        "stages": crossings(lams, curve["think_share"]),
    }


def query_table(records: list[dict]) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """(λ grid, query ids, {correct, tokens, think}: (Q, K) means over each query's samples)."""
    cells: dict[tuple, list] = defaultdict(list)
    for r in records:
        cells[(r["id"], static_lam(r["policy"]))].append(r)
    lams = np.array(sorted({k[1] for k in cells}))
    ids = sorted({k[0] for k in cells})
    missing = [(i, l) for i in ids for l in lams if (i, l) not in cells]
    if missing:
        raise InputError(f"{len(missing)} (query, λ) cells have no record, e.g. {missing[0]}; "
                         "per-query continuity needs every query at every λ (finish the sweep)")
    table = {f: np.array([[np.mean([float(r[f]) for r in cells[(i, l)]]) for l in lams] for i in ids])
             for f in ("correct", "tokens", "think")}
    return lams, ids, table


def _direction_share(diffs: np.ndarray) -> tuple[float, float]:
    """(share of rows non-decreasing, share monotone in either direction)."""
    up = np.all(diffs >= 0, axis=1)
    down = np.all(diffs <= 0, axis=1)
    return float(up.mean()), float((up | down).mean())


def query_continuity(records: list[dict]) -> dict:
    """RQ3: how many queries change smoothly along λ. Shares whose correctness and whose length
    are monotone (non-decreasing, or in either direction); per query the λ of its first change of
    correctness (`switch_lam`, the first λ after the change, with its direction), how many
    changes it makes, and the first λ at which it thinks."""
    lams, ids, table = query_table(records)
    dc, dt = np.diff(table["correct"], axis=1), np.diff(table["tokens"], axis=1)
    changes = np.sum(dc != 0, axis=1)
    queries = []
    for q, qid in enumerate(ids):
        first = np.nonzero(dc[q])[0]
        thinks = np.nonzero(table["think"][q] >= 0.5)[0]
        queries.append({"id": qid, "changes": int(changes[q]),
                        "switch_lam": float(lams[first[0] + 1]) if first.size else None,
                        "switch_to": None if not first.size else ("right" if dc[q, first[0]] > 0 else "wrong"),
                        "think_lam": float(lams[thinks[0]]) if thinks.size else None})
    correct_up, correct_mono = _direction_share(dc)
    length_up, length_mono = _direction_share(dt)
    return {"n_queries": len(ids), "correct_nondecreasing": correct_up, "correct_monotone": correct_mono,
            "length_nondecreasing": length_up, "length_monotone": length_mono,
            "changes": {"0": float(np.mean(changes == 0)), "1": float(np.mean(changes == 1)),
                        ">1": float(np.mean(changes > 1))},
            "queries": queries}
