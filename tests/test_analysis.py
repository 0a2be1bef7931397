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
    assert monotone([1, 2, 1.99], tol=0.02)["monotone"]


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


# ---------------------------------------------------------------------------
# The λ-vmapped delta-mode passes against the merged model, on the shipped toy pair.

@pytest.fixture(scope="module")
def toy():
    import jax

    from dami_jax.eval.pairs import open_pair, toy_pair_config
    from dami_jax.eval.run import eval_prompts, load_problems
    from dami_jax.generate.decode import left_pad
    from dami_jax.models.qwen3 import hidden_states

    pair_cfg = toy_pair_config()
    pair = open_pair(pair_cfg)
    prompts = eval_prompts(pair, pair_cfg, load_problems("toy", 5))
    tokens, mask = left_pad(prompts, max(map(len, prompts)))
    return pair, prompts, tokens, mask, jax.jit(hidden_states, static_argnums=(0, 4))


def test_every_layer_from_one_pass_equals_each_layer_alone(toy):
    import dataclasses

    from dami_jax.models import qwen3

    pair, _, tokens, mask, hidden = toy
    every = np.asarray(hidden(pair.cfg, pair.instruct, tokens, mask, None))
    assert every.shape == (pair.cfg.num_layers + 1, *tokens.shape, pair.cfg.hidden_size)
    for layer in (1, pair.cfg.num_layers):  # a decoder layer's output, and the last one after the final norm
        np.testing.assert_allclose(every[layer], hidden(pair.cfg, pair.instruct, tokens, mask, layer),
                                   atol=1e-5, rtol=1e-5)
    scanned = dataclasses.replace(pair.cfg, scan_layers=True)  # the layers' outputs as the scan's ys
    np.testing.assert_allclose(hidden(scanned, qwen3.stack_layers(pair.instruct), tokens, mask, None), every,
                               atol=1e-5, rtol=1e-5)


def test_states_along_lambda_equal_the_merged_models(toy):
    from dami_jax.analysis.states import layer_states
    from dami_jax.interpolate import interpolate

    pair, prompts, tokens, mask, hidden = toy
    lams = [0.0, 0.3, 1.0]
    real = mask.astype(bool)
    per_token = layer_states(pair, prompts, lams, pooling="tokens", batch=4, progress=False)  # 2 batches
    pooled = layer_states(pair, prompts, lams, pooling="mean", batch=8, progress=False)
    assert per_token.shape == (3, pair.cfg.num_layers + 1, real.sum(), pair.cfg.hidden_size)
    for k, lam in enumerate(lams):
        merged = np.asarray(hidden(pair.cfg, interpolate(pair.instruct, pair.thinking, lam), tokens, mask, None))
        np.testing.assert_allclose(per_token[k], merged[:, real], atol=2e-4, rtol=1e-4)
        mean = (merged * mask[None, :, :, None]).sum(2) / mask.sum(1)[None, :, None]
        np.testing.assert_allclose(pooled[k], mean, atol=2e-4, rtol=1e-4)


def test_nll_along_a_path_equals_the_merged_models(toy):
    from dami_jax.analysis.barrier import mean_nll
    from dami_jax.analysis.paths import path_schedule
    from dami_jax.interpolate import interpolate
    from dami_jax.models.qwen3 import forward

    pair, prompts, tokens, mask, _ = toy
    texts = [(p[:-3], p[-3:]) for p in prompts]  # score each prompt's last 3 tokens after the rest
    lams = [0.0, 0.5, 1.0]
    schedule = path_schedule("attn", pair.cfg.num_layers)
    got = mean_nll(pair, texts, lams, schedule=schedule, batch=2, lam_chunk=2, progress=False)
    for k, lam in enumerate(lams):
        params = interpolate(pair.instruct, pair.thinking, lam, schedule=schedule)
        logits = np.asarray(forward(pair.cfg, params, tokens[:, :-1], mask[:, :-1]), np.float64)  # left-padded
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = [-logp[b, -3 + j, tokens[b, -3 + j]] for b in range(len(prompts)) for j in range(3)]
        assert got[k] == pytest.approx(np.mean(nll), rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_states_and_nll_on_an_8_device_mesh_equal_one_devices(toy):
    import dataclasses

    from dami_jax.analysis.barrier import mean_nll
    from dami_jax.analysis.batching import mesh_of
    from dami_jax.analysis.states import layer_states
    from dami_jax.eval.pairs import open_pair, toy_pair_config

    pair, prompts, _, _, _ = toy
    sharded = open_pair(dataclasses.replace(toy_pair_config(), mesh=(-1, 1, 1)))  # batch over 8 data shards
    assert mesh_of(sharded.delta).shape["data"] == 8
    lams = [0.0, 0.5, 1.0]
    np.testing.assert_allclose(layer_states(sharded, prompts, lams, progress=False),
                               layer_states(pair, prompts, lams, progress=False), atol=2e-5, rtol=1e-5)
    texts = [(p[:-3], p[-3:]) for p in prompts]
    np.testing.assert_allclose(mean_nll(sharded, texts, lams, progress=False), mean_nll(pair, texts, lams, progress=False),
                               rtol=1e-5)


# ---------------------------------------------------------------------------
# `dami analyze`: every subcommand once on the toy pair, input checked before the pair loads.

def _read(out, name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


@pytest.mark.slow
def test_dami_analyze_each_subcommand_on_the_toy_pair(tmp_path, capsys):
    """One test, so the four share one process's compiled programs where their shapes agree."""
    from dami_jax.cli import main

    out = str(tmp_path)
    common = ["--lams", "0,0.5,1", "--out", out, "--no-progress"]
    assert main(["analyze", "frontier", "--limit", "12", *common]) == 0
    rep = _read(out, "frontier.json")["benchmarks"]["toy"]
    assert [p["lam"] for p in rep["points"]] == [0.0, 0.5, 1.0]
    assert rep["continuity"]["n_queries"] == 12 and len(rep["continuity"]["queries"]) == 12
    assert rep["points"][-1]["think_share"] == 1.0 and rep["points"][0]["think_share"] == 0.0  # the toy's endpoints
    assert os.path.getsize(os.path.join(out, "frontier_toy.png")) > 0

    records = os.path.join(out, "sweep", "records_toy.jsonl")
    before = os.path.getmtime(records)
    assert main(["analyze", "think-ratio", "--limit", "12", *common]) == 0  # reuses OUT/sweep
    assert os.path.getmtime(records) == before
    ratio = _read(out, "think_ratio.json")
    assert ratio["benchmarks"]["toy"]["1"]["think_share"] == 1.0
    assert sorted(ratio["difficulty"]["toy"]) == [f"k{k}" for k in range(1, 7)]
    assert sum(c["1"]["n"] for c in ratio["difficulty"]["toy"].values()) == 12
    assert "thinking share (mean tokens) by λ" in capsys.readouterr().out

    assert main(["analyze", "cka", "--limit", "6", *common]) == 0
    rep = _read(out, "cka.json")
    assert rep["n"] == 6 and rep["layers"] == 5
    for form in ("biased", "debiased"):
        np.testing.assert_allclose(np.array(rep[form]["vs_instruct"])[:, 0], 1.0, atol=1e-5)  # [layer][λ]
        np.testing.assert_allclose(np.array(rep[form]["vs_thinking"])[:, -1], 1.0, atol=1e-5)

    assert main(["analyze", "barrier", "--limit", "6", "--paths", "full,attn", *common]) == 0
    rep = _read(out, "barrier.json")
    for texts in ("thinking", "instruct"):
        paths = rep["texts"][texts]["paths"]
        assert paths["full"]["loss_0"] == pytest.approx(paths["attn"]["loss_0"], rel=1e-6)  # λ = 0 is Θ_I on any path
        for p in paths.values():
            assert p["barrier"] == pytest.approx(max(p["excess"])) and p["barrier"] >= 0
            assert p["excess"][0] == p["excess"][-1] == 0.0
    # each model reads its own answers better than the other model does
    assert rep["texts"]["thinking"]["paths"]["full"]["loss_1"] < rep["texts"]["thinking"]["paths"]["full"]["loss_0"]
    assert rep["texts"]["instruct"]["paths"]["full"]["loss_0"] < rep["texts"]["instruct"]["paths"]["full"]["loss_1"]
    assert {"cka_biased.png", "cka_debiased.png", "barrier.png", "think_ratio_toy.png"} <= set(os.listdir(out))


@pytest.mark.parametrize("argv, message", [
    (["cka", "--lams", "0.2,0.5,1"], "--lams must include 0 and 1"),
    (["barrier", "--paths", "full,bogus"], "unknown path 'bogus'"),
    (["barrier", "--texts", "{bad}"], "line 1: expected a non-empty string 'text'"),
    (["cka", "--bench", "nosuch"], "unknown benchmark 'nosuch'"),
    (["frontier", "--lams", "0,1"], "--lams must include 0 and 1 and one λ between"),
    (["think-ratio", "--run", "/no/such/run"], "/no/such/run: no such run directory or records file"),
    (["frontier", "--run", "{empty}"], "no records_<bench>.jsonl"),
])
def test_analyze_checks_its_input_before_the_pair_loads(argv, message, tmp_path, monkeypatch, capsys):
    from dami_jax.cli import main
    from dami_jax.eval import pairs

    def refuse(pair_cfg):
        raise AssertionError("the pair was loaded before the input was checked")

    monkeypatch.setattr(pairs, "open_pair", refuse)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1"}\n')
    files = {"bad": str(tmp_path / "bad.jsonl"), "empty": str(tmp_path)}
    assert main(["analyze", *[a.format(**files) for a in argv], "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
