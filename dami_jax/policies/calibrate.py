"""Calibrating the Conf score s(q): the μ and τ of a `Calibration` (calibration.py).

Without labels (`calibrate_conf`): μ = quantile of s at 1 − ρ, so a share ρ of the
calibration queries gets λ above the midpoint; τ = IQR(s)/(2·ln 3). That τ is
the scale of the logistic distribution whose quartiles match those of s (a
logistic with scale τ has IQR = 2τ·ln 3), so with ρ = 0.5, σ((s − μ)/τ) is the
fitted CDF of s: λ tracks the query's rank among the calibration queries, and
the middle half of them spans σ ∈ [1/4, 3/4] of [λ_min, λ_max].

With labels (`fit_conf_supervised`, 1 = the Instruct model answers wrong): a
ridge logistic regression p(wrong) = σ(w·x + b) on the signals x; written as
weights w/‖w‖₁, τ = 1/‖w‖₁, μ = −b/‖w‖₁ so that σ((s − μ)/τ) = σ(w·x + b).

Every calibration stores the pair's fingerprint (refused on another pair), its
ConfConfig (the policy scores with it) and the sorted calibration scores (the
routing baseline takes its threshold from them).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dami_jax.errors import InputError
from dami_jax.policies.base import pair_fingerprint
from dami_jax.policies.calibration import Calibration
from dami_jax.policies.conf import score_prompts
from dami_jax.policies.conf_config import SIGNALS, ConfConfig, load_conf_config


def quantile_calibration(scores, rho: float, tau_per_iqr: float, min_tau: float) -> tuple[float, float]:
    """(μ, τ): μ = quantile of s at 1 − ρ, τ = max(tau_per_iqr · IQR(s), min_tau)."""
    s = np.asarray(scores, np.float64)
    if s.ndim != 1 or s.size < 2 or not np.isfinite(s).all():
        raise InputError(f"calibration needs >= 2 finite scores, got {s.size}")
    q25, q75 = np.quantile(s, [0.25, 0.75])
    return float(np.quantile(s, 1.0 - rho)), float(max(tau_per_iqr * (q75 - q25), min_tau))


def calibrate_conf(pair, prompts, cfg: ConfConfig | None = None) -> Calibration:
    """Unsupervised calibration of μ and τ on `prompts` (no labels)."""
    cfg = cfg or load_conf_config()
    s = sharded_scores(pair, prompts, cfg)
    mu, tau = quantile_calibration(s, cfg.rho, cfg.tau_per_iqr, cfg.min_tau)
    return Calibration(mu, tau, cfg, pair_fingerprint(pair), tuple(sorted(map(float, s))))


def sharded_scores(pair, prompts, cfg: ConfConfig) -> np.ndarray:
    """s(q) of every prompt; under several processes each scores its shard (whole scoring batches, so
    the scores are those of one process) and all get every score."""
    from dami_jax import distributed

    def score(shard):
        return [float(x) for x in score_prompts(pair, shard, cfg)["score"]]

    return np.asarray(distributed.map_sharded(score, prompts, block=cfg.batch_size), np.float64)


def logistic_fit(x_nf, y_n, l2: float = 1e-3, iters: int = 50) -> tuple[np.ndarray, float]:
    """Ridge logistic regression by Newton steps on standardized features; (w, b) in raw units."""
    x, y = np.asarray(x_nf, np.float64), np.asarray(y_n, np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-12
    z = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], 1)
    theta, reg = np.zeros(z.shape[1]), np.diag([l2] * x.shape[1] + [0.0]) * len(x)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-z @ theta))
        grad = z.T @ (p - y) + reg @ theta
        hess = (z * (p * (1 - p))[:, None]).T @ z + reg + 1e-9 * np.eye(len(theta))
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    w = theta[:-1] / std
    return w, float(theta[-1] - w @ mean)


def fit_conf_supervised(pair, prompts, wrong, cfg: ConfConfig | None = None,
                        signals=("entropy", "js"), l2: float = 1e-3) -> Calibration:
    """(w, μ, τ) by logistic regression of `wrong` (Instruct answer wrong: 1) on `signals`."""
    cfg = cfg or load_conf_config()
    bad = sorted(set(signals) - set(SIGNALS))
    if bad or not signals:
        raise InputError(f"signals must be a non-empty subset of {SIGNALS}, got {signals}")
    y = np.asarray(wrong, np.float64)
    if y.shape != (len(prompts),) or not set(np.unique(y)) <= {0.0, 1.0} or len(np.unique(y)) < 2:
        raise InputError("wrong must hold one 0/1 label per prompt, with both classes present")
    out = score_prompts(pair, prompts, cfg, with_js="js" in signals)
    w, b = logistic_fit(np.stack([out[k] for k in signals], 1), y, l2)
    scale = float(np.abs(w).sum())
    if scale == 0.0:
        raise InputError("the logistic fit gave all-zero weights: the signals do not separate the labels")
    named = dict(zip(signals, w / scale))
    new = dataclasses.replace(cfg, **{f"w_{k}": float(named.get(k, 0.0)) for k in SIGNALS})
    s = sum(named[k] * out[k] for k in signals)
    return Calibration(-b / scale, 1.0 / scale, new, pair_fingerprint(pair), tuple(sorted(map(float, s))),
                       method="logistic")
