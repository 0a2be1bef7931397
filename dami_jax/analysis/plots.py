"""The analyses' figures, drawn like eval/plots.py: matplotlib's Agg canvas directly (no pyplot,
no global backend), small PNGs."""

from __future__ import annotations

import os

import numpy as np

DPI = 100


def _figure(width: float, height: float, panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def frontier_plot(report: dict, continuity: dict, path: str, title: str = "") -> str:
    """Accuracy vs tokens with the chord and the hull; accuracy, thinking share and stage
    boundaries vs λ; the queries' switch λ."""
    pts = report["points"]
    lam = np.array([p["lam"] for p in pts])
    acc = np.array([p["accuracy"] for p in pts])
    tok = np.array([p["mean_tokens"] for p in pts])
    share = np.array([p["think_share"] for p in pts])
    fig, (ax1, ax2, ax3) = _figure(12, 3.6, 3)
    ax1.plot(tok, acc, "o-", color="tab:gray", label="static λ", zorder=2)
    for l, t, a in zip(lam, tok, acc):
        ax1.annotate(f"{l:g}", (t, a), textcoords="offset points", xytext=(4, -10), fontsize=7, color="tab:gray")
    ax1.plot(tok[[0, -1]], acc[[0, -1]], ":", color="tab:red", label="chord λ=0..1")
    hull = [int(np.nonzero(lam == h)[0][0]) for h in report["hull_lams"]]
    ax1.plot(tok[hull], acc[hull], "--", color="black", linewidth=0.8, label="hull")
    verdict = f"convex={report['convex']}, acc monotone={report['monotone']['accuracy']['monotone']}"
    ax1.set(xlabel="mean generated tokens", ylabel="accuracy", title=verdict)
    ax1.legend(fontsize=7, loc="lower right")
    ax2.plot(lam, acc, "o-", label="accuracy")
    ax2.plot(lam, share, "s-", label="thinking share")
    for level, at in report["stages"].items():
        if at is not None:
            ax2.axvline(at, color="tab:gray", linewidth=0.7, linestyle="--")
            ax2.annotate(f"{level}", (at, 0.02), fontsize=7, color="tab:gray")
    ax2.set(xlabel="λ", ylabel="share", title="stages (thinking share 0.1/0.5/0.9)")
    ax2.legend(fontsize=7)
    switches = [q["switch_lam"] for q in continuity["queries"] if q["switch_lam"] is not None]
    mid = (lam[:-1] + lam[1:]) / 2  # one bin per grid λ
    ax3.hist(switches, bins=np.concatenate([[2 * lam[0] - mid[0]], mid, [2 * lam[-1] - mid[-1]]]), color="tab:blue")
    ax3.set(xlabel="switch λ (first change of correctness)", ylabel="queries",
            title=f"monotone correctness {continuity['correct_monotone']:.2f}, length {continuity['length_monotone']:.2f}")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def cka_heatmaps(maps: dict[str, tuple[list[str], np.ndarray]], path: str, title: str = "") -> str:
    """One (layer × λ) heatmap per entry of maps ({title: (column labels, (columns, layers) array)}),
    on one colour scale from the lowest value (down to a multiple of 0.05) to 1."""
    low = min(float(np.nanmin(np.asarray(grid))) for _, grid in maps.values())
    vmin = min(np.floor(low * 20) / 20, 0.95)
    fig, axes = _figure(4 * len(maps), 3.4, len(maps))
    for ax, (name, (labels, grid)) in zip(axes, maps.items()):
        grid = np.asarray(grid)
        im = ax.imshow(grid.T, origin="lower", aspect="auto", vmin=vmin, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(grid.shape[0]), labels, fontsize=6, rotation=90)
        ax.set(xlabel="λ", ylabel="layer (0: embeddings)", title=name)
        ax.title.set_fontsize(8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def barrier_plot(lams, losses: dict[str, dict[str, np.ndarray]], path: str) -> str:
    """One panel per text set: L(λ) per path, each with its endpoints' chord dotted."""
    lams = np.asarray(lams)
    fig, axes = _figure(4.4 * len(losses), 3.4, len(losses))
    for ax, (texts, by_path) in zip(axes, losses.items()):
        for i, (name, loss) in enumerate(by_path.items()):
            loss = np.asarray(loss)
            ax.plot(lams, loss, "o-", color=f"C{i}", markersize=3, label=name)
            ax.plot(lams[[0, -1]], loss[[0, -1]], ":", color=f"C{i}", linewidth=0.8)
        ax.set(xlabel="λ", ylabel="mean NLL per token", title=f"texts: {texts}")
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def think_ratio_plot(groups: dict[str, dict[str, dict]], path: str, title: str = "") -> str:
    """Thinking share and mean tokens vs λ, one line per group ({group: {λ: cell}})."""
    fig, (ax1, ax2) = _figure(9, 3.4, 2)
    for name, cells in groups.items():
        lam = [float(k) for k in cells]
        ax1.plot(lam, [c["think_share"] for c in cells.values()], "o-", markersize=3, label=name)
        ax2.plot(lam, [c["mean_tokens"] for c in cells.values()], "o-", markersize=3, label=name)
    ax1.set(xlabel="λ", ylabel="thinking share")
    ax2.set(xlabel="λ", ylabel="mean generated tokens")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)
