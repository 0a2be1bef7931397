"""Picking β, the risk knob of `pref` (policy.py), for a target accuracy drop, as ρ is picked for Conf.

On held-out queries we have rollouts (accuracy and mean tokens at each grid λ)
and the reward model's scores r(q, λ) on the policy's inference grid. For a
candidate β the policy picks λ*(q) = argmax r(q, λ) + β·λ; its accuracy and
tokens are read off the rollouts, linearly interpolated between grid points.
λ = 1 (Thinking) is the reference. The calibrated β is the smallest candidate
whose held-out accuracy is at most `target_drop` below λ = 1's: λ*(q) only
grows with β, so a smaller β spends fewer Thinking tokens.

Candidates are 0 and geometric ladders toward the two β past which every query
takes λ = 1 (or λ = 0); the top of the upper ladder picks λ = 1 everywhere, so
some candidate always meets the target.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dami_jax.errors import InputError
from dami_jax.pref.policy import tilted_choice

LADDER = np.geomspace(1e-4, 1.0, 200)


@dataclasses.dataclass(frozen=True)
class BetaCalibration:
    beta: float
    target_drop: float
    accuracy: float  # held-out, at β (rollout accuracy at the chosen λ, interpolated)
    reference_accuracy: float  # λ = 1 on the same queries
    mean_lam: float
    mean_tokens: float
    reference_tokens: float
    n_queries: int


def interp_rows(x_b, xs_l, ys_bl) -> np.ndarray:
    """Row b of ys linearly interpolated at x_b[b] over the sorted grid xs (clamped at its ends)."""
    x_b, xs_l, ys_bl = (np.asarray(a, np.float64) for a in (x_b, xs_l, ys_bl))
    hi = np.clip(np.searchsorted(xs_l, x_b, side="right"), 1, len(xs_l) - 1)
    lo = hi - 1
    w = np.clip((x_b - xs_l[lo]) / (xs_l[hi] - xs_l[lo]), 0.0, 1.0)
    rows = np.arange(len(x_b))
    return (1 - w) * ys_bl[rows, lo] + w * ys_bl[rows, hi]


def _ends(scores_hk, grid_k) -> tuple[float, float]:
    """(β_lo, β_hi): below β_lo every row picks grid[0], above β_hi every row picks grid[-1]."""
    s, g = np.asarray(scores_hk, np.float64), np.asarray(grid_k, np.float64)
    hi = np.max((s[:, :-1] - s[:, -1:]) / (g[-1] - g[:-1]))
    lo = np.min((s[:, :1] - s[:, 1:]) / (g[1:] - g[0]))
    return float(lo), float(hi)


def read_rollouts(lam_h, acc_hl, cost_hl, lams_l) -> dict:
    """Held-out accuracy, mean tokens and mean λ when query h answers at lam_h[h] (interpolated)."""
    order = np.argsort(lams_l)
    lams, acc, cost = np.asarray(lams_l)[order], np.asarray(acc_hl)[:, order], np.asarray(cost_hl)[:, order]
    return {"accuracy": float(interp_rows(lam_h, lams, acc).mean()),
            "mean_tokens": float(interp_rows(lam_h, lams, cost).mean()), "mean_lam": float(np.mean(lam_h))}


def outcome(scores_hk, grid_k, acc_hl, cost_hl, lams_l, beta: float) -> dict:
    """`read_rollouts` of the policy tilted by β."""
    grid = np.asarray(grid_k, np.float32)
    lam = grid[tilted_choice(np.asarray(scores_hk, np.float32), grid, np.float32(beta))]
    return read_rollouts(lam, acc_hl, cost_hl, lams_l)


def calibrate_beta(scores_hk, grid_k, acc_hl, cost_hl, lams_l, target_drop: float) -> BetaCalibration:
    """The smallest candidate β whose held-out accuracy is >= λ = 1's − target_drop (module docstring).

    scores_hk: r(q, λ) of H held-out queries on the policy's inference grid grid_k (ascending, ending
    at 1); acc_hl, cost_hl: their rollout accuracy and mean tokens at the grid lams_l."""
    scores_hk, grid_k = np.asarray(scores_hk, np.float32), np.asarray(grid_k, np.float32)
    acc_hl, cost_hl, lams_l = np.asarray(acc_hl), np.asarray(cost_hl), np.asarray(lams_l, np.float64)
    if not 0.0 <= target_drop <= 1.0:
        raise InputError(f"target_drop must be in [0, 1], got {target_drop}")
    if scores_hk.ndim != 2 or scores_hk.shape[1] != grid_k.shape[0] or not len(scores_hk):
        raise InputError(f"scores {scores_hk.shape} must be (H >= 1, K) for the inference grid of {grid_k.shape[0]}")
    if acc_hl.shape != (len(scores_hk), len(lams_l)) or cost_hl.shape != acc_hl.shape:
        raise InputError(f"acc {acc_hl.shape} and cost {cost_hl.shape} must be (H, L) = "
                         f"({len(scores_hk)}, {len(lams_l)})")
    if not (np.all(np.diff(grid_k) > 0) and grid_k[-1] == 1.0):
        raise InputError("the inference grid must ascend and end at λ = 1")
    lo, hi = _ends(scores_hk, grid_k)
    top = abs(hi) * 1.001 + 1e-6  # strictly past β_hi: every row picks λ = 1
    bottom = -(abs(min(lo, 0.0)) * 1.001 + 1e-6)
    candidates = np.unique(np.concatenate([bottom * LADDER, [0.0], top * LADDER]))
    ref = read_rollouts(np.ones(len(scores_hk)), acc_hl, cost_hl, lams_l)  # λ = 1 everywhere
    for beta in candidates:
        got = outcome(scores_hk, grid_k, acc_hl, cost_hl, lams_l, float(beta))
        if got["accuracy"] >= ref["accuracy"] - target_drop - 1e-9:
            return BetaCalibration(float(beta), float(target_drop), got["accuracy"], ref["accuracy"],
                                   got["mean_lam"], got["mean_tokens"], ref["mean_tokens"], len(scores_hk))
    raise AssertionError("unreachable: the largest candidate picks λ = 1 everywhere")
