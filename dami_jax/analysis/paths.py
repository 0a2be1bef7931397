"""The interpolation paths a loss barrier is measured along: the whole model, or one part of it
(the Model Interpolation study's module ablations), as λ schedules (schedule.py).

On a partial path the other parameters stay the Instruct model's at every λ.
A name not listed here is read as a schedule YAML file.
"""

from __future__ import annotations

import os

from dami_jax.config import ConfigError
from dami_jax.schedule import Schedule

PATHS = {
    "full": None,
    "attn": {"default": 0.0, "rules": [{"kinds": ["attn"], "scale": 1.0}]},
    "mlp": {"default": 0.0, "rules": [{"kinds": ["mlp", "experts", "router"], "scale": 1.0}]},
    "early": {"default": 0.0, "rules": [{"fraction": [0.0, 0.5], "scale": 1.0}]},  # all of the first half's layers
    "late": {"default": 0.0, "rules": [{"fraction": [0.5, 1.0], "scale": 1.0}]},
}


def path_schedule(name: str, num_layers: int) -> Schedule | None:
    """The schedule of a named path (None: plain interpolation) or of a schedule YAML file."""
    if name in PATHS:
        data = PATHS[name]
        return None if data is None else Schedule.from_dict(data, num_layers, where=f"path {name!r}")
    if not os.path.isfile(name):
        raise ConfigError(f"unknown path {name!r}: expected one of {sorted(PATHS)} or a schedule YAML file")
    return Schedule.from_yaml(name, num_layers)


def path_label(name: str) -> str:
    """A path's name in reports: its own, or a YAML file's stem."""
    return name if name in PATHS else os.path.splitext(os.path.basename(name))[0]
