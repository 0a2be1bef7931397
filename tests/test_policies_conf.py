"""Policies: the DAMI-Conf jitted scoring against a float64 NumPy reference, exclusion of
format positions, calibration math and files, routing share, build_policy specs."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

import dami_jax as dj
from dami_jax.config import ConfigError
from dami_jax.pair import ModelPair
from dami_jax.policies import (
    Calibration, ConfConfig, ConfPolicy, RoutingPolicy, StaticPolicy, build_policy, calibrate_conf,
    fit_conf_supervised, known_policies, logistic_fit, quantile_calibration, register_policy,
    routing_threshold, score_prompts,
)
from dami_jax.models.qwen3 import abstract_params
from dami_jax.policies.conf import format_token_ids

from helpers import left_pad, random_prompts

VOCAB, PROBE = 32, 8
CFG = dj.ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                     num_kv_heads=1, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True)
CONF = ConfConfig(probe_tokens=PROBE, batch_size=8, w_entropy=1.0, w_js=2.0, w_maxprob=0.5)


def _params(seed, base=None, noise=0.4):
    """Random params with peaked distributions (std 0.6 matrices, unit norms), or `base` + noise."""
    rng = np.random.default_rng(seed)
    shapes = base if base is not None else abstract_params(CFG)

    def leaf(x):
        if len(x.shape) == 1:
            return np.ones(x.shape, np.float32) if base is None else np.asarray(x)
        start = 0.0 if base is None else np.asarray(x)
        return jax.numpy.asarray(start + (noise if base is not None else 0.6) * rng.normal(size=x.shape),
                                 np.float32)

    return jax.tree.map(leaf, shapes)


@pytest.fixture(scope="module")
def pair():
    base = _params(0)
    return ModelPair(CFG, base, _params(1, base))


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(VOCAB, [5, 9, 12, 7, 16, 3, 10, 11], seed=3)


def _ref_signals(li, lt):
    """float64 NumPy: normalized entropy, JS/log 2 and 1 - max p from (..., V) logits."""
    def logp(x):
        x = np.asarray(x, np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lpi, lpt = logp(li), logp(lt)
    pi, pt = np.exp(lpi), np.exp(lpt)
    m = 0.5 * (pi + pt)
    js = 0.5 * (pi * (lpi - np.log(m))).sum(-1) + 0.5 * (pt * (lpt - np.log(m))).sum(-1)
    return -(pi * lpi).sum(-1) / math.log(li.shape[-1]), js / math.log(2), 1 - pi.max(-1)


def _check_against_reference(pair, prompts, conf, out):
    stops = set(pair.stop_tokens)
    gen = dj.generate(CFG, pair.instruct, prompts, PROBE, stop_tokens=pair.stop_tokens)
    np.testing.assert_array_equal(out["probe"], gen.tokens)  # the probe is the Instruct's greedy output
    np.testing.assert_array_equal(out["probe_len"], gen.lengths)
    seqs = [p + out["probe"][i].tolist() for i, p in enumerate(prompts)]
    tokens, mask = left_pad(seqs)
    li = np.asarray(dj.forward(CFG, pair.instruct, tokens, mask))[:, -PROBE - 1: -1]
    lt = np.asarray(dj.forward(CFG, pair.thinking, tokens, mask))[:, -PROBE - 1: -1]
    ent, js, maxp = _ref_signals(li, lt)
    excl = set(format_token_ids(pair, conf)) | stops
    content = np.array([[j < out["probe_len"][i] and out["probe"][i, j] not in excl for j in range(PROBE)]
                        for i in range(len(prompts))])
    np.testing.assert_array_equal(out["content"], content)
    for name, ref in (("entropy", ent), ("js", js), ("maxprob", maxp)):
        valid = np.arange(PROBE)[None] < out["probe_len"][:, None]
        np.testing.assert_allclose(out[f"{name}_pos"][valid], ref[valid], atol=2e-5, err_msg=name)
        n = content.sum(1)
        agg = (np.where(content, ref, 0).max(1) if conf.aggregate == "max"
               else np.where(content, ref, 0).sum(1) / np.maximum(n, 1))
        np.testing.assert_allclose(out[name], agg, atol=2e-5, err_msg=name)
    s = sum(w * out[k] for w, k in zip(conf.weights, ("entropy", "js", "maxprob")))
    np.testing.assert_allclose(out["score"], s, atol=1e-5)


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_scoring_matches_numpy_reference(pair, prompts, aggregate):
    conf = dataclasses.replace(CONF, aggregate=aggregate)
    out = score_prompts(pair, prompts, conf)
    assert out["js"].max() > 1e-3 and out["entropy"].max() > 1e-3  # the test pair is not degenerate
    _check_against_reference(pair, prompts, conf, out)


def test_without_js_the_thinking_pass_is_skipped(pair, prompts):
    conf = dataclasses.replace(CONF, w_js=0.0)
    full = score_prompts(pair, prompts, conf, with_js=True)
    lean = score_prompts(pair, prompts, conf)  # w_D = 0: D is not computed
    assert np.isnan(lean["js"]).all() and np.isnan(lean["js_pos"]).all() and np.isfinite(full["js"]).all()
    for k in ("probe", "probe_len", "content", "entropy", "maxprob", "n_content", "score", "lam"):
        np.testing.assert_allclose(lean[k], full[k], atol=1e-6, err_msg=k)
    # the Thinking model is not run: NaN Thinking weights leave every output of the lean scoring finite
    nan_t = ModelPair(CFG, pair.instruct, jax.tree.map(lambda x: x * np.nan, pair.thinking))
    poisoned = score_prompts(nan_t, prompts, conf)
    for k in ("entropy", "maxprob", "score", "lam"):
        np.testing.assert_allclose(poisoned[k], full[k], atol=1e-6, err_msg=k)
    assert np.isfinite(score_prompts(pair, prompts, CONF)["js"]).all()  # w_D ≠ 0: D is computed


def test_stop_and_excluded_tokens(pair, prompts):
    free = score_prompts(pair, prompts, CONF)["probe"]
    stop, fmt = int(free[0, 3]), int(free[1, 1])
    stopped = ModelPair(CFG, pair.instruct, pair.thinking, generation_ids=dj.GenerationIds(eos=(stop,)))
    conf = dataclasses.replace(CONF, exclude_ids=(fmt,))
    out = score_prompts(stopped, prompts, conf)
    assert out["probe_len"][0] <= 4 and not out["content"][0, out["probe_len"][0]:].any()
    assert not out["content"][out["probe"] == fmt].any() and not out["content"][out["probe"] == stop].any()
    _check_against_reference(stopped, prompts, conf, out)


def test_probe_stops_once_every_row_has_stopped(pair, prompts):
    """Every row hits a stop token by its second probe position: the probe loop ends there and the
    later positions are empty (no token, not valid, not content); signals equal the reference."""
    free = score_prompts(pair, prompts, CONF)["probe"]
    stops = tuple(sorted(set(free[:, 1].tolist())))
    stopped = ModelPair(CFG, pair.instruct, pair.thinking, generation_ids=dj.GenerationIds(eos=stops))
    out = score_prompts(stopped, prompts, CONF)
    assert out["probe_len"].max() <= 2 < PROBE
    assert (out["probe"][:, 2:] == 0).all() and not out["content"][:, 2:].any()
    assert (out["entropy_pos"][:, 2:] == 0).all()
    _check_against_reference(stopped, prompts, CONF, out)


def test_format_ids_from_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from dami_jax.toyworld import language as L
    from dami_jax.toyworld.tokenizer import save_tokenizer

    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    p = ModelPair(CFG, {}, {}, tok, generation_ids=dj.GenerationIds(eos=(L.EOS_ID,)))
    ids = lambda *ws: {L.TOKEN_ID[w] for w in ws}  # noqa: E731
    special = ids(*L.SPECIAL)
    assert set(format_token_ids(p, CONF)) == special | ids(L.BOX_OPEN, *L.ROLES, L.THINK, L.THINK_END)
    only = dataclasses.replace(CONF, exclude_added=False)
    assert set(format_token_ids(p, only)) == special | ids(L.THINK, L.THINK_END)
    bare = dataclasses.replace(CONF, exclude_added=False, exclude_special=False, exclude_tokens=())
    assert set(format_token_ids(p, bare)) == {L.EOS_ID}


def test_quantile_calibration_math():
    s = np.random.default_rng(0).normal(size=401)
    mu, tau = quantile_calibration(s, rho=0.3, tau_per_iqr=0.5, min_tau=1e-4)
    assert mu == pytest.approx(np.quantile(s, 0.7))
    assert tau == pytest.approx(0.5 * (np.quantile(s, 0.75) - np.quantile(s, 0.25)))
    assert quantile_calibration(np.ones(5), 0.5, 0.5, 1e-3) == (1.0, 1e-3)
    # Logistic s: τ = IQR/(2 ln 3) recovers the scale, so σ((s − μ)/τ) is s's CDF.
    logistic = np.random.default_rng(1).logistic(2.0, 0.7, size=200_000)
    mu, tau = quantile_calibration(logistic, 0.5, ConfConfig().tau_per_iqr, 1e-4)
    assert mu == pytest.approx(2.0, abs=0.02) and tau == pytest.approx(0.7, rel=0.02)
    with pytest.raises(ValueError):
        quantile_calibration([1.0], 0.5, 0.5, 1e-4)


@pytest.fixture(scope="module")
def calibration(pair):
    cal_prompts = random_prompts(VOCAB, [4 + i % 12 for i in range(32)], seed=11)
    return cal_prompts, calibrate_conf(pair, cal_prompts, dataclasses.replace(CONF, rho=0.25))


def test_calibrate_and_policy(pair, calibration):
    cal_prompts, cal = calibration
    s = score_prompts(pair, cal_prompts, cal.conf)["score"]
    assert cal.scores == tuple(sorted(s.tolist()))
    assert (cal.mu, cal.tau) == pytest.approx(quantile_calibration(s, 0.25, cal.conf.tau_per_iqr, 1e-4))
    res = ConfPolicy(cal)(cal_prompts, pair)
    np.testing.assert_allclose(res.lam, 1 / (1 + np.exp(-(s - cal.mu) / cal.tau)), atol=1e-5)
    assert abs((res.lam > 0.5).mean() - 0.25) <= 1 / len(s)  # share ρ above the midpoint
    assert set(res.info) >= {"score", "entropy", "js", "maxprob", "n_content"}


def test_save_load_and_fingerprint(pair, calibration, tmp_path):
    _, cal = calibration
    path = tmp_path / "cal.json"
    cal.save(path)
    assert Calibration.load(path) == cal
    assert isinstance(build_policy(f"conf:{path}", pair), ConfPolicy)
    other = ModelPair(CFG, pair.instruct, _params(5, pair.thinking, noise=0.01))
    with pytest.raises(ConfigError, match="recalibrate"):
        build_policy(f"conf:{path}", other)
    policy = build_policy({"name": "conf", "calibration": str(path)})  # no pair: checked at call time
    with pytest.raises(ConfigError, match="recalibrate"):
        policy([[1, 2, 3]], other)
    with pytest.raises(ConfigError, match="no Conf calibration"):
        build_policy(f"conf:{tmp_path / 'missing.json'}", pair)
    (tmp_path / "bad.json").write_text('{"version": 1, "mu": 0}')
    with pytest.raises(ConfigError, match="not a valid"):
        Calibration.load(tmp_path / "bad.json")


def test_routing_share(pair, calibration, tmp_path):
    cal_prompts, cal = calibration
    cal.save(tmp_path / "cal.json")
    for share in (0.25, 0.5, 0.75):
        policy = build_policy(f"routing:{share}:{tmp_path / 'cal.json'}", pair)
        res = policy(cal_prompts, pair)
        assert set(np.unique(res.lam)) <= {0.0, 1.0}
        assert abs(res.lam.mean() - share) <= 1 / len(cal_prompts)
    assert build_policy({"name": "routing", "calibration": str(tmp_path / "cal.json")}).share == 0.5
    assert routing_threshold([1, 2, 3], 0.0) == math.inf and routing_threshold([1, 2, 3], 1.0) == -math.inf
    with pytest.raises(ConfigError):
        RoutingPolicy(cal, share=1.5)


def test_supervised_fit(pair, calibration):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 2))
    y = rng.random(4000) < 1 / (1 + np.exp(-(3 * x[:, 0] - 1 * x[:, 1] + 0.5)))
    w, b = logistic_fit(x, y, l2=0.0)
    np.testing.assert_allclose([*w, b], [3, -1, 0.5], atol=0.25)
    cal_prompts, _ = calibration
    out = score_prompts(pair, cal_prompts, CONF)
    wrong = out["entropy"] > np.median(out["entropy"])
    cal = fit_conf_supervised(pair, cal_prompts, wrong, CONF)
    assert cal.method == "logistic" and abs(cal.conf.w_entropy) + abs(cal.conf.w_js) == pytest.approx(1.0)
    lam = ConfPolicy(cal)(cal_prompts, pair).lam
    assert ((lam > 0.5) == wrong).mean() >= 0.9


def test_recalibrating_reuses_the_compiled_scoring(pair, prompts):
    """μ, τ, the weights and the aggregation are traced `ScoreCoeffs`: no recompile."""
    from dami_jax.policies import conf_signals

    score_prompts(pair, prompts, CONF, 0.0, 1.0)
    compiled = conf_signals._cache_size()
    for conf, mu, tau in ((CONF, 0.3, 2.0), (dataclasses.replace(CONF, aggregate="max", w_js=0.5), -1.0, 0.1)):
        out = score_prompts(pair, prompts, conf, mu, tau)
        np.testing.assert_allclose(out["lam"], 1 / (1 + np.exp(-(out["score"] - mu) / tau)), atol=1e-5)
    assert conf_signals._cache_size() == compiled


def _policy_imports() -> dict[str, set[str]]:
    """module -> the dami_jax.policies modules it imports anywhere (function bodies too)."""
    import ast
    import os

    import dami_jax.policies as package

    root, out = os.path.dirname(package.__file__), {}
    for name in sorted(os.listdir(root)):
        if name.endswith(".py") and name != "__init__.py":
            with open(os.path.join(root, name)) as f:
                tree = ast.parse(f.read())
            found = set()
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                found |= {n.rsplit(".", 1)[1] for n in names if n.startswith("dami_jax.policies.")}
            out[name[:-3]] = found
    return out


def test_no_import_cycle_between_policy_modules():
    graph = _policy_imports()
    assert graph["calibration"] <= {"base", "conf_config"}  # the calibration types need only ConfConfig
    assert "calibrate" not in graph["conf"] and "calibrate" not in graph["routing"]
    done, path = set(), []

    def visit(m):
        assert m not in path, f"import cycle: {' -> '.join(path + [m])}"
        if m not in done:
            path.append(m)
            for n in graph.get(m, ()):
                visit(n)
            path.pop()
            done.add(m)

    for m in graph:
        visit(m)


def test_build_policy_specs_and_static():
    assert build_policy("static:0.8")([[1], [2]], None).lam.tolist() == pytest.approx([0.8, 0.8])
    assert build_policy({"name": "static", "lam": 1}).lam == 1.0
    for bad in ("static:1.5", "static:-0.1", "static:nan", "static:abc", "static", "static:0.1:2"):
        with pytest.raises(ConfigError):
            build_policy(bad)
    with pytest.raises(ConfigError):
        StaticPolicy(True)
    with pytest.raises(ConfigError, match="known policies: .*conf.*routing.*static"):
        build_policy("nope")
    with pytest.raises(ConfigError, match="unknown option"):
        build_policy({"name": "static", "lam": 0.5, "beta": 1})
    with pytest.raises(ConfigError, match="needs a calibration"):
        build_policy("conf")
    register_policy("half", lambda pair=None: StaticPolicy(0.5))
    assert "half" in known_policies() and build_policy("half").lam == 0.5
    with pytest.raises(ConfigError):
        ConfConfig(aggregate="median")


def test_signal_summary_statistics():
    """What `dami calibrate conf` prints: AUROC and Spearman against scipy / brute force, quartiles
    against NumPy; a signal not measured (D while w_D = 0: NaN) is left out."""
    from scipy import stats

    from dami_jax.policies.calibrate import auroc, signal_summary, spearman

    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, 40) / 5.0  # ties on purpose
    m = a + rng.normal(0, 0.3, 40)
    wrong = rng.random(40) < a
    assert spearman(a, m) == pytest.approx(stats.spearmanr(a, m).statistic, abs=1e-12)
    pairs = [(x > y) + 0.5 * (x == y) for x in a[wrong] for y in a[~wrong]]
    assert auroc(a, wrong) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert math.isnan(spearman(a, np.ones(40))) and math.isnan(auroc(a, np.zeros(40, bool)))

    out = {"entropy": a, "js": np.full(40, np.nan), "maxprob": m, "score": 2.0 * a}
    rows = signal_summary(out, wrong)
    assert set(rows) == {"entropy", "maxprob"}
    e = rows["entropy"]
    assert (e["mean"], e["std"], e["median"]) == pytest.approx((a.mean(), a.std(), np.median(a)))
    assert e["spearman_score"] == pytest.approx(1.0) and "spearman_js" not in e
    assert e["spearman_maxprob"] == pytest.approx(spearman(a, m)) and e["auroc_wrong"] == pytest.approx(auroc(a, wrong))
    assert "auroc_wrong" not in signal_summary(out)["entropy"]


def test_conf_defaults_use_both_signals_and_the_toy_pair_entropy_alone():
    """Both signals by default (and on the Qwen3 pair configs); w_D = 0 is the toy pair's measured setting."""
    import glob
    import os

    from dami_jax.eval.pairs import load_pair_config, toy_pair_config

    assert ConfConfig().w_entropy > 0 and ConfConfig().w_js > 0
    toy = toy_pair_config().conf
    assert toy.w_js == 0.0 and toy.w_entropy == 1.0
    assert Calibration.load(toy_pair_config().conf_calibration).conf == toy  # what the shipped file was made with
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    for path in glob.glob(os.path.join(root, "pair_qwen3_*.yaml")):
        conf = load_pair_config(path).conf
        assert conf.w_entropy > 0 and conf.w_js > 0, path
