"""λ schedules: a multiplier of λ per module kind and layer range (mergekit-style).

A schedule is a pure function of the param path. For a leaf matched by a rule
the effective λ is `λ · scale`; unmatched leaves use `default` (1.0: plain
interpolation). The last matching rule wins. Example YAML:

    default: 0.0          # everything stays Instruct ...
    rules:
      - kinds: [mlp, experts]
        layers: [12, null]  # ... except MLPs of layers 12.. (null: to the end)
        scale: 1.0
      - kinds: [attn]
        fraction: [0.333, 1.0]   # last two thirds of the layers
        scale: 0.5

Kinds: embed, attn, norm, mlp (dense MLP), experts (MoE expert weights),
router, lm_head, vision (Qwen3-VL's whole vision tower; layer ranges select text layers only).
"""

from __future__ import annotations

import dataclasses

import yaml

from dami_jax.config import ConfigError, from_dict

KINDS = ("embed", "attn", "norm", "mlp", "experts", "router", "lm_head", "vision")


def module_kind(path: tuple) -> str:
    """The module kind of a param path of the Qwen3 params tree."""
    top, last = path[0], path[-1]
    if top == "visual":
        return "vision"
    if top == "embed":
        return "embed"
    if top == "lm_head":
        return "lm_head"
    if last == "scale":
        return "norm"
    if "attn" in path:
        return "attn"
    if "router" in path:
        return "router"
    if "mlp" in path:
        return "mlp" if last in ("kernel", "bias") else "experts"
    raise ValueError(f"unknown param path {path}")


@dataclasses.dataclass(frozen=True)
class Rule:
    kinds: tuple[str, ...] = KINDS
    layers: tuple[int | None, ...] | None = None  # [start, stop) layer indices; negatives count back
    fraction: tuple[float, ...] | None = None  # [lo, hi) as a fraction of the depth
    scale: float = 1.0

    def __post_init__(self):
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown:
            raise ConfigError(f"schedule rule: unknown kind(s) {unknown}; expected some of {list(KINDS)}")
        if self.layers is not None and len(self.layers) != 2:
            raise ConfigError(f"schedule rule: layers must be [start, stop], got {list(self.layers)}")
        if self.fraction is not None and (len(self.fraction) != 2 or not 0 <= self.fraction[0] <= self.fraction[1] <= 1):
            raise ConfigError(f"schedule rule: fraction must be [lo, hi] within [0, 1], got {self.fraction}")

    def matches(self, path: tuple, num_layers: int) -> bool:
        if module_kind(path) not in self.kinds:
            return False
        layer = path[1] if path[0] == "layers" else None
        if self.layers is None and self.fraction is None:
            return True
        if layer is None:  # layer ranges select only per-layer params
            return False
        if not isinstance(layer, int) and not str(layer).isdigit():
            raise ValueError("a schedule with layer ranges needs per-layer params, not stacked ones "
                             "(models.qwen3.stack_layers): interpolate unstacked params, then stack")
        layer = int(layer)
        if self.layers is not None:
            start, stop = self.layers
            if not layer in range(num_layers)[slice(start, stop)]:
                return False
        if self.fraction is not None:
            lo, hi = self.fraction
            if not (lo * num_layers <= layer < hi * num_layers or (hi == 1.0 and layer == num_layers - 1)):
                return False
        return True


@dataclasses.dataclass(frozen=True)
class Schedule:
    num_layers: int
    default: float = 1.0
    rules: tuple[Rule, ...] = ()

    def scale(self, path: tuple) -> float:
        out = self.default
        for rule in self.rules:
            if rule.matches(path, self.num_layers):
                out = rule.scale
        return float(out)

    @classmethod
    def from_yaml(cls, path: str, num_layers: int) -> "Schedule":
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        return cls.from_dict(data, num_layers, where=path)

    @classmethod
    def from_dict(cls, data: dict, num_layers: int, where: str = "schedule") -> "Schedule":
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping with 'default' and 'rules'")
        return from_dict(cls, {**data, "num_layers": num_layers}, where=where)
