"""DAMI-Routing baseline (RouteLLM-style): λ ∈ {0, 1}, the Conf score thresholded.

The threshold is the quantile of the calibration scores s at 1 − share, so a
`share` of the calibration queries goes to the Thinking model (λ = 1) and the
rest to the Instruct model (λ = 0). It uses the Conf calibration file (its
ConfConfig and sorted scores); μ and τ play no part.

Specs: `routing`, `routing:<share>`, `routing:<path>`, `routing:<share>:<path>`;
the share defaults to the calibration's `route_share`.
"""

from __future__ import annotations

import math

import numpy as np

from dami_jax.config import ConfigError
from dami_jax.policies.base import Policy, PolicyResult, register_policy
from dami_jax.policies.calibration import resolve_calibration
from dami_jax.policies.conf import finished_probes, score_prompts

INFO = ("score", "entropy", "js", "maxprob", "n_content", "probe_len")


def routing_threshold(scores, share: float) -> float:
    """Route s > threshold to Thinking; share 0 -> +inf (never), share 1 -> -inf (always)."""
    if not 0.0 <= share <= 1.0 or math.isnan(share):
        raise ConfigError(f"routing share must be in [0, 1], got {share}")
    if share == 0.0:
        return math.inf
    if share == 1.0:
        return -math.inf
    s = np.asarray(scores, np.float64)
    if s.size == 0:
        raise ConfigError("routing needs calibration scores; the calibration holds none")
    return float(np.quantile(s, 1.0 - share))


class RoutingPolicy(Policy):
    def __init__(self, calibration, share: float | None = None, path: str | None = None):
        self.calibration = calibration
        self.share = float(calibration.conf.route_share if share is None else share)
        self.threshold = routing_threshold(calibration.scores, self.share)
        self.spec = f"routing:{self.share:g}" + (f":{path}" if path else "")

    def __call__(self, prompts, pair, **pixel_inputs) -> PolicyResult:
        cal = self.calibration
        cal.check(pair)
        out = score_prompts(pair, prompts, cal.conf, **pixel_inputs)
        lam = (out["score"] > self.threshold).astype(np.float32)
        info = {k: out[k] for k in INFO}
        info["threshold"] = np.full(lam.shape, self.threshold, np.float32)
        return PolicyResult(lam, info, finished_probes(out, pair.stop_tokens))


def _parse(args: list[str]) -> dict:
    try:
        share, rest = float(args[0]), args[1:]
    except ValueError:
        share, rest = None, args
    options = {} if share is None else {"share": share}
    if rest:
        options["calibration"] = ":".join(rest)
    return options


def make_routing(pair=None, share: float | None = None, calibration: str | None = None,
                 config: str | None = None) -> RoutingPolicy:
    cal, path = resolve_calibration(calibration, config, pair)
    return RoutingPolicy(cal, share, path)


register_policy("routing", make_routing, _parse)
