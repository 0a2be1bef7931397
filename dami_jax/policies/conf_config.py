"""ConfConfig: the settings of DAMI-Conf and the routing baseline (scoring, calibration, exclusions).

The dataclass holds every default; configs/policy_conf.yaml is an example of it.
"""

from __future__ import annotations

import dataclasses
import math
import os

from dami_jax.config import ConfigError, load_yaml
from dami_jax.thinking import THINK_END, THINK_START

SIGNALS = ("entropy", "js", "maxprob")  # each has a weight field w_<signal>


@dataclasses.dataclass(frozen=True)
class ConfConfig:
    probe_tokens: int = 16  # P
    aggregate: str = "mean"  # over content positions: "mean" or "max"
    # Both signals, equal weight, until a pair's own measurement says otherwise (DESIGN 1.2). The toy
    # pair uses w_D = 0 (JS was weak there: configs/policy_conf.yaml, eval.pairs.toy_pair_config).
    w_entropy: float = 0.5  # w_A
    w_js: float = 0.5  # w_D (0 skips the Thinking model's scoring pass)
    w_maxprob: float = 0.0  # w_M
    lam_min: float = 0.0
    lam_max: float = 1.0
    rho: float = 0.5  # target share of "hard" queries: μ = quantile of s at 1 − ρ
    tau_per_iqr: float = 1.0 / (2.0 * math.log(3.0))  # τ = tau_per_iqr · IQR(s)
    min_tau: float = 1e-4
    route_share: float = 0.5  # routing baseline: share of queries sent to Thinking
    exclude_special: bool = True  # tokenizer.all_special_ids + added tokens flagged special
    exclude_added: bool = True  # tokenizer.get_added_vocab()
    exclude_tokens: tuple[str, ...] = (THINK_START, THINK_END)
    exclude_ids: tuple[int, ...] = ()
    batch_size: int = 32
    calibration: str | None = None  # default calibration JSON for `conf` / `routing`

    def __post_init__(self):
        checks = [
            (self.probe_tokens >= 1, "probe_tokens must be >= 1"),
            (self.aggregate in ("mean", "max"), "aggregate must be 'mean' or 'max'"),
            (all(math.isfinite(w) for w in self.weights), "weights must be finite"),
            (0.0 <= self.lam_min <= self.lam_max <= 1.0, "need 0 <= lam_min <= lam_max <= 1"),
            (0.0 < self.rho < 1.0, "rho must be in (0, 1)"),
            (self.tau_per_iqr > 0 and self.min_tau > 0, "tau_per_iqr and min_tau must be > 0"),
            (0.0 <= self.route_share <= 1.0, "route_share must be in [0, 1]"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"ConfConfig: {msg} (got {self})")

    @property
    def weights(self) -> tuple[float, float, float]:
        return (self.w_entropy, self.w_js, self.w_maxprob)


def load_conf_config(path: str | os.PathLike | None = None, overrides=()) -> ConfConfig:
    """A ConfConfig YAML (none: the dataclass defaults) + dotted overrides such as `rho=0.7`."""
    return load_yaml(ConfConfig, path, overrides)
