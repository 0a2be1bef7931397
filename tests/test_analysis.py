"""dami_jax.analysis: linear CKA against a float64 NumPy reference and its invariances, the loss
barrier on analytic curves, the frontier checks on synthetic sweeps, the λ-vmapped delta-mode
passes equal to the merged model's, and one small `dami analyze` run of each subcommand on the
toy pair (one sweep shared)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dami_jax.analysis import (barrier_profile, chord_gaps, cka_along_lam, crossings, frontier_report, hull_gaps,
                               linear_cka, loss_barrier, lower_convex_hull, monotone, query_continuity)
from dami_jax.errors import InputError


def reference_cka(x, y, debiased=False) -> float:
    """The textbook Gram-matrix form in float64: HSIC of centered Gram matrices, or the unbiased
    estimator of Song et al. 2012 on the raw ones."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.shape[0]

    def hsic(k, l):
        if not debiased:
            h = np.eye(n) - 1.0 / n
            return np.trace(k @ h @ l @ h)
        k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
        one = np.ones(n)
        return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * (one @ k @ l @ one))

    k, l = x @ x.T, y @ y.T
    return float(hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l)))


def _related(seed, n=40, d1=24, d2=16, noise=1.0):
    """x with an offset, and y a noisy linear image of it: CKA well inside (0, 1)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1)) + rng.normal(size=d1) * 3
    y = x @ rng.normal(size=(d1, d2)) + noise * rng.normal(size=(n, d2)) * 4
    return x.astype(np.float32), y.astype(np.float32)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_of_a_representation_with_itself_is_1(debiased):
    x, _ = _related(0)
    assert linear_cka(x, x, debiased) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_is_invariant_to_orthogonal_maps_and_isotropic_scaling(debiased):
    x, y = _related(1)
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(x.shape[1], x.shape[1])))
    base = linear_cka(x, y, debiased)
    assert 0.2 < base < 0.95  # a case where invariance is not trivially 1 = 1
    assert linear_cka((x @ q).astype(np.float32), y, debiased) == pytest.approx(base, abs=1e-5)
    assert linear_cka(x * 37.5, y * 0.01, debiased) == pytest.approx(base, abs=1e-5)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("seed, n, d1, d2", [(3, 40, 24, 16), (4, 12, 64, 48), (5, 200, 8, 8)])
def test_cka_equals_the_float64_gram_reference(debiased, seed, n, d1, d2):
    x, y = _related(seed, n, d1, d2)
    assert linear_cka(x, y, debiased) == pytest.approx(reference_cka(x, y, debiased), abs=2e-5)


def test_debiasing_removes_the_inflation_of_wide_representations():
    rng = np.random.default_rng(6)  # unrelated: the biased CKA is far from 0 at n << d, the debiased is near it
    x, y = rng.normal(size=(20, 500)), rng.normal(size=(20, 500))
    assert linear_cka(x, y) > 0.8
    assert abs(linear_cka(x, y, debiased=True)) < 0.1


def test_cka_along_lam_is_linear_cka_at_each_layer_and_lambda():
    rng = np.random.default_rng(7)
    feats = rng.normal(size=(4, 3, 30, 10)).astype(np.float32)
    feats += np.linspace(0, 1, 4)[:, None, None, None] * rng.normal(size=(1, 3, 30, 10)).astype(np.float32)
    for debiased in (False, True):
        out = {k: np.asarray(v) for k, v in cka_along_lam(feats, debiased=debiased).items()}
        assert out["vs_instruct"].shape == (4, 3) and out["vs_next"].shape == (3, 3)
        for k in range(4):
            for layer in range(3):
                x = feats[k, layer]
                assert out["vs_instruct"][k, layer] == pytest.approx(linear_cka(x, feats[0, layer], debiased), abs=1e-6)
                assert out["vs_thinking"][k, layer] == pytest.approx(linear_cka(x, feats[-1, layer], debiased), abs=1e-6)
                if k < 3:
                    assert out["vs_next"][k, layer] == pytest.approx(linear_cka(x, feats[k + 1, layer], debiased),
                                                                     abs=1e-6)


@pytest.mark.parametrize("x, y, message", [
    (np.ones((5, 3)), np.ones((6, 3)), "same n inputs"),
    (np.ones(5), np.ones((5, 3)), "2-D (n, d)"),
    (np.ones((3, 2)), np.ones((3, 2)), "n >= 4 inputs (debiased)"),
])
def test_cka_refuses_bad_shapes(x, y, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        linear_cka(x, y, debiased=True)


# ---------------------------------------------------------------------------
# The loss barrier.

def test_barrier_is_0_for_identical_endpoints_on_a_flat_path():
    lams = np.linspace(0, 1, 11)
    assert loss_barrier(lams, np.full(11, 2.5)) == 0.0


@pytest.mark.parametrize("c", [-0.8, 0.0, 0.6])
def test_barrier_is_exact_on_a_quadratic(c):
    # L(λ) = a + bλ + cλ²: the chord's excess is -c·λ(1 − λ), largest at λ = 0.5: -c/4 when c < 0, else 0.
    lams = np.linspace(0, 1, 21)
    losses = 1.3 - 0.4 * lams + c * lams ** 2
    np.testing.assert_allclose(barrier_profile(lams, losses), -c * lams * (1 - lams), atol=1e-12)
    assert loss_barrier(lams, losses) == pytest.approx(max(-c / 4, 0.0), abs=1e-12)


def test_barrier_needs_both_endpoints():
    with pytest.raises(InputError, match="must hold 0 and 1"):
        loss_barrier([0.0, 0.5, 0.9], [1.0, 2.0, 1.0])


# ---------------------------------------------------------------------------
# The frontier checks on synthetic sweeps.

LAMS = np.linspace(0, 1, 6)
TOKENS = np.array([4.0, 10, 20, 35, 55, 80])


def _curve(accuracy, tokens=TOKENS, share=None):
    share = np.linspace(0, 1, len(LAMS)) if share is None else np.asarray(share)
    return {"lam": LAMS, "accuracy": np.asarray(accuracy, float), "mean_tokens": np.asarray(tokens, float),
            "think_share": share, "n_items": np.full(len(LAMS), 100)}


def test_a_concave_accuracy_curve_is_a_convex_monotone_frontier_above_the_chord():
    acc = 0.4 + 0.5 * np.sqrt((TOKENS - 4) / 76)  # diminishing returns
    rep = frontier_report(_curve(acc), tol=0.0)
    assert rep["convex"] and rep["max_hull_gap"] == pytest.approx(0.0, abs=1e-12)
    assert rep["hull_lams"] == LAMS.tolist()
    assert rep["monotone"]["accuracy"]["monotone"] and rep["monotone"]["tokens"]["monotone"]
    assert rep["middle_above_chord"] == 4 and rep["middle_below_chord"] == 0


def test_an_accelerating_accuracy_curve_is_not_convex_and_lies_below_the_chord():
    acc = 0.4 + 0.5 * ((TOKENS - 4) / 76) ** 2
    rep = frontier_report(_curve(acc), tol=0.01)
    assert not rep["convex"]
    assert rep["hull_lams"] == [0.0, 1.0]
    gaps = np.array([p["chord_gap"] for p in rep["points"]])
    np.testing.assert_allclose(gaps, acc - (0.4 + 0.5 * (TOKENS - 4) / 76), atol=1e-12)
    assert rep["middle_below_chord"] == 4 and rep["max_hull_gap"] == pytest.approx(-gaps.min())


def test_a_non_monotone_curve_reports_its_worst_drop_below_the_running_maximum():
    acc = [0.4, 0.6, 0.58, 0.55, 0.7, 0.9]  # two steps of 0.02 and 0.03: a 0.05 slide
    rep = frontier_report(_curve(acc), tol=0.03)
    assert rep["monotone"]["accuracy"] == {"monotone": False, "worst_drop": pytest.approx(0.05), "at": pytest.approx(0.6)}
    assert monotone([1, 2, 2, 3])["monotone"] and not monotone([1, 2, 1.99])["monotone"]
    assert monotone([1, 2, 1.99], tol=0.01)["monotone"]


def test_hull_chord_and_stage_helpers_on_small_cases():
    # lower hull of a V with an interior point above it and a duplicate x
    assert lower_convex_hull([0, 1, 2, 1, 3], [3, 1, 2, 5, 3]).tolist() == [0, 1, 4]
    hull, below = hull_gaps([0, 1, 2], [0.0, 0.2, 1.0])  # error 1, 0.8, 0: the middle point is 0.3 under the hull
    assert hull.tolist() == [0, 2] and below == pytest.approx([0, 0.3, 0])
    assert np.isnan(chord_gaps([5, 5, 5], [0.1, 0.5, 0.9])).all()
    assert crossings([0, 0.25, 0.5, 0.75, 1], [0, 0, 0.2, 0.6, 1]) == {
        "0.1": pytest.approx(0.375), "0.5": pytest.approx(0.6875), "0.9": pytest.approx(0.9375)}
    assert crossings([0, 1], [0, 0.3]) == {"0.1": pytest.approx(1 / 3), "0.5": None, "0.9": None}


def test_per_query_continuity_counts_monotone_queries_and_their_switch():
    def rec(qid, lam, correct, tokens, think):
        return {"policy": f"static:{lam:g}", "id": qid, "sample": 0, "correct": correct, "gradable": True,
                "tokens": tokens, "pred": None, "think": think}

    rows = [rec("a", l, c, t, h) for l, c, t, h in [(0, 0, 4, 0), (0.5, 1, 60, 1), (1, 1, 65, 1)]]
    rows += [rec("b", l, c, t, h) for l, c, t, h in [(0, 1, 4, 0), (0.5, 0, 65, 1), (1, 1, 60, 1)]]
    rows += [rec("c", l, c, t, h) for l, c, t, h in [(0, 1, 4, 0), (0.5, 1, 4, 0), (1, 1, 65, 1)]]
    out = query_continuity(rows)
    assert out["n_queries"] == 3
    assert out["correct_monotone"] == pytest.approx(2 / 3) and out["length_monotone"] == pytest.approx(2 / 3)
    assert out["changes"] == {"0": pytest.approx(1 / 3), "1": pytest.approx(1 / 3), ">1": pytest.approx(1 / 3)}
    by_id = {q["id"]: q for q in out["queries"]}
    assert by_id["a"] == {"id": "a", "changes": 1, "switch_lam": 0.5, "switch_to": "right", "think_lam": 0.5}
    assert by_id["b"]["switch_to"] == "wrong" and by_id["c"]["switch_lam"] is None and by_id["c"]["think_lam"] == 1.0
    with pytest.raises(InputError, match="every query at every λ"):
        query_continuity(rows[:-1])
