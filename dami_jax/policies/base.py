"""The λ-policy interface (DESIGN 1.1): prompts + a ModelPair -> one λ per prompt.

A policy is any callable `policy(prompts, pair, **pixel_inputs) -> PolicyResult`;
eval and serve treat all alike. pixel_inputs (keyword-only, optional): a Qwen3-VL
batch's images / video as `generate_pair` takes them (`pixel_values`,
`image_grid_thw`, `pixel_values_videos`, `video_grid_thw`, over the prompts' rows in
order); a policy whose λ reads the prompts' content (Conf, routing, Pref) sees them,
the others (static, budget, deer) do not need them (generation does: `execute.answer`).
`build_policy` makes one from a short string (`static:0.8`, `conf:PATH`,
`routing:0.3:PATH`, `deer:0.95`) or a dict (`{name: routing, share: 0.3}`).

Registry: `register_policy(name, factory, parse_arg)` adds a policy. Built-in
names map to the module that registers them, imported on first use, so a new
policy module (e.g. `pref`, `budget`) only calls `register_policy` at import and
adds its module to `MODULES`.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import importlib
import inspect
import json
from typing import Callable

import jax
import numpy as np

from dami_jax.config import ConfigError
from dami_jax.errors import InputError
from dami_jax.generate.decode import left_pad
from dami_jax.interpolate import check_lam
from dami_jax.models import qwen3_vl
from dami_jax.tree import path_keys

# name -> module that registers it when imported.
MODULES = {
    "static": "dami_jax.policies.static",
    "conf": "dami_jax.policies.conf",
    "routing": "dami_jax.policies.routing",
    "pref": "dami_jax.pref.policy",
    "budget": "dami_jax.policies.budget",
    "deer": "dami_jax.policies.deer",
}


@dataclasses.dataclass(frozen=True)
class PolicyResult:
    lam: np.ndarray  # (B,) float32 in [0, 1]
    info: dict  # name -> (B,) per-row diagnostics
    # Per row, the Instruct model's whole greedy answer (ending in a stop id) when choosing λ
    # already generated it (Conf's probe), else None: a greedy λ = 0 row answers with it.
    instruct_answers: tuple | None = None

    def __post_init__(self):
        lam = check_lam(self.lam, what="policy lam")
        if lam.ndim != 1:
            raise ValueError(f"policy lam must be (B,), got shape {lam.shape}")
        object.__setattr__(self, "lam", lam)
        for k, v in self.info.items():
            if np.shape(v)[:1] != lam.shape:
                raise ValueError(f"policy info {k!r} has shape {np.shape(v)}; expected a leading {lam.shape}")
        if self.instruct_answers is not None and len(self.instruct_answers) != lam.shape[0]:
            raise ValueError(f"policy instruct_answers has {len(self.instruct_answers)} rows for "
                             f"{lam.shape[0]} λ values")


class Policy(abc.ABC):
    """Maps a batch of prompts (token-id lists) and a ModelPair to λ per prompt."""

    spec: str = ""  # a string build_policy turns back into this policy (for records)

    @abc.abstractmethod
    def __call__(self, prompts: list[list[int]], pair, **pixel_inputs) -> PolicyResult: ...


def pixel_inputs_of(given: dict) -> dict:
    """The pixel keywords given (None values dropped); an unknown keyword is refused."""
    unknown = sorted(set(given) - set(qwen3_vl.PIXEL_KEYS))
    if unknown:
        raise InputError(f"unknown pixel input(s) {unknown}; expected some of {list(qwen3_vl.PIXEL_KEYS)}")
    return {k: v for k, v in given.items() if v is not None}


def padded_chunk(cfg, prompts: list[list[int]], start: int, count: int, rows: int, width: int, pixel_inputs: dict):
    """Prompts start..start+count left-padded to (rows, width), the last one repeated in the padding
    rows, and the `qwen3_vl.VisionInputs` of their images (None when they have none): what Conf's
    scoring and Pref's features run on. pixel_inputs: those of all `prompts`."""
    picked = list(range(start, start + count)) + [start + count - 1] * (rows - count)
    tokens, mask = left_pad([prompts[i] for i in picked], width)
    pixels = qwen3_vl.select_rows(cfg, prompts, pixel_inputs, picked) if pixel_inputs else {}
    return tokens, mask, qwen3_vl.batch_vision_inputs(cfg, tokens, mask, pixels)


@dataclasses.dataclass(frozen=True)
class _Entry:
    factory: Callable[..., Policy]  # factory(pair=None, **options)
    parse_arg: Callable[[list[str]], dict] | None  # "name:a:b" -> options from ["a", "b"]


_REGISTRY: dict[str, _Entry] = {}


def register_policy(name: str, factory: Callable[..., Policy],
                    parse_arg: Callable[[list[str]], dict] | None = None) -> None:
    """Register `name`: factory(pair=None, **options) and parse_arg(args) -> options."""
    _REGISTRY[name] = _Entry(factory, parse_arg)


def known_policies() -> list[str]:
    return sorted(set(MODULES) | set(_REGISTRY))


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY and name in MODULES:
        try:
            importlib.import_module(MODULES[name])
        except ModuleNotFoundError as e:
            if e.name != MODULES[name]:
                raise
            raise ConfigError(f"policy {name!r} is not implemented yet (no module {MODULES[name]})") from e
    if name not in _REGISTRY:
        raise ConfigError(f"unknown policy {name!r}; known policies: {', '.join(known_policies())}")
    return _REGISTRY[name]


def build_policy(spec: str | dict, pair=None) -> Policy:
    """A policy from `name[:arg[:arg]]` or a dict {name: ..., **options}."""
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, str):
        name, *args = spec.strip().split(":")
        entry = _entry(name)
        if args and entry.parse_arg is None:
            raise ConfigError(f"policy {name!r} takes no ':' argument, got {spec!r}")
        try:
            options = entry.parse_arg(args) if args else {}
        except (TypeError, ValueError) as e:
            raise ConfigError(f"policy spec {spec!r}: {e}") from e
    elif isinstance(spec, dict):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"policy dict needs a string 'name' (one of {known_policies()}), got {spec!r}")
        entry = _entry(name)
    else:
        raise ConfigError(f"policy spec must be a string or a dict, got {type(spec).__name__}")
    params = inspect.signature(entry.factory).parameters
    unknown = sorted(set(options) - set(params) - {"pair"})
    if unknown:
        expected = sorted(p for p in params if p != "pair")
        raise ConfigError(f"policy {name!r}: unknown option(s) {unknown}; expected some of {expected}")
    return entry.factory(pair=pair, **options)


# ---------------------------------------------------------------------------
# Fingerprint of a pair, for state (calibrations, reward models) tied to it.

def _leaf_sample(x) -> np.ndarray:
    """The first and last corner blocks (up to 8 per axis) of a leaf, as float32."""
    first = x[tuple(slice(0, 8) for _ in x.shape)]
    last = x[tuple(slice(-8, None) for _ in x.shape)]
    return np.concatenate([np.asarray(jax.device_get(b), np.float32).ravel() for b in (first, last)])


def _sampled_leaves(params, num_layers: int):
    """Leaves outside the layer stack, and those of the first and last layer."""
    keep = {"0", str(num_layers - 1)}
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda kv: str(kv[0])):
        keys = path_keys(path)
        if keys[0] != "layers" or keys[1] in keep:
            yield "/".join(keys), leaf


def pair_fingerprint(pair) -> str:
    """sha256 (16 hex) of the architecture, the stop ids and corner blocks of both models' weights
    (every leaf outside the layer stack and of the first and last layer).

    Values are hashed as float32 bytes, so a bfloat16 checkpoint loaded in bfloat16
    or in float32 has the same fingerprint.
    """
    h = hashlib.sha256(json.dumps(pair.cfg.architecture_fields(), sort_keys=True, default=str).encode())
    h.update(json.dumps(sorted(int(t) for t in pair.stop_tokens)).encode())
    for params in (pair.instruct, pair.thinking):
        for path, leaf in _sampled_leaves(params, pair.cfg.num_layers):
            h.update(path.encode())
            h.update(_leaf_sample(leaf).tobytes())
    return h.hexdigest()[:16]
