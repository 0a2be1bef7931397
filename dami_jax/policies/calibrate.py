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
from dami_jax.models.qwen3_vl import select_rows
from dami_jax.policies.base import pair_fingerprint, pixel_inputs_of
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


def calibrate_conf(pair, prompts, cfg: ConfConfig | None = None, **pixel_inputs) -> Calibration:
    """Unsupervised calibration of μ and τ on `prompts` (no labels); pixel_inputs: their Qwen3-VL
    images, as `generate_pair` takes them."""
    cfg = cfg or load_conf_config()
    scores = sharded_signals(pair, prompts, cfg, **pixel_inputs)["score"]
    return calibration_from_scores(scores, cfg, pair_fingerprint(pair))


def sharded_signals(pair, prompts, cfg: ConfConfig, with_js: bool | None = None,
                    **pixel_inputs) -> dict[str, np.ndarray]:
    """`score_prompts`' score and signals of every prompt (float64). Under several processes
    (dami_jax/distributed.py) each scores its shard, whole scoring batches so that the numbers are
    those one process gets, and every process gets them all."""
    from dami_jax import distributed

    keys = ("score", *SIGNALS)
    pixels = pixel_inputs_of(pixel_inputs)

    def score(shard):  # prompt indices
        shard_pixels = select_rows(pair.cfg, prompts, pixels, shard) if pixels else {}
        out = score_prompts(pair, [prompts[i] for i in shard], cfg, with_js=with_js, **shard_pixels)
        return [[float(out[k][i]) for k in keys] for i in range(len(shard))]

    rows = np.asarray(distributed.map_sharded(score, list(range(len(prompts))), block=cfg.batch_size), np.float64)
    return {k: rows[:, j] for j, k in enumerate(keys)}


def calibration_from_scores(scores, cfg: ConfConfig, fingerprint: str) -> Calibration:
    """The unsupervised calibration of the scores s of `score_prompts` (what `calibrate_conf` saves)."""
    mu, tau = quantile_calibration(scores, cfg.rho, cfg.tau_per_iqr, cfg.min_tau)
    return Calibration(mu, tau, cfg, fingerprint, tuple(sorted(map(float, scores))))


def _ranks(x) -> np.ndarray:
    """Average ranks (ties share theirs), for Spearman correlations."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):  # ties: the mean of their ranks
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x, y) -> float:
    """Rank correlation; NaN when either side is constant."""
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def auroc(score, positive) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U)."""
    score, positive = np.asarray(score, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((_ranks(score)[positive].sum() - n_pos * (n_pos - 1) / 2) / (n_pos * n_neg))


def signal_summary(out: dict, wrong=None) -> dict:
    """Per Conf signal (entropy A, JS D, max-prob M) over a calibration set: mean, std, quartiles,
    its Spearman correlation with the other signals and with the score s, and (with labels:
    1 = the Instruct model answers wrong) its AUROC. Label-free, a signal whose spread is nil or that
    only repeats another (Spearman near 1) adds nothing; with labels, AUROC says which one predicts."""
    rows = {}
    for k in SIGNALS:
        x = np.asarray(out[k], np.float64)
        if not np.isfinite(x).all():  # not measured (D while w_D = 0)
            continue
        q25, q50, q75 = np.quantile(x, [0.25, 0.5, 0.75])
        row = dict(mean=float(x.mean()), std=float(x.std()), q25=float(q25), median=float(q50), q75=float(q75),
                   spearman_score=spearman(x, out["score"]))
        row.update({f"spearman_{o}": spearman(x, out[o]) for o in SIGNALS
                    if o != k and np.isfinite(np.asarray(out[o], np.float64)).all()})
        if wrong is not None:
            row["auroc_wrong"] = auroc(x, wrong)
        rows[k] = row
    return rows


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
                        signals=("entropy", "js"), l2: float = 1e-3, **pixel_inputs) -> Calibration:
    """(w, μ, τ) by logistic regression of `wrong` (Instruct answer wrong: 1) on `signals`;
    pixel_inputs: the prompts' Qwen3-VL images, as `generate_pair` takes them."""
    cfg = cfg or load_conf_config()
    bad = sorted(set(signals) - set(SIGNALS))
    if bad or not signals:
        raise InputError(f"signals must be a non-empty subset of {SIGNALS}, got {signals}")
    y = np.asarray(wrong, np.float64)
    if y.shape != (len(prompts),) or not set(np.unique(y)) <= {0.0, 1.0} or len(np.unique(y)) < 2:
        raise InputError("wrong must hold one 0/1 label per prompt, with both classes present")
    out = score_prompts(pair, prompts, cfg, with_js="js" in signals, **pixel_inputs)
    w, b = logistic_fit(np.stack([out[k] for k in signals], 1), y, l2)
    scale = float(np.abs(w).sum())
    if scale == 0.0:
        raise InputError("the logistic fit gave all-zero weights: the signals do not separate the labels")
    named = dict(zip(signals, w / scale))
    new = dataclasses.replace(cfg, **{f"w_{k}": float(named.get(k, 0.0)) for k in SIGNALS})
    s = sum(named[k] * out[k] for k in signals)
    return Calibration(-b / scale, 1.0 / scale, new, pair_fingerprint(pair), tuple(sorted(map(float, s))),
                       method="logistic")
