"""Θ(λ) = λ·Θ_T + (1 − λ)·Θ_I: values, endpoints, vmapped stacks, λ checks, schedules, shardings.

Param trees are fresh random normal values on every leaf (norm scales too), in
the exact shapes of a tiny Qwen3-MoE (`moe_norm`: MoE layers 0 and 2, dense
layer 1, untied lm_head), so every module kind is covered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import dami_jax as dj
from helpers import hf_config, leaves
from dami_jax.config import ConfigError
from dami_jax.interpolate import check_lam, delta_params, interpolate
from dami_jax.models import qwen3
from dami_jax.models.sharding import make_mesh, param_shardings
from dami_jax.schedule import KINDS, Rule, Schedule, module_kind

DTYPES = ["float32", "bfloat16"]


def model_cfg(name: str = "moe_norm") -> dj.ModelConfig:
    return dj.ModelConfig.from_hf(hf_config(name).to_dict())


def random_tree(cfg, seed: int, dtype="float32"):
    rng = np.random.default_rng(seed)
    abstract = qwen3.abstract_params(cfg)
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape, np.float32)).astype(dtype), abstract)


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def reference(theta_i, theta_t, lam, scale=lambda path: 1.0):
    """float64 NumPy λ·t + (1 − λ)·i on every leaf: {path: (value, |λ·t| + |(1 − λ)·i|)}."""
    li, lt = leaves(theta_i), leaves(theta_t)
    out = {}
    for path in li:
        lam_eff = np.float64(lam) * scale(path)
        i64, t64 = li[path].astype(np.float64), lt[path].astype(np.float64)
        out[path] = (lam_eff * t64 + (1 - lam_eff) * i64, np.abs(lam_eff * t64) + np.abs((1 - lam_eff) * i64))
    return out


def assert_close_to_reference(got: np.ndarray, ref: tuple, what) -> None:
    """Float32 arithmetic (error <= 2^-23 of the terms' magnitudes), then one rounding to the
    leaf dtype (half an ulp; a full ulp when the float32 result straddles a rounding point)."""
    value, terms = ref
    g = got.astype(np.float64)
    bits = 24 if got.dtype == np.float32 else 8  # significant bits of the output dtype
    mag = np.maximum(np.maximum(np.abs(value), np.abs(g)), 1e-30)
    ulp = 2.0 ** (np.floor(np.log2(mag)) - (bits - 1))
    bound = ulp + 2.0 ** -23 * terms
    err = np.abs(g - value)
    assert np.all(err <= bound), (what, float(np.max(err / bound)))


@pytest.fixture(scope="module")
def cfg():
    return model_cfg()


@pytest.fixture(scope="module", params=DTYPES)
def pair(request, cfg):
    return request.param, random_tree(cfg, 0, request.param), random_tree(cfg, 1, request.param)


# ---------------------------------------------------------------------------
# Values

def test_tree_covers_every_kind(cfg):
    kinds = {module_kind(p) for p in leaves(random_tree(cfg, 0))}
    assert kinds == set(KINDS) - {"vision"}  # the Qwen3-VL tower's kind: tests/test_qwen3_vl.py


@pytest.mark.parametrize("lam", [0.05, 0.3, 0.8])
def test_matches_float64_reference(pair, lam):
    dtype, ti, tt = pair
    got = leaves(interpolate(ti, tt, lam))
    ref = reference(ti, tt, lam)
    assert got.keys() == ref.keys()
    exact = total = 0
    for path, r in ref.items():
        assert got[path].dtype == np.dtype(dtype if dtype == "float32" else ml_dtypes.bfloat16), path
        assert_close_to_reference(got[path], r, path)
        exact += int(np.sum(got[path] == r[0].astype(got[path].dtype)))
        total += got[path].size
    if dtype == "bfloat16":  # float32 arithmetic is far finer: mostly the correctly rounded value
        assert exact / total > 0.98


@pytest.mark.parametrize("lam, which", [(0.0, 0), (1.0, 1)])
def test_endpoints_are_exact(pair, lam, which):
    _, ti, tt = pair
    want = leaves((ti, tt)[which])
    for path, g in leaves(interpolate(ti, tt, lam)).items():
        assert same_bits(g, want[path]), path
    stacked = leaves(interpolate(ti, tt, np.array([lam, 1 - lam])))
    other = leaves((ti, tt)[1 - which])
    for path, g in stacked.items():
        assert same_bits(g[0], want[path]) and same_bits(g[1], other[path]), path


def test_vmapped_stack_equals_separate_calls(pair):
    _, ti, tt = pair
    lams = np.array([0.0, 0.1, 0.45, 0.8, 1.0], np.float32)
    stacked = leaves(interpolate(ti, tt, lams))
    for k, lam in enumerate(lams):
        one = leaves(interpolate(ti, tt, float(lam)))
        for path, x in one.items():
            assert stacked[path].shape == (len(lams), *x.shape)
            assert same_bits(stacked[path][k], x), (float(lam), path)


# ---------------------------------------------------------------------------
# λ checks

@pytest.mark.parametrize("lam, match", [
    (1.5, r"lam=1.5 is outside \[0, 1\]"),
    (-0.25, r"lam=-0.25 is outside \[0, 1\]"),
    ([0.2, 1.01, 0.5], r"outside \[0, 1\].*allow_extrapolation"),
    (float("nan"), "NaN"),
    ([0.5, float("nan")], "NaN"),
    ([[0.1, 0.2]], "scalar or a 1-D array"),
])
def test_bad_lam_is_refused(cfg, lam, match):
    ti, tt = random_tree(cfg, 0), random_tree(cfg, 1)
    with pytest.raises(ValueError, match=match):
        interpolate(ti, tt, lam)


def test_extrapolation_is_opt_in(cfg):
    ti, tt = random_tree(cfg, 0), random_tree(cfg, 1)
    for lam in (1.5, -0.5):
        got = leaves(interpolate(ti, tt, lam, allow_extrapolation=True))
        for path, r in reference(ti, tt, lam).items():
            assert_close_to_reference(got[path], r, (lam, path))
    with pytest.raises(ValueError, match="NaN"):
        check_lam(float("nan"), allow_extrapolation=True)
    with pytest.raises(ValueError, match="finite"):
        check_lam(float("inf"), allow_extrapolation=True)


def test_mismatched_trees_are_refused(cfg):
    ti = random_tree(cfg, 0)
    tt = random_tree(model_cfg("moe_sparse"), 1)
    with pytest.raises(ValueError, match="differ in structure"):
        interpolate(ti, tt, 0.5)
    tt = random_tree(cfg, 1)
    tt["final_norm"]["scale"] = tt["final_norm"]["scale"].astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="final_norm/scale"):
        interpolate(ti, tt, 0.5)


# ---------------------------------------------------------------------------
# Schedules

def _changed_layers(theta_i, out) -> tuple[set, bool]:
    """Layers with any leaf differing from Θ_I, and whether a global leaf changed."""
    li, lo = leaves(theta_i), leaves(out)
    changed = {p for p in li if not same_bits(li[p], lo[p])}
    return {int(p[1]) for p in changed if p[0] == "layers"}, any(p[0] != "layers" for p in changed)


def test_schedule_mlp_only_changes_only_mlp_leaves(cfg):
    ti, tt = random_tree(cfg, 0), random_tree(cfg, 1)
    sched = Schedule(cfg.num_layers, default=0.0, rules=(Rule(kinds=("mlp", "experts")),))
    got = leaves(interpolate(ti, tt, 0.6, schedule=sched))
    plain, base = leaves(interpolate(ti, tt, 0.6)), leaves(ti)
    n_mlp = 0
    for path, g in got.items():
        if module_kind(path) in ("mlp", "experts"):
            assert same_bits(g, plain[path]), path
            assert not same_bits(g, base[path]), path
            n_mlp += 1
        else:  # attention, norms, router, embeddings, lm_head: Instruct exactly
            assert same_bits(g, base[path]), path
    assert n_mlp == 3 * cfg.num_layers  # gate/up/down of 2 MoE + 1 dense layer


@pytest.mark.parametrize("rule, layers", [
    (dict(layers=(1, None)), {1, 2}),
    (dict(layers=(-1, None)), {2}),
    (dict(layers=(0, 2)), {0, 1}),
    (dict(layers=(None, -2)), {0}),
    (dict(fraction=(0.0, 0.3)), {0}),
    (dict(fraction=(0.5, 1.0)), {2}),
    (dict(fraction=(0.0, 1.0)), {0, 1, 2}),
])
def test_schedule_layer_selection(cfg, rule, layers):
    ti, tt = random_tree(cfg, 0), random_tree(cfg, 1)
    sched = Schedule(cfg.num_layers, default=0.0, rules=(Rule(**rule),))
    got, globals_changed = _changed_layers(ti, interpolate(ti, tt, 1.0, schedule=sched))
    assert got == layers
    assert not globals_changed  # layer ranges select per-layer params only


def test_schedule_scale_multiplies_lam(cfg):
    ti, tt = random_tree(cfg, 0), random_tree(cfg, 1)
    sched = Schedule(cfg.num_layers, default=1.0, rules=(
        Rule(kinds=("attn",), scale=0.5),
        Rule(kinds=("attn",), layers=(2, None), scale=0.25),  # the last matching rule wins
    ))
    got = leaves(interpolate(ti, tt, 0.8, schedule=sched))
    at = {s: leaves(interpolate(ti, tt, 0.8 * s)) for s in (1.0, 0.5, 0.25)}
    for path, g in got.items():
        s = (0.25 if path[1] == "2" else 0.5) if module_kind(path) == "attn" else 1.0
        np.testing.assert_array_equal(g, at[s][path], err_msg=str(path))


def test_schedule_yaml(tmp_path, cfg):
    good = tmp_path / "good.yaml"
    good.write_text("default: 0.0\nrules:\n  - kinds: [mlp, experts]\n    layers: [1, null]\n"
                    "  - kinds: [attn]\n    fraction: [0.5, 1.0]\n    scale: 0.5\n")
    sched = Schedule.from_yaml(str(good), cfg.num_layers)
    assert sched == Schedule(cfg.num_layers, 0.0, (Rule(kinds=("mlp", "experts"), layers=(1, None)),
                                                   Rule(kinds=("attn",), fraction=(0.5, 1.0), scale=0.5)))
    assert sched.scale(("layers", 0, "mlp", "gate_proj")) == 0.0
    assert sched.scale(("layers", 2, "mlp", "gate_proj")) == 1.0
    assert sched.scale(("layers", 2, "attn", "q_proj", "kernel")) == 0.5
    assert sched.scale(("embed", "embedding")) == 0.0
    for text, match in [
        ("defualt: 0.0\n", r"unknown key\(s\) \['defualt'\]"),
        ("rules:\n  - kind: [mlp]\n", r"unknown key\(s\) \['kind'\]"),
        ("rules:\n  - kinds: [mlps]\n", r"unknown kind\(s\) \['mlps'\]"),
        ("rules:\n  - fraction: [0.5, 1.5]\n", "fraction"),
        ("rules:\n  - layers: [1]\n", "layers"),
        ("- 1\n- 2\n", "mapping"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match):
            Schedule.from_yaml(str(bad), cfg.num_layers)


# ---------------------------------------------------------------------------
# delta_params

def test_delta_params_structure(cfg):
    ti, tt = random_tree(cfg, 0), random_tree(cfg, 1)
    delta = delta_params(ti, tt)
    assert jax.tree.structure(delta) == jax.tree.structure(ti)
    li, lt = leaves(ti), leaves(tt)
    for path, d in leaves(delta).items():
        assert d.shape == (2, *li[path].shape) and d.dtype == li[path].dtype, path
        assert same_bits(d[0], li[path]), path
        np.testing.assert_array_equal(d[1], lt[path] - li[path], err_msg=str(path))
    assert qwen3.is_delta(delta) and not qwen3.is_delta(ti)
    # Θ_I + λ·Δ is Θ(λ) up to float32 rounding
    merged = leaves(interpolate(ti, tt, 0.3))
    for path, d in leaves(delta).items():
        np.testing.assert_allclose(d[0] + np.float32(0.3) * d[1], merged[path], rtol=1e-5, atol=1e-6)


def test_delta_params_with_schedule(cfg):
    ti, tt = random_tree(cfg, 0), random_tree(cfg, 1)
    sched = Schedule(cfg.num_layers, default=0.5, rules=(Rule(kinds=("router", "norm"), scale=0.0),))
    li, lt = leaves(ti), leaves(tt)
    for path, d in leaves(delta_params(ti, tt, schedule=sched)).items():
        s = np.float32(sched.scale(path))
        np.testing.assert_array_equal(d[1], (lt[path] - li[path]) * s, err_msg=str(path))
        if module_kind(path) in ("router", "norm"):
            assert not d[1].any()


# ---------------------------------------------------------------------------
# Sharding (8 simulated CPU devices, set up by conftest)

def _spec(sharding, ndim):
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return spec


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_sharded_interpolation_keeps_input_shardings():
    cfg = model_cfg("dense_tied")  # every dimension even: the (2, 2, 2) mesh really shards
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    ti, tt = random_tree(cfg, 0), random_tree(cfg, 1)
    shardings = param_shardings(qwen3.abstract_params(cfg), mesh)
    si, st = jax.device_put(ti, shardings), jax.device_put(tt, shardings)
    n_sharded = sum(any(a is not None for a in s.spec) for s in jax.tree.leaves(shardings))
    assert n_sharded >= 5

    merged = interpolate(si, st, 0.3)
    for (path, x), s, ref in zip(jax.tree_util.tree_leaves_with_path(merged), jax.tree.leaves(shardings),
                                 jax.tree.leaves(interpolate(ti, tt, 0.3))):
        assert x.sharding.is_equivalent_to(s, x.ndim), (path, x.sharding, s)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref))

    lams = np.array([0.0, 0.5, 1.0], np.float32)
    stacked = interpolate(si, st, lams)
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(stacked), jax.tree.leaves(shardings)):
        assert x.shape[0] == 3
        assert _spec(x.sharding, x.ndim) == (None, *_spec(s, x.ndim - 1)), (path, x.sharding.spec, s.spec)
        assert len(x.sharding.device_set) == 8

    delta = delta_params(si, st)
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(delta), jax.tree.leaves(shardings)):
        assert _spec(x.sharding, x.ndim) == (None, *_spec(s, x.ndim - 1)), (path, x.sharding.spec, s.spec)
    # the delta stack is what param_shardings asks for in delta mode
    want = param_shardings(qwen3.abstract_params(cfg, delta=True), mesh)
    for x, s in zip(jax.tree.leaves(delta), jax.tree.leaves(want)):
        assert x.sharding.is_equivalent_to(s, x.ndim)
