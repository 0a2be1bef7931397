"""The risk knob of `pref`: λ(q) = argmax r(q, λ) + β·λ, and the calibration that picks β for a
target accuracy drop on held-out rollouts (pref/calibrate.py)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dami_jax.config import ConfigError
from dami_jax.policies.base import build_policy
from dami_jax.pref import PrefPolicy, RewardModel, calibrate_beta, save_reward_model
from dami_jax.pref.calibrate import outcome

META = {"inference_points": 101, "hidden_layer": -1, "pooling": "last"}


def random_policy(seed: int = 0, **kw) -> tuple[PrefPolicy, np.ndarray]:
    feats = np.random.default_rng(seed).normal(size=(64, 6)).astype(np.float32)
    model = RewardModel(6, 3, (16,), rngs=nnx.Rngs(seed))
    model.set_stats(feats)
    return PrefPolicy(model, {**META, **kw}), feats


def test_beta_zero_is_the_plain_argmax():
    policy, feats = random_policy()
    grid = jnp.linspace(0.0, 1.0, 101, dtype=jnp.float32)
    plain = np.asarray(grid[jnp.argmax(policy.model.grid_scores(jnp.asarray(feats), grid), axis=1)])  # the untilted rule
    assert policy.beta == 0.0
    np.testing.assert_array_equal(policy.lam_from_features(feats)[0], plain)
    tilted, _ = random_policy(beta=0.5)  # the same model, a stored β: a different choice
    assert tilted.beta == 0.5 and not np.array_equal(tilted.lam_from_features(feats)[0], plain)
    untilted = PrefPolicy(tilted.model, tilted.meta, beta=0.0)  # an explicit β overrides the stored one
    np.testing.assert_array_equal(untilted.lam_from_features(feats)[0], plain)


def test_a_larger_beta_never_picks_a_smaller_lam():
    policy, feats = random_policy(seed=3)
    scores = policy.grid_scores(feats)
    spread = float(np.ptp(scores))
    lams = []
    for beta in np.array([-50, -3, -1, -0.3, -0.1, -0.01, 0, 0.01, 0.1, 0.3, 1, 3, 50]) * spread:
        lam, reward = PrefPolicy(policy.model, policy.meta, beta=float(beta)).lam_from_features(feats)
        # the reported reward is r at the chosen λ, untilted
        np.testing.assert_allclose(reward, scores[np.arange(len(lam)), np.rint(lam * 100).astype(int)], rtol=1e-5)
        lams.append(lam)
    lams = np.stack(lams)
    assert (np.diff(lams, axis=0) >= 0).all()
    assert (lams[0] == 0).all() and (lams[-1] == 1).all()  # far enough out, every query takes an end
    assert len(np.unique(lams[6])) > 1  # at β = 0 the choice varies: the tilt has something to move


def test_beta_in_the_policy_spec(tmp_path):
    policy, feats = random_policy()
    save_reward_model(policy.model, tmp_path / "rm", {**META, "fingerprint": "x", "beta": 0.25})
    stored = build_policy(f"pref:{tmp_path / 'rm'}")
    assert stored.beta == 0.25 and stored.spec == f"pref:{tmp_path / 'rm'}"
    given = build_policy(f"pref:{tmp_path / 'rm'}:beta=-0.5")
    assert given.beta == -0.5 and given.spec == f"pref:{tmp_path / 'rm'}:beta=-0.5"
    np.testing.assert_array_equal(given.lam_from_features(feats)[0],
                                  PrefPolicy(policy.model, META, beta=-0.5).lam_from_features(feats)[0])
    assert build_policy({"name": "pref", "path": str(tmp_path / "rm"), "beta": 1.0}).beta == 1.0
    with pytest.raises(ConfigError, match="beta=oops"):
        build_policy(f"pref:{tmp_path / 'rm'}:beta=oops")
    with pytest.raises(ConfigError, match="beta must be a finite number, got 'high'"):
        build_policy({"name": "pref", "path": str(tmp_path / "rm"), "beta": "high"})
    with pytest.raises(ConfigError, match="beta must be a finite number, got nan"):
        build_policy(f"pref:{tmp_path / 'rm'}:beta=nan")
    with open(tmp_path / "rm" / "reward_model.json") as f:
        assert json.load(f)["beta"] == 0.25


# A hand-made held-out set: rollouts at λ ∈ {0, 0.5, 1} (the inference grid too), costs 10 / 50 / 100.
#   q0 easy (right everywhere), q1 right from λ = 0.5, q2 right only at λ = 1, q3 never right.
# Scores all prefer λ = 0 at β = 0. Tilted: q1 moves to 0.5 for β in (1, 3) and to 1 past 3; q2 jumps
# from 0 to 1 past β = 2; q0 goes to 1 past 3; q3 (flat) takes λ = 1 for any β > 0.
GRID = np.array([0.0, 0.5, 1.0], np.float32)
ACC = np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1], [0, 0, 0]], float)
COST = np.tile([10.0, 50.0, 100.0], (4, 1))
SCORES = np.array([[3, 1, 0], [2, 1.5, 0], [4, 3, 2], [0, 0, 0]], np.float32)


@pytest.mark.parametrize("target, low, high, accuracy", [
    (0.25, 1.0, 1.05, 0.5),  # λ = 1 reaches 0.75: 0.5 needs q1 at 0.5, β just past 1
    (0.0, 2.0, 2.1, 0.75),  # all of λ = 1's accuracy needs q2 at 1 too, β just past 2
])
def test_calibration_meets_its_target_with_the_smallest_beta(target, low, high, accuracy):
    cal = calibrate_beta(SCORES, GRID, ACC, COST, GRID, target)
    assert cal.reference_accuracy == 0.75 and cal.reference_tokens == 100.0 and cal.n_queries == 4
    assert low < cal.beta <= high, cal
    assert cal.accuracy == accuracy >= cal.reference_accuracy - target
    assert outcome(SCORES, GRID, ACC, COST, GRID, low)["accuracy"] < cal.reference_accuracy - target  # below: missed
    if target == 0.25:  # q0 at 0, q1 at 0.5, q2 at 0, q3 at 1
        assert cal.mean_tokens == (10 + 50 + 10 + 100) / 4 and cal.mean_lam == 0.375


def test_calibration_with_a_loose_target_may_tilt_toward_instruct():
    cal = calibrate_beta(SCORES, GRID, ACC, COST, GRID, 0.5)  # λ = 0 everywhere (0.25) is enough
    assert cal.beta <= 0 and cal.mean_lam == 0.0 and cal.accuracy == 0.25


def test_calibration_input_errors():
    with pytest.raises(ValueError, match="target_drop"):
        calibrate_beta(SCORES, GRID, ACC, COST, GRID, 1.5)
    with pytest.raises(ValueError, match=r"must be \(H, L\)"):
        calibrate_beta(SCORES, GRID, ACC[:, :2], COST, GRID, 0.1)
    with pytest.raises(ValueError, match="end at λ = 1"):
        calibrate_beta(SCORES[:, :2], GRID[:2], ACC, COST, GRID, 0.1)
