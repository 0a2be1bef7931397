"""λ policies (DESIGN 1.1): one interface, `policy(prompts, pair, **pixel_inputs) -> PolicyResult`
(pixel_inputs: a Qwen3-VL batch's images, as `generate_pair` takes them; none for text).

    policy = build_policy("static:0.8")                 # or "conf:PATH", "routing:0.3:PATH", "deer:0.95", a dict
    result = policy(prompts, pair)                       # result.lam (B,), result.info {name: (B,)}
    cal = calibrate_conf(pair, calibration_prompts)      # DAMI-Conf μ, τ without labels
    cal.save(PATH)
"""

from dami_jax.policies.base import (
    MODULES, Policy, PolicyResult, build_policy, known_policies, pair_fingerprint, register_policy,
)
from dami_jax.policies.calibrate import calibrate_conf, fit_conf_supervised, logistic_fit, quantile_calibration
from dami_jax.policies.calibration import Calibration, resolve_calibration
from dami_jax.policies.conf import ConfPolicy, ScoreCoeffs, conf_signals, score_prompts
from dami_jax.policies.conf_config import ConfConfig, load_conf_config
from dami_jax.policies.deer_config import DeerConfig
from dami_jax.policies.routing import RoutingPolicy, routing_threshold
from dami_jax.policies.static import StaticPolicy

__all__ = [
    "MODULES", "Calibration", "ConfConfig", "ConfPolicy", "DeerConfig", "Policy", "PolicyResult", "RoutingPolicy",
    "ScoreCoeffs", "StaticPolicy", "build_policy", "calibrate_conf", "conf_signals", "fit_conf_supervised",
    "known_policies", "load_conf_config", "logistic_fit", "pair_fingerprint", "quantile_calibration",
    "register_policy", "resolve_calibration", "routing_threshold", "score_prompts",
]
