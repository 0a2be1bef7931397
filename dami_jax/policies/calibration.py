"""A Conf calibration (μ, τ, the ConfConfig it scores with, the pair's fingerprint, the sorted
calibration scores) as a small JSON file, and how the conf/routing policies find theirs.

It depends only on ConfConfig: calibrate.py makes calibrations, conf.py and routing.py use them.
"""

from __future__ import annotations

import dataclasses
import json
import os

from dami_jax.config import ConfigError, from_dict
from dami_jax.policies.base import pair_fingerprint
from dami_jax.policies.conf_config import ConfConfig, load_conf_config
from dami_jax.files import write_json

VERSION = 1


@dataclasses.dataclass(frozen=True)
class Calibration:
    mu: float
    tau: float
    conf: ConfConfig
    fingerprint: str
    scores: tuple[float, ...]  # sorted s over the calibration prompts
    method: str = "quantile"  # or "logistic"

    def check(self, pair) -> None:
        """Refuse a pair other than the one calibrated on (checked once per pair object)."""
        key = (id(pair.instruct), id(pair.thinking))
        if getattr(self, "_checked", None) == key:
            return
        found = pair_fingerprint(pair)
        if found != self.fingerprint:
            raise ConfigError(f"calibration was made for pair {self.fingerprint}, but this pair is {found}; "
                              "recalibrate with calibrate_conf(pair, prompts, cfg)")
        object.__setattr__(self, "_checked", key)

    def save(self, path: str | os.PathLike) -> None:
        data = {"version": VERSION, "method": self.method, "mu": self.mu, "tau": self.tau,
                "fingerprint": self.fingerprint, "conf": dataclasses.asdict(self.conf),
                "n": len(self.scores), "scores": list(self.scores)}
        write_json(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        if not os.path.isfile(path):
            raise ConfigError(f"no Conf calibration at {path}; make one with "
                              "dami_jax.policies.calibrate_conf(pair, prompts, cfg).save(path)")
        try:
            with open(path) as f:
                data = json.load(f)
            if data.get("version") != VERSION:
                raise ConfigError(f"version {data.get('version')!r}, expected {VERSION}")
            return cls(mu=float(data["mu"]), tau=float(data["tau"]),
                       conf=from_dict(ConfConfig, data["conf"], where=f"{path}: conf"),
                       fingerprint=str(data["fingerprint"]), scores=tuple(map(float, data["scores"])),
                       method=str(data["method"]))
        except (KeyError, TypeError, ValueError) as e:  # ConfigError is a ValueError
            raise ConfigError(f"{path}: not a valid Conf calibration ({e})") from e


def resolve_calibration(calibration: str | None, config: str | None, pair=None) -> tuple[Calibration, str]:
    """Load the calibration at `calibration` (default: the `calibration` field of the
    Conf YAML `config`); verify it against `pair` when one is given."""
    path = calibration or load_conf_config(config).calibration
    if not path:
        raise ConfigError("the conf/routing policy needs a calibration: make one with "
                          "calibrate_conf(pair, prompts, cfg).save(PATH) and pass 'conf:PATH' "
                          "(or the `calibration` field of a ConfConfig YAML given as config)")
    cal = Calibration.load(path)
    if pair is not None:
        cal.check(pair)
    return cal, str(path)
