"""The YAML files in configs/ are examples of the config dataclasses: each loads as the one
it names, and those that restate the defaults equal them. The library reads none of them."""

from __future__ import annotations

import glob
import os

import pytest

from dami_jax.config import load_yaml
from dami_jax.eval.pairs import load_pair_config
from dami_jax.policies import ConfConfig, load_conf_config
from dami_jax.pref.config import load_pref_config
from dami_jax.serve import ServeConfig, load_serve_config
from dami_jax.toyworld.train import ToyTrainConfig

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
# file name prefix -> loader
LOADERS = {
    "serve": load_serve_config,
    "policy_conf": load_conf_config,
    "pair_": load_pair_config,
    "pref_": load_pref_config,
    "toyworld": lambda path: load_yaml(ToyTrainConfig, path),
}


def _loader(name: str):
    found = [f for prefix, f in LOADERS.items() if name.startswith(prefix)]
    assert len(found) == 1, f"configs/{name}: no loader known for it; add one to LOADERS"
    return found[0]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "*.yaml"))), ids=os.path.basename)
def test_every_example_loads(path):
    cfg = _loader(os.path.basename(path))(path)
    assert type(cfg).__name__.endswith("Config")


def test_examples_that_restate_the_defaults_equal_them():
    assert load_serve_config(os.path.join(CONFIGS, "serve.yaml")) == ServeConfig()
    assert load_conf_config(os.path.join(CONFIGS, "policy_conf.yaml")) == ConfConfig()
    assert load_yaml(ToyTrainConfig, os.path.join(CONFIGS, "toyworld.yaml")) == ToyTrainConfig()


def test_no_file_means_the_dataclass_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing around to find
    assert load_serve_config() == ServeConfig()
    assert load_conf_config() == ConfConfig()
    assert load_serve_config(None, ["max_rows=3"]).max_rows == 3
