"""Metrics (pass@k, majority vote, summaries), resumable records and Pareto plots."""

import importlib.util
import itertools
import json
import math

import numpy as np
import pytest

from dami_jax.eval import metrics as M
from dami_jax.eval import plots as P
from dami_jax.eval import records as R

requires_mv = pytest.mark.skipif(importlib.util.find_spec("math_verify") is None, reason="math-verify not installed")


# ---------------------------------------------------------------- pass@k


def _pass_at_k_brute(n, c, k):
    """Share of k-subsets of n samples (c correct) holding at least one correct one."""
    flags = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(flags[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_pass_at_k_matches_subset_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert M.pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_known_values_and_edges():
    assert M.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert M.pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert M.pass_at_k(5, 0, 3) == 0.0
    assert M.pass_at_k(5, 3, 3) == 1.0  # n - c = 2 < k = 3: every 3-subset holds a correct one
    assert M.pass_at_k(5, 5, 5) == 1.0
    # Large n stays finite and exact (the binomials would overflow floats).
    assert M.pass_at_k(2000, 1, 1) == pytest.approx(1 / 2000)
    assert M.pass_at_k(2000, 10, 100) == pytest.approx(1 - math.comb(1990, 100) / math.comb(2000, 100), rel=1e-9)
    # Vectorized over items.
    np.testing.assert_allclose(M.pass_at_k(np.array([4, 4, 4]), np.array([0, 1, 4]), 2), [0.0, 0.5, 1.0])


def test_pass_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match="needs n >= k"):
        M.pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        M.pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        M.pass_at_k(3, 1, 0)


# ---------------------------------------------------------------- majority vote


def test_majority_vote():
    assert M.majority_vote(["2", "3", "3", None], [False, True, True, False]) == ("3", True)
    assert M.majority_vote(["2", "2", "3"], [False, False, True]) == ("2", False)
    # Tie: the answer seen first wins, whatever the order of the counts dict.
    assert M.majority_vote(["5", "4", "4", "5"], [True, False, False, True]) == ("5", True)
    assert M.majority_vote(["4", "5", "5", "4"], [False, True, True, False]) == ("4", False)
    # Ungradable samples (pred None) do not vote; nothing to vote on -> wrong.
    assert M.majority_vote([None, None, "1"], [False, False, True]) == ("1", True)
    assert M.majority_vote([None, None], [False, False]) == (None, False)
    with pytest.raises(ValueError, match="2 preds but 1 correct"):
        M.majority_vote(["1", "2"], [True])


# ---------------------------------------------------------------- summary


def _rec(pid, sample, correct, tokens, pred, think=True, gradable=True, policy="static:1"):
    return {"policy": policy, "id": pid, "sample": sample, "correct": correct, "gradable": gradable,
            "tokens": tokens, "pred": pred, "think": think}


def _two_items(policy="static:1"):
    return [
        _rec("a", 1, False, 300, "2", policy=policy), _rec("a", 0, True, 100, "1", policy=policy),
        _rec("a", 2, True, 200, "1", think=False, policy=policy), _rec("a", 3, False, 400, "2", policy=policy),
        _rec("b", 0, False, 50, None, think=False, gradable=False, policy=policy),
        _rec("b", 1, False, 50, "9", policy=policy), _rec("b", 2, False, 50, "9", policy=policy),
        _rec("b", 3, True, 50, "8", policy=policy),
    ]


def test_summarize_known_values():
    s = M.summarize(_two_items(), ks=(1, 2, 4), wall_s=2.0)
    assert (s["n_items"], s["samples_per_item"], s["n_samples"]) == (2, 4, 8)
    assert s["accuracy"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert s["pass@1"] == pytest.approx(s["accuracy"])
    assert s["pass@2"] == pytest.approx((M.pass_at_k(4, 2, 2) + M.pass_at_k(4, 1, 2)) / 2)
    assert s["pass@4"] == 1.0
    # maj@1: first sample (sorted by index) -> a right, b ungradable; maj@2: a "1" vs "2" tie -> "1" (sample 0).
    assert s["maj@1"] == 0.5 and s["maj@2"] == 0.5
    assert s["maj@4"] == 0.5  # a: "1" x2 vs "2" x2 -> "1" (right); b: "9" x2 (wrong)
    assert s["gradable_share"] == pytest.approx(7 / 8)
    assert s["thinking_share"] == pytest.approx(6 / 8)
    assert (s["mean_tokens"], s["median_tokens"], s["total_tokens"]) == (150.0, 75.0, 1200)
    assert s["tokens_per_s"] == pytest.approx(600.0)


def test_summarize_by_policy_with_reference():
    recs = _two_items("static:1") + [
        dict(r, tokens=r["tokens"] // 2, correct=True) for r in _two_items("conf")
    ]
    out = M.summarize_by_policy(recs, ks=(1,), wall_s={"static:1": 3.0, "conf": 1.5}, ref_policy="static:1")
    assert set(out) == {"static:1", "conf"}
    assert out["conf"]["accuracy"] == 1.0
    assert out["conf"]["accuracy_delta"] == pytest.approx(1.0 - 0.375)
    assert out["conf"]["token_ratio"] == pytest.approx(0.5)
    assert out["conf"]["speedup"] == pytest.approx(2.0)
    assert out["static:1"]["speedup"] == pytest.approx(1.0)


def test_summarize_errors():
    with pytest.raises(ValueError, match=r"lacks field\(s\) \['tokens'\]"):
        M.summarize([{k: v for k, v in _rec("a", 0, True, 1, "1").items() if k != "tokens"}])
    with pytest.raises(ValueError, match="duplicate sample indices"):
        M.summarize([_rec("a", 0, True, 1, "1"), _rec("a", 0, True, 1, "1")])
    with pytest.raises(ValueError, match="k=4 but some items have only 2 samples"):
        M.summarize([_rec("a", 0, True, 1, "1"), _rec("a", 1, True, 1, "1")], ks=(4,))
    with pytest.raises(ValueError, match="mix policies"):
        M.summarize([_rec("a", 0, True, 1, "1"), _rec("a", 1, True, 1, "1", policy="conf")])


def test_small_metric_helpers():
    assert M.tokens_per_second(1000, 4.0) == 250.0
    assert M.speedup(2.0, 3.0) == 1.5
    assert M.thinking_share([True, False, False, False]) == 0.25
    assert M.mean_accuracy([[True, False], [True, True, True, False]]) == pytest.approx(0.625)
    with pytest.raises(ValueError, match="seconds must be > 0"):
        M.tokens_per_second(10, 0)


# ---------------------------------------------------------------- records


def test_record_store_append_load_resume(tmp_path):
    store = R.RecordStore(tmp_path / "runs" / "recs.jsonl")
    assert store.load() == [] and store.done_keys() == set()
    store.append(_rec("a", 0, True, np.int64(10), "1"))  # numpy scalars serialize
    store.extend([_rec("a", 1, False, 12, "2"), _rec("b", 0, True, 5, "7", policy="conf")])
    assert store.done_keys() == {("static:1", "a", 0), ("static:1", "a", 1), ("conf", "b", 0)}
    # A resumed run only generates what is missing.
    todo = [(p, i, s) for p in ("static:1", "conf") for i in ("a", "b") for s in (0, 1)]
    assert [k for k in todo if k not in store.done_keys()] == [
        ("static:1", "b", 0), ("static:1", "b", 1), ("conf", "a", 0), ("conf", "a", 1), ("conf", "b", 1)]
    # A rewritten key: the last record wins.
    store.append(_rec("a", 1, True, 12, "1"))
    loaded = {R.record_key(r): r for r in store.load()}
    assert len(loaded) == 3 and loaded[("static:1", "a", 1)]["correct"] is True
    assert loaded[("static:1", "a", 0)]["tokens"] == 10


def test_record_store_survives_interrupted_write(tmp_path):
    path = tmp_path / "recs.jsonl"
    store = R.RecordStore(path)
    store.append(_rec("a", 0, True, 1, "1"))
    with open(path, "a") as f:
        f.write('{"policy": "static:1", "id": "a", "sam')  # killed mid-write
    with pytest.warns(UserWarning, match="unterminated last line"):
        assert len(store.load()) == 1
    with pytest.warns(UserWarning, match="removed an unterminated last line"):
        store.append(_rec("a", 1, True, 1, "1"))
    assert [json.loads(line)["sample"] for line in path.read_text().splitlines()] == [0, 1]


def test_record_store_errors(tmp_path):
    store = R.RecordStore(tmp_path / "r.jsonl")
    with pytest.raises(ValueError, match=r"lacks key field\(s\) \['policy'\]"):
        store.append({"id": "a", "sample": 0})
    (tmp_path / "r.jsonl").write_text("{bad\n")
    with pytest.raises(ValueError, match="r.jsonl line 1: invalid JSON"):
        store.load()


@requires_mv
def test_make_record_and_rescore_without_regenerating(tmp_path):
    store = R.RecordStore(tmp_path / "r.jsonl")
    store.extend([
        R.make_record("static:1", "p1", 0, r"\boxed{7}</think>The answer is 42.", "42", 30, lam=1.0),
        R.make_record("static:1", "p1", 1, r"</think>\boxed{41}", "42", 20, lam=1.0),
    ])
    first = store.load()
    assert [(r["correct"], r["gradable"], r["pred"], r["think"]) for r in first] == [
        (False, False, None, True), (False, True, "41", True)]
    assert first[0]["lam"] == 1.0
    lenient = R.rescore(first, mode="lenient")
    assert [(r["correct"], r["gradable"], r["pred"]) for r in lenient] == [(True, True, "42"), (False, True, "41")]
    regold = R.rescore(first, golds={"p1": "41"})
    assert [r["correct"] for r in regold] == [False, True] and regold[1]["gold"] == "41"
    assert first[1]["correct"] is False  # inputs untouched
    with pytest.raises(ValueError, match="no 'output' field"):
        R.rescore([_rec("a", 0, True, 1, "1")])


# ---------------------------------------------------------------- plots


def test_pareto_front():
    tokens = [100, 200, 300, 150, 400]
    acc = [0.5, 0.7, 0.6, 0.5, 0.9]
    assert P.pareto_front(tokens, acc).tolist() == [0, 1, 4]


def test_pareto_plot_writes_png(tmp_path):
    curve = [(0.0, 300, 0.55), (1.0, 4000, 0.80), (0.5, 1500, 0.70), (0.8, 3000, 0.82)]
    points = {"DAMI-Conf": (2400, 0.83), "DAMI-Pref": (2800, 0.84)}
    out = P.pareto_plot(points, curve, tmp_path / "plots" / "pareto.png", title="toy")
    data = (tmp_path / "plots" / "pareto.png").read_bytes()
    assert out.endswith("pareto.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="nothing to draw"):
        P.pareto_plot({}, [], tmp_path / "x.png")
    with pytest.raises(ValueError, match="non-finite"):
        P.pareto_plot({"bad": (float("nan"), 0.5)}, [], tmp_path / "x.png")
