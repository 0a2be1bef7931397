"""DAMI-Pref (DESIGN 1.3): preference rules, BT loss, training, resume, meshes, rollouts, policy
(features h(q): test_pref_features.py).

A tiny random pair (dj.init_params + a perturbed copy) and a fake grader (right
iff the first generated token is even) stand in for the toy world; training
checks use a synthetic separable set: queries with h_0 > 0 prefer larger λ.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dami_jax as dj
from dami_jax.config import ConfigError
from dami_jax.generate.sampling import Sample
from dami_jax.models.sharding import make_mesh
from dami_jax.pair import ModelPair
from dami_jax.pref import (
    PrefConfig, PrefData, PrefPolicy, RewardModel, batch_indices, bt_loss, collect_rollouts,
    load_pref_config, load_rollouts, preference_pairs, prefers, prompt_features, save_reward_model,
    split_by_query, train_reward_model,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dj.ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True,
                      rope_theta=10000.0)


@jax.jit
def _perturbed(params, key):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return tree.unflatten([x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@functools.lru_cache(maxsize=None)
def tiny_pair(seed: int = 0) -> ModelPair:
    """Instruct = init_params(seed); Thinking = Instruct + 0.05·N(0, 1) noise."""
    instruct = dj.init_params(TINY, seed)
    return ModelPair(TINY, instruct, _perturbed(instruct, jax.random.key(seed + 100)),
                     generation_ids=dj.GenerationIds(eos=(1,)))


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(0)


def even_grader(i, ids) -> bool:
    return bool(ids) and ids[0] % 2 == 0


# ---------------------------------------------------------------------------
# Preferences

def test_preference_rules_on_hand_made_cases():
    # accuracy beats cost: a wins on accuracy although it costs 10x more
    assert prefers(0.75, 100, 0.5, 10, eps_acc=0.1, eps_cost=0.1)
    assert not prefers(0.5, 10, 0.75, 100, eps_acc=0.1, eps_cost=0.1)
    # accuracies within ε_acc: the cheaper one wins when cheaper by more than ε_cost
    assert prefers(0.5, 10, 0.55, 20, eps_acc=0.1, eps_cost=0.1)
    assert not prefers(0.55, 20, 0.5, 10, eps_acc=0.1, eps_cost=0.1)
    # within ε_acc and costs within the ε_cost margin: a tie, no pair either way
    assert not prefers(0.5, 95, 0.5, 100, eps_acc=0.0, eps_cost=0.1)
    assert not prefers(0.5, 100, 0.5, 95, eps_acc=0.0, eps_cost=0.1)
    # exactly at the margins: acc difference = ε_acc counts as "within"; cost = (1-ε)·cost_b is not cheaper
    assert not prefers(0.6, 50, 0.5, 50, eps_acc=0.1, eps_cost=0.0) and not prefers(0.5, 50, 0.6, 50, 0.1, 0.0)
    assert not prefers(0.5, 90, 0.5, 100, eps_acc=0.0, eps_cost=0.1)
    # a table: grid (0, 0.5, 1); q0: only λ=1 right; q1: all right, λ=0 and λ=0.5 equally cheap
    acc = np.array([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    cost = np.array([[4.0, 4.0, 80.0], [4.0, 4.0, 80.0]])
    p = preference_pairs(acc, cost, [0.0, 0.5, 1.0], eps_acc=0.0, eps_cost=0.1)
    got = sorted(zip(p.query.tolist(), p.win.tolist(), p.lose.tolist()))
    assert got == [(0, 1.0, 0.0), (0, 1.0, 0.5), (1, 0.0, 1.0), (1, 0.5, 1.0)]


def test_preference_pairs_are_antisymmetric_and_split_by_query():
    rng = np.random.default_rng(0)
    acc, cost = rng.integers(0, 5, (40, 11)) / 4, rng.integers(4, 90, (40, 11)).astype(float)
    lams = np.linspace(0, 1, 11)
    p = preference_pairs(acc, cost, lams, eps_acc=0.25, eps_cost=0.2)
    fwd = set(zip(p.query.tolist(), p.win.tolist(), p.lose.tolist()))
    assert all((q, b, a) not in fwd for q, a, b in fwd)
    train, held, held_q = split_by_query(p, 40, 0.25, seed=3)
    assert len(held_q) == 10 and len(train) + len(held) == len(p)
    assert not set(train.query.tolist()) & set(held_q.tolist())
    with pytest.raises(ValueError, match="must both be"):
        preference_pairs(acc, cost, lams[:5])


# ---------------------------------------------------------------------------
# Reward model and loss

def test_bt_loss_value_and_gradient_sign():
    model = RewardModel(4, fourier=3, widths=(16,), rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(1), (32, 4))
    win, lose = jnp.full((32,), 0.8), jnp.full((32,), 0.2)
    graphdef, params, stats = nnx.split(model, nnx.Param, ...)

    def loss_of(p):
        return bt_loss(nnx.merge(graphdef, p, stats), h, win, lose)[0]

    def margin_of(p):
        m = nnx.merge(graphdef, p, stats)
        return jnp.mean(m(h, win) - m(h, lose))

    loss_of, margin_of = jax.jit(loss_of), jax.jit(margin_of)
    loss, grads = jax.jit(jax.value_and_grad(loss_of))(params)
    margin = margin_of(params)
    # loss = mean softplus(-margin) >= softplus(-mean margin) (convexity), and log 2 at margin 0
    assert float(loss) >= float(jax.nn.softplus(-margin)) - 1e-6
    stepped = jax.tree.map(lambda p, g: p - 1e-2 * g, params, grads)
    assert float(margin_of(stepped)) > float(margin)  # descending the loss raises r(λ_w) − r(λ_l)
    assert float(loss_of(stepped)) < float(loss)
    # d loss / d r_w < 0 and d loss / d r_l > 0, exactly −σ(−m) and +σ(−m)
    g = jax.grad(lambda rw, rl: jax.nn.softplus(-(rw - rl)))(0.3, -0.1)
    assert g < 0 and math.isclose(g, -float(jax.nn.sigmoid(-0.4)), rel_tol=1e-6)
    zero = RewardModel(4, fourier=3, widths=(16,), rngs=nnx.Rngs(0))
    zero.head.kernel[...] = jnp.zeros_like(zero.head.kernel[...])
    loss0, acc0 = bt_loss(zero, h, win, lose)
    assert math.isclose(float(loss0), math.log(2), rel_tol=1e-6) and float(acc0) == 0.0


def synthetic_data(n_queries=96, d=8, seed=0, heldout_share=0.25) -> PrefData:
    """Separable preferences: h_0 > 0 prefers the larger λ of every grid pair, else the smaller."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n_queries, d)).astype(np.float32)
    lams = np.linspace(0, 1, 6)
    q, a, b = np.meshgrid(np.arange(n_queries), np.arange(6), np.arange(6), indexing="ij")
    up = feats[q, 0] > 0
    keep = np.where(up, a > b, a < b)
    from dami_jax.pref.preferences import Preferences

    prefs = Preferences(q[keep].astype(np.int32), lams[a[keep]].astype(np.float32),
                        lams[b[keep]].astype(np.float32))
    train, held, held_q = split_by_query(prefs, n_queries, heldout_share, seed)
    return PrefData(feats, train, held, held_q)


def small_cfg(**kw) -> PrefConfig:
    base = dict(steps=40, batch_size=32, lr=3e-3, warmup_steps=5, log_every=5, eval_every=20,
                checkpoint_every=10, fourier_features=4, mlp_widths=(32, 32), inference_points=21)
    return PrefConfig(**{**base, **kw})


def one_device_mesh():
    return make_mesh(data=1, devices=jax.devices()[:1])


def test_training_reduces_loss_on_separable_set(tmp_path):
    data = synthetic_data()
    cfg = small_cfg(steps=150, eval_every=150)
    metrics = tmp_path / "metrics.jsonl"
    res = train_reward_model(cfg, data, tmp_path / "ckpt", mesh=one_device_mesh(), metrics_path=str(metrics),
                             progress=False)
    first = np.mean([res.losses[s] for s in range(5)])
    last = np.mean([res.losses[s] for s in range(140, 150)])
    assert last < 0.3 * first, (first, last)
    assert res.metrics["heldout_acc"] > 0.9
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][:2] == [5, 10]
    assert sum(records[-1]["lam_hist"]) == len(data.heldout_queries)
    # argmax over the grid: queries with h_0 > 0 get λ near 1, the others λ near 0
    policy = PrefPolicy(res.model, {"inference_points": 101, "hidden_layer": -1, "pooling": "last"})
    lam, _ = policy.lam_from_features(data.feats)
    up = data.feats[:, 0] > 0
    assert np.mean(lam[up] > 0.8) > 0.85 and np.mean(lam[~up] < 0.2) > 0.85


def test_resume_continues_the_same_trajectory(tmp_path):
    data, cfg = synthetic_data(), small_cfg(steps=20, checkpoint_every=5)
    mesh = one_device_mesh()
    full = train_reward_model(cfg, data, tmp_path / "a", mesh=mesh, progress=False)
    half = train_reward_model(cfg, data, tmp_path / "b", mesh=mesh, stop_after=10, progress=False)
    assert half.step == 10 and sorted(half.losses) == list(range(10))
    rest = train_reward_model(cfg, data, tmp_path / "b", mesh=mesh, progress=False)  # a new "process"
    assert sorted(rest.losses) == list(range(10, 20))
    for s in range(10, 20):
        assert rest.losses[s] == full.losses[s]
    a, b = nnx.to_pure_dict(nnx.state(full.model)), nnx.to_pure_dict(nnx.state(rest.model))
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b))
    assert max(diffs) <= 1e-7
    with pytest.raises(ConfigError, match="other settings"):
        train_reward_model(small_cfg(steps=20, checkpoint_every=5, lr=1e-2), data, tmp_path / "b", mesh=mesh,
                           progress=False)
    with pytest.raises(ConfigError, match="other settings or data"):
        train_reward_model(cfg, synthetic_data(seed=1), tmp_path / "b", mesh=mesh, progress=False)


def test_batches_are_a_function_of_seed_and_step():
    a = [batch_indices(100, 32, 7, s) for s in range(7)]
    assert all(np.array_equal(x, batch_indices(100, 32, 7, s)) for s, x in enumerate(a))
    assert len(set(np.concatenate(a[:3]).tolist())) == 96  # an epoch never repeats a pair
    assert not np.array_equal(a[0], a[3])  # a new epoch reshuffles
    assert batch_indices(5, 8, 0, 0).shape == (8,)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_eight_devices_follow_the_one_device_loss_curve(tmp_path):
    data, cfg = synthetic_data(), small_cfg(steps=30, checkpoint_every=30)
    one = train_reward_model(cfg, data, tmp_path / "one", mesh=one_device_mesh(), progress=False)
    eight = train_reward_model(cfg, data, tmp_path / "eight", mesh=make_mesh(data=8), progress=False)
    for s in range(30):
        assert math.isclose(one.losses[s], eight.losses[s], rel_tol=1e-5), (s, one.losses[s], eight.losses[s])
    assert math.isclose(one.metrics["heldout_loss"], eight.metrics["heldout_loss"], rel_tol=1e-5)
    with pytest.raises(ConfigError, match="divide evenly"):
        train_reward_model(small_cfg(batch_size=12), data, tmp_path / "bad", mesh=make_mesh(data=8),
                           progress=False)


# ---------------------------------------------------------------------------
# Rollouts

SAMPLING = Sample(temperature=1.0)


def _collect(pair, prompts, path, **kw):
    args = dict(lams=[0.0, 0.5, 1.0], n_samples=2, sampling=SAMPLING, max_new_tokens=6, batch=5, seed=5,
                progress=False)
    return collect_rollouts(pair, prompts, even_grader, path, **{**args, **kw})


def test_rollouts_cache_resume_and_errors(pair, tmp_path, monkeypatch):
    prompts = [np.random.default_rng(i).integers(2, 32, 4).tolist() for i in range(5)]
    full = _collect(pair, prompts, tmp_path / "full.jsonl")
    assert full.correct.shape == (5, 3, 2) and full.tokens.min() >= 1 and full.tokens.max() <= 6
    assert 0 < full.acc().mean() < 1
    lines = (tmp_path / "full.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    assert header["fingerprint"] and header["lams"] == [0.0, 0.5, 1.0] and len(lines) == 1 + 5 * 3 * 2
    assert set(json.loads(lines[1])) == {"prompt", "lam", "sample", "correct", "tokens"}
    # interrupted after the first unit (sample 0: 5 prompts x 3 λ), mid-way through writing a line
    part = tmp_path / "part.jsonl"
    part.write_text("\n".join(lines[: 1 + 15]) + "\n" + lines[16][:7])
    resumed = _collect(pair, prompts, part)
    np.testing.assert_array_equal(resumed.correct, full.correct)
    np.testing.assert_array_equal(resumed.tokens, full.tokens)
    assert len(part.read_text().splitlines()) == len(lines)
    def no_sweep(*a, **k):
        raise AssertionError("a complete rollouts file must not generate again")

    monkeypatch.setattr("dami_jax.pref.rollouts.sweep", no_sweep)
    again = _collect(pair, prompts, part)
    np.testing.assert_array_equal(again.tokens, full.tokens)
    loaded = load_rollouts(part, pair)
    np.testing.assert_array_equal(loaded.tokens, full.tokens)
    # a rollouts file of another pair, or other settings: clear errors
    with pytest.raises(ConfigError, match="rollouts were made for pair"):
        _collect(tiny_pair(1), prompts, part)
    with pytest.raises(ConfigError, match="rollouts were made for pair"):
        load_rollouts(part, tiny_pair(1))
    with pytest.raises(ConfigError, match="n_samples"):
        _collect(pair, prompts, part, n_samples=3)


@pytest.mark.parametrize("grid, match", [([], "non-empty"), ([0.0, 1.5], "outside"), ([-0.1, 0.5], "outside"),
                                         ([0.0, float("nan")], "outside"), ([0.5, 0.5], "duplicate")])
def test_bad_grid_is_refused(pair, tmp_path, grid, match):
    with pytest.raises(ValueError, match=match):
        _collect(pair, [[2, 3]], tmp_path / "r.jsonl", lams=grid)
    assert not (tmp_path / "r.jsonl").exists()


def test_config_file_and_errors():
    cfg = load_pref_config(os.path.join(ROOT, "configs", "pref_toy.yaml"))
    assert cfg.lam_grid == tuple(round(0.1 * i, 1) for i in range(11)) and cfg.inference_points == 101
    with pytest.raises(ConfigError, match="unknown key"):
        load_pref_config(None, ["eps=0.1"])
    with pytest.raises(ConfigError, match="lam_grid"):
        load_pref_config(None, ["lam_grid=[]"])
    with pytest.raises(ConfigError, match=r"lam_grid values must be in \[0, 1\]"):
        load_pref_config(None, ["lam_grid=[0.0, 2.0]"])
    with pytest.raises(ConfigError, match="pooling"):
        load_pref_config(None, ["pooling=max"])
    with pytest.raises(ConfigError, match="target_drop"):
        load_pref_config(None, ["target_drop=2"])
    with pytest.raises(ConfigError, match="pair"):
        load_pref_config(None, ["pair=null"])


# ---------------------------------------------------------------------------
# The policy

def test_policy_from_dir_and_registry(pair, tmp_path):
    from dami_jax.policies.base import build_policy, pair_fingerprint

    prompts = [np.random.default_rng(i).integers(2, 32, 3 + i % 4).tolist() for i in range(6)]
    feats = prompt_features(TINY, pair.instruct, prompts, layer=1, pooling="mean")
    model = RewardModel(feats.shape[1], 2, (8,), rngs=nnx.Rngs(0))
    model.set_stats(feats)
    meta = {"fingerprint": pair_fingerprint(pair), "hidden_layer": 1, "pooling": "mean", "inference_points": 11}
    save_reward_model(model, tmp_path / "rm", meta)
    policy = PrefPolicy.from_dir(tmp_path / "rm", pair)
    out = policy(prompts, pair)
    assert out.lam.shape == (6,)
    assert np.abs(out.lam[:, None] - np.linspace(0, 1, 11)[None]).min(1).max() < 1e-6  # on the grid
    want = np.linspace(0, 1, 11)[np.argmax(np.asarray(model.grid_scores(jnp.asarray(feats), jnp.linspace(0, 1, 11))), 1)]
    np.testing.assert_allclose(out.lam, want, atol=1e-6)
    built = build_policy(f"pref:{tmp_path / 'rm'}", pair)
    np.testing.assert_array_equal(built(prompts, pair).lam, out.lam)
    with pytest.raises(ConfigError, match="trained for pair"):
        policy(prompts, tiny_pair(1))


# ---------------------------------------------------------------------------
# Several hosts: 2 processes x 4 CPU devices, gloo collectives, loopback coordinator.

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    sys.path.insert(0, sys.argv[4])
    from test_pref import small_cfg, synthetic_data
    from dami_jax.models.sharding import make_mesh
    from dami_jax.pref.train import train_reward_model
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    res = train_reward_model(small_cfg(steps=20, checkpoint_every=10), synthetic_data(), sys.argv[3],
                             mesh=make_mesh(data=8), progress=False)
    if jax.process_index() == 0:
        print("LOSSES " + json.dumps([res.losses[s] for s in range(20)]))
""")


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_two_processes_follow_the_single_process_curve(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i), str(tmp_path / "ckpt"),
                               os.path.dirname(os.path.abspath(__file__))], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    multi = json.loads([ln for ln in outs[0].splitlines() if ln.startswith("LOSSES ")][0][7:])
    single = train_reward_model(small_cfg(steps=20, checkpoint_every=10), synthetic_data(), tmp_path / "one",
                                mesh=make_mesh(data=8), progress=False)
    np.testing.assert_allclose(multi, [single.losses[s] for s in range(20)], rtol=1e-5)
    assert os.path.isdir(tmp_path / "ckpt" / "20")


# ---------------------------------------------------------------------------
# The shipped toy reward model and the end-to-end pipeline on the shipped toy pair.

PREF_ASSET = os.path.join(ROOT, "dami_jax", "pref", "assets", "toy")


def _toy_pair():
    from dami_jax.pair import load_pair
    from dami_jax.toyworld import default_pair_dirs

    try:
        dirs = default_pair_dirs()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return load_pair(*dirs)


def test_shipped_reward_model_serves_the_shipped_pair():
    from dami_jax.eval.pairs import toy_pair_config
    from dami_jax.eval.problem_sets import toy_problems
    from dami_jax.eval.run import eval_prompts
    from dami_jax.policies.base import build_policy

    if not os.path.isfile(os.path.join(PREF_ASSET, "reward_model.json")):
        pytest.skip("no shipped reward model")
    policy = build_policy("pref", _toy_pair())
    assert policy.beta == 0.0  # shipped untilted
    prompts = eval_prompts(_toy_pair(), toy_pair_config(), toy_problems(12, seed=5))
    out = policy(prompts, _toy_pair())
    assert out.lam.shape == (12,) and out.info["reward"].shape == (12,)
    with open(os.path.join(PREF_ASSET, "report.json")) as f:
        assert json.load(f)["heldout"]["heldout_acc"] >= 0.75


@pytest.mark.slow
def test_pipeline_runs_and_resumes_on_the_toy_pair(tmp_path, monkeypatch):
    from dami_jax.pref.pipeline import run

    _toy_pair()
    # eval_prompts.limit=24: the eval's engine then has the rollouts' shape (24 rows) and reuses its programs
    cfg = load_pref_config(os.path.join(ROOT, "configs", "pref_toy.yaml"), [
        "prompts.limit=12", "n_samples=1", "lam_grid=[0.0, 1.0]", "pair_overrides=[max_new_tokens=8]",
        "rollout_batch=12", "steps=6", "batch_size=8", "log_every=2", "eval_every=3", "checkpoint_every=3",
        "eval_prompts.limit=24", "heldout_share=0.25", "target_drop=0.0"])
    report = run(cfg, str(tmp_path / "out"), progress=False)
    assert report["eval"]["policies"]["static:1"]["mean_tokens"] <= 8
    for name in ("reward_model.json", "params.npz", "metrics.jsonl", "report.json", "work/rollouts.jsonl"):
        assert (tmp_path / "out" / name).exists(), name
    # β calibrated on the held-out queries' rollouts, stored with the model, and what plain pref:DIR uses
    cal = report["beta_calibration"]
    assert cal["accuracy"] >= cal["reference_accuracy"] and cal["n_queries"] == 3
    assert PrefPolicy.from_dir(tmp_path / "out").beta == cal["beta"]

    def no_sweep(*a, **k):
        raise AssertionError("a finished run must not generate rollouts again")

    monkeypatch.setattr("dami_jax.pref.rollouts.sweep", no_sweep)
    again = run(dataclasses_replace(cfg, eval_prompts=None), str(tmp_path / "out"), progress=False)
    assert again["heldout"] == report["heldout"] and again["beta_calibration"] == cal


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)
