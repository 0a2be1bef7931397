"""`static:<λ>`: one λ for every query (0 Instruct, 1 Thinking, 0.8 "MI-0.8")."""

from __future__ import annotations

import math

import numpy as np

from dami_jax.config import ConfigError
from dami_jax.policies.base import Policy, PolicyResult, register_policy


class StaticPolicy(Policy):
    def __init__(self, lam: float):
        if isinstance(lam, bool) or not isinstance(lam, (int, float, np.floating, np.integer)):
            raise ConfigError(f"static policy: lam must be a number in [0, 1], got {lam!r}")
        lam = float(lam)
        if math.isnan(lam) or not 0.0 <= lam <= 1.0:
            raise ConfigError(f"static policy: lam={lam} is outside [0, 1]")
        self.lam = lam
        self.spec = f"static:{lam:g}"

    def __call__(self, prompts, pair=None, **pixel_inputs) -> PolicyResult:  # λ does not read the prompts
        return PolicyResult(np.full((len(prompts),), self.lam, np.float32), {})

    def __repr__(self) -> str:
        return f"StaticPolicy(lam={self.lam:g})"


def _parse(args: list[str]) -> dict:
    if len(args) != 1:
        raise ValueError("expected static:<λ>, e.g. static:0.8")
    try:
        return {"lam": float(args[0])}
    except ValueError:
        raise ValueError(f"λ must be a number in [0, 1], got {args[0]!r}") from None


def make_static(pair=None, lam: float | None = None) -> StaticPolicy:
    if lam is None:
        raise ConfigError("static policy needs lam, e.g. 'static:0.8' or {name: static, lam: 0.8}")
    return StaticPolicy(lam)


register_policy("static", make_static, _parse)
