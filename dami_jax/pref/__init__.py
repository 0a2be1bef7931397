"""DAMI-Pref (DESIGN 1.3): rollouts -> preferences -> reward model -> λ(q) = argmax_λ r_φ(q, λ).

    ro = collect_rollouts(pair, prompts, grader, "rollouts.jsonl")        # rollouts.py (grader: pipeline.math_grader)
    prefs = preference_pairs(ro.acc(), ro.cost(), ro.lams, eps_acc, eps_cost)  # preferences.py
    feats = prompt_features(pair.cfg, pair.instruct, prompts, layer, pooling,  # features.py
                            probe_tokens=0)  # > 0: over prompt + Instruct's greedy answer
    result = train_reward_model(cfg, PrefData(feats, train, heldout, held_q), ckpt_dir, mesh=mesh)
    policy = PrefPolicy.from_dir(DIR, pair)      # registered as `pref` / `pref:DIR` / `pref:DIR:beta=X`
    cal = calibrate_beta(scores, grid, acc, cost, lams, target_drop)   # calibrate.py: β, the risk knob

`pipeline.run(cfg, out_dir)` runs it all on the pair and problem set the config
names (train_pref.py).
"""

from dami_jax.pref.calibrate import BetaCalibration, calibrate_beta
from dami_jax.pref.config import PrefConfig, load_pref_config
from dami_jax.pref.features import hidden_states, prompt_features
from dami_jax.pref.policy import PrefPolicy, make_pref
from dami_jax.pref.preferences import Preferences, preference_pairs, prefers, split_by_query
from dami_jax.pref.reward_model import (
    RewardModel, bt_loss, fourier_features, load_reward_model, save_reward_model,
)
from dami_jax.pref.rollouts import Rollouts, check_grid, collect_rollouts, load_rollouts
from dami_jax.pref.train import PrefData, TrainResult, batch_indices, train_reward_model

__all__ = [
    "BetaCalibration", "PrefConfig", "PrefData", "PrefPolicy", "Preferences", "RewardModel", "Rollouts",
    "TrainResult", "batch_indices", "bt_loss", "calibrate_beta", "check_grid", "collect_rollouts", "fourier_features", "hidden_states",
    "load_pref_config", "load_reward_model", "load_rollouts", "make_pref", "preference_pairs", "prefers",
    "prompt_features", "save_reward_model", "split_by_query", "train_reward_model",
]
