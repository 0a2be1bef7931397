"""Pareto plot of accuracy against generated tokens.

Draws with matplotlib's Agg canvas directly (no pyplot, no global backend
switch), so it works headless and does not disturb other figures.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np


def pareto_front(tokens: Sequence[float], accuracy: Sequence[float]) -> np.ndarray:
    """Indices of the non-dominated points (fewer tokens and higher accuracy are
    better), sorted by tokens."""
    t = np.asarray(tokens, dtype=np.float64)
    a = np.asarray(accuracy, dtype=np.float64)
    if t.shape != a.shape or t.ndim != 1:
        raise ValueError(f"pareto_front: tokens and accuracy must be 1-D of one length, got {t.shape} and {a.shape}")
    order = np.lexsort((-a, t))  # by tokens, then best accuracy first
    front, best = [], -np.inf
    for i in order:
        if a[i] > best:
            front.append(i)
            best = a[i]
    return np.asarray(front, dtype=np.int64)


def _check_xy(name: str, tokens: float, acc: float) -> None:
    if not (np.isfinite(tokens) and np.isfinite(acc)):
        raise ValueError(f"pareto_plot: {name} has non-finite (tokens, accuracy) = ({tokens}, {acc})")


def pareto_plot(
    points: Mapping[str, tuple[float, float]],
    curve: Sequence[tuple[float, float, float]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    xlabel: str = "mean generated tokens",
    ylabel: str = "accuracy",
    log_x: bool = False,
) -> str:
    """Save a tokens (x) vs accuracy (y) plot to `path` (format from the suffix).

    `points`: policy label -> (tokens, accuracy), drawn as labelled markers.
    `curve`: static-λ sweep as (λ, tokens, accuracy) triples, drawn as a line in
    λ order with each point labelled by its λ. The Pareto front of all points is
    drawn dashed. Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not points and not curve:
        raise ValueError("pareto_plot: nothing to draw (no points and no curve)")
    curve = sorted((tuple(map(float, c)) for c in curve), key=lambda c: c[0])
    for lam, tok, acc in curve:
        _check_xy(f"curve point λ={lam}", tok, acc)
    for label, (tok, acc) in points.items():
        _check_xy(f"point {label!r}", tok, acc)

    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if curve:
        _, toks, accs = zip(*curve)
        ax.plot(toks, accs, "o-", color="tab:gray", label="static λ", zorder=1)
        for lam, tok, acc in curve:
            ax.annotate(f"λ={lam:g}", (tok, acc), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color="tab:gray")
    colors = [f"C{i}" for i in range(10)]
    for i, (label, (tok, acc)) in enumerate(points.items()):
        ax.scatter([tok], [acc], marker="*", s=120, color=colors[i % 10], label=label, zorder=3)
        ax.annotate(label, (tok, acc), textcoords="offset points", xytext=(5, 5), fontsize=8)

    all_t = [c[1] for c in curve] + [float(p[0]) for p in points.values()]
    all_a = [c[2] for c in curve] + [float(p[1]) for p in points.values()]
    front = pareto_front(all_t, all_a)
    if len(front) > 1:
        ax.plot(np.asarray(all_t)[front], np.asarray(all_a)[front], "--", color="black",
                linewidth=0.8, alpha=0.6, label="Pareto front", zorder=2)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.margins(x=0.08, y=0.08)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=150)
    return path
