"""DAMI-Pref step 2 (DESIGN 1.3): preference pairs over the λ grid from rollout statistics.

For query q and grid points a, b with accuracy acc and cost (mean generated tokens):

    a ≻ b  iff  acc_a > acc_b + ε_acc
            or  |acc_a − acc_b| ≤ ε_acc  and  cost_a < (1 − ε_cost)·cost_b

Everything else (equal accuracy and costs within the ε_cost margin) is a tie and
gives no pair. The rules are antisymmetric, so at most one of a ≻ b, b ≻ a holds.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Preferences:
    query: np.ndarray  # (P,) int32 prompt index
    win: np.ndarray  # (P,) float32 λ of the preferred grid point
    lose: np.ndarray  # (P,) float32 λ of the other

    def __len__(self) -> int:
        return int(self.query.shape[0])

    def subset(self, mask) -> "Preferences":
        return Preferences(self.query[mask], self.win[mask], self.lose[mask])


def prefers(acc_a, cost_a, acc_b, cost_b, eps_acc: float, eps_cost: float):
    """Elementwise bool: a ≻ b under the rules above (numpy broadcasting)."""
    acc_a, acc_b = np.asarray(acc_a, np.float64), np.asarray(acc_b, np.float64)
    cost_a, cost_b = np.asarray(cost_a, np.float64), np.asarray(cost_b, np.float64)
    better = acc_a > acc_b + eps_acc
    close = np.abs(acc_a - acc_b) <= eps_acc
    return better | (close & (cost_a < (1.0 - eps_cost) * cost_b))


def preference_pairs(acc_ql, cost_ql, lams, eps_acc: float = 0.0, eps_cost: float = 0.1) -> Preferences:
    """Every ordered pair (q, λ_w, λ_l) with λ_w ≻ λ_l, from (Q, L) accuracy and cost tables."""
    acc_ql, cost_ql = np.asarray(acc_ql, np.float64), np.asarray(cost_ql, np.float64)
    lams = np.asarray(lams, np.float32)
    if acc_ql.ndim != 2 or acc_ql.shape != cost_ql.shape or acc_ql.shape[1] != lams.shape[0]:
        raise ValueError(f"acc {acc_ql.shape} and cost {cost_ql.shape} must both be (Q, L) with "
                         f"L = {lams.shape[0]} grid points")
    if not (0.0 <= eps_acc < 1.0 and 0.0 <= eps_cost < 1.0):
        raise ValueError(f"eps_acc and eps_cost must be in [0, 1), got {eps_acc}, {eps_cost}")
    # (Q, L_a, L_b): a ≻ b.
    win = prefers(acc_ql[:, :, None], cost_ql[:, :, None], acc_ql[:, None, :], cost_ql[:, None, :],
                  eps_acc, eps_cost)
    q, a, b = np.nonzero(win)
    return Preferences(q.astype(np.int32), lams[a], lams[b])


def split_by_query(prefs: Preferences, n_queries: int, heldout_share: float, seed: int):
    """(train, held-out, held-out query ids): whole queries are held out, never single pairs."""
    n_held = max(1, int(round(heldout_share * n_queries)))
    held = np.sort(np.random.default_rng(seed).permutation(n_queries)[:n_held])
    is_held = np.isin(prefs.query, held)
    return prefs.subset(~is_held), prefs.subset(is_held), held
