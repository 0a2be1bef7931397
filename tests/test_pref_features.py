"""DAMI-Pref features h(q) (dami_jax/pref/features.py): hidden states, pooling, the optional
greedy probe, sharding. Uses test_pref.py's tiny random pair."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dami_jax as dj
from dami_jax.config import ConfigError
from dami_jax.generate.decode import left_pad
from dami_jax.models.sharding import make_mesh
from dami_jax.pref import PrefPolicy, RewardModel, hidden_states, load_pref_config, prompt_features, save_reward_model
from test_pref import TINY, tiny_pair


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(0)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    return [np.random.default_rng(seed + i).integers(2, 32, 3 + i % 5).tolist() for i in range(n)]


def test_hidden_states_match_the_model(pair):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 32, n).tolist() for n in (5, 9, 3)]
    tokens, mask = left_pad(prompts, 9)
    h = hidden_states(TINY, pair.instruct, jnp.asarray(tokens), jnp.asarray(mask), layer=-1)
    logits = jnp.einsum("btd,vd->btv", h, pair.instruct["embed"]["embedding"])  # tied lm_head
    want = dj.forward(TINY, pair.instruct, tokens, mask)
    np.testing.assert_allclose(np.asarray(logits)[mask == 1], np.asarray(want)[mask == 1], atol=1e-5)
    emb = hidden_states(TINY, pair.instruct, jnp.asarray(tokens), jnp.asarray(mask), layer=0)
    np.testing.assert_allclose(emb, np.asarray(pair.instruct["embed"]["embedding"])[tokens], atol=0)
    # pooled features do not depend on padding or batch; mean differs from last
    for pooling in ("last", "mean"):
        batched = prompt_features(TINY, pair.instruct, prompts, layer=1, pooling=pooling)
        alone = np.concatenate([prompt_features(TINY, pair.instruct, [p], layer=1, pooling=pooling) for p in prompts])
        np.testing.assert_allclose(batched, alone, atol=1e-5)
    with pytest.raises(ValueError, match="hidden_layer=3"):
        prompt_features(TINY, pair.instruct, prompts, layer=3)


def test_probe_features_average_the_greedy_answer(pair):
    prompts = _prompts(7)
    stop = [int(dj.generate(TINY, pair.instruct, prompts[:1], 5).tokens[0, 1])]  # ends row 0's probe at 2
    got = prompt_features(TINY, pair.instruct, prompts, layer=1, pooling="probe", probe_tokens=5, batch=4,
                          stop_tokens=stop)
    out = dj.generate(TINY, pair.instruct, prompts, 5, stop_tokens=stop)
    assert out.lengths[0] <= 2
    width = max(len(p) + len(ids) for p, ids in zip(prompts, out.token_lists()))
    for i, (p, ids) in enumerate(zip(prompts, out.token_lists())):
        # one row, no padding: h over prompt + probe, mean over the probe's positions. Filler tokens
        # after the row give every row one shape (one compile); causal attention keeps them out of h.
        seq = p + ids
        row = seq + [2] * (width - len(seq))
        h = hidden_states(TINY, pair.instruct, jnp.asarray([row]), jnp.ones((1, width), jnp.int32), layer=1)
        np.testing.assert_allclose(got[i], np.asarray(h)[0, len(p):len(seq)].mean(0), atol=1e-5)
    plain = prompt_features(TINY, pair.instruct, prompts, layer=1, pooling="mean")
    assert np.abs(got - plain).max() > 1e-3  # the probe changes what is pooled


def test_probe_settings_are_checked(pair):
    prompts = _prompts(2)
    for pooling, n in (("probe", 0), ("mean", 3), ("probe", -1)):
        with pytest.raises(ValueError, match="probe_tokens"):
            prompt_features(TINY, pair.instruct, prompts, pooling=pooling, probe_tokens=n)
    with pytest.raises(ValueError, match="prompt \\+ probe of 67 tokens exceeds the context of 64"):
        prompt_features(TINY, pair.instruct, [[2] * 60], pooling="probe", probe_tokens=7)
    with pytest.raises(ConfigError, match="probe_tokens"):
        load_pref_config(None, ["pooling=probe"])
    with pytest.raises(ConfigError, match="probe_tokens"):
        load_pref_config(None, ["probe_tokens=4"])
    assert load_pref_config(None, ["pooling=probe", "probe_tokens=4"]).probe_tokens == 4


def test_policy_uses_the_recorded_probe(pair, tmp_path):
    from dami_jax.policies.base import pair_fingerprint

    prompts = _prompts(6, seed=10)
    feats = prompt_features(TINY, pair.instruct, prompts, layer=-1, pooling="probe", probe_tokens=3,
                            stop_tokens=pair.stop_tokens)
    model = RewardModel(feats.shape[1], 2, (8,), rngs=nnx.Rngs(0))
    model.set_stats(feats)
    meta = {"fingerprint": pair_fingerprint(pair), "hidden_layer": -1, "pooling": "probe", "probe_tokens": 3,
            "inference_points": 11}
    save_reward_model(model, tmp_path / "rm", meta)
    policy = PrefPolicy.from_dir(tmp_path / "rm", pair)
    np.testing.assert_allclose(policy.features(prompts, pair), feats, atol=1e-6)
    want, _ = policy.lam_from_features(feats)
    np.testing.assert_array_equal(policy(prompts, pair).lam, want)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_features_sharded_on_data_match_one_device(pair):
    prompts = [np.random.default_rng(i).integers(2, 32, 4 + i % 5).tolist() for i in range(13)]
    for kw in ({"pooling": "mean"}, {"pooling": "probe", "probe_tokens": 4}):
        one = prompt_features(TINY, pair.instruct, prompts, **kw)
        eight = prompt_features(TINY, pair.instruct, prompts, mesh=make_mesh(data=8), **kw)
        np.testing.assert_allclose(one, eight, atol=1e-5)
