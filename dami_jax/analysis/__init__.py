"""The pilot study as tools (issue 19): is the static λ path smooth, connected and convex?

- `frontier`: monotonicity and convexity of the sweep's accuracy/tokens curve, the chord and the
  hull, the thinking stages, and per-query continuity (RQ3);
- `cka` / `states`: linear CKA of Θ(λ)'s hidden states against Θ(0), Θ(1) and the next λ, per layer;
- `barrier`: mean NLL of texts along λ (whole model or one part, `paths`) and the loss barrier;
- `think_ratio`: the thinking share and length by λ, benchmark and difficulty (RQ5);
- `commands`: `dami analyze ...`, each writing OUT/<name>.json and its figures (`plots`).
"""

from dami_jax.analysis.barrier import barrier_profile, loss_barrier, mean_nll
from dami_jax.analysis.cka import cka, cka_along_lam, linear_cka
from dami_jax.analysis.frontier import (chord_gaps, crossings, frontier_report, hull_gaps, lower_convex_hull,
                                        monotone, query_continuity, sweep_curve)
from dami_jax.analysis.paths import PATHS, path_schedule
from dami_jax.analysis.states import layer_states
from dami_jax.analysis.sweep import load_sweep, run_sweep
from dami_jax.analysis.think_ratio import think_ratio_report

__all__ = [
    "PATHS", "barrier_profile", "chord_gaps", "cka", "cka_along_lam", "crossings", "frontier_report", "hull_gaps",
    "layer_states", "linear_cka", "load_sweep", "loss_barrier", "lower_convex_hull", "mean_nll", "monotone",
    "path_schedule", "query_continuity", "run_sweep", "sweep_curve", "think_ratio_report",
]
