"""The model core's execution switches give the same model: the readable and the XLA:CPU
layouts, scanned and unrolled layers (logits, hidden states, greedy decoding with a cache,
delta mode); hidden states against HF output_hidden_states; and clear refusals."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dami_jax as dj
from helpers import build_hf_model, left_pad, random_prompts
from dami_jax.config import ConfigError
from dami_jax.generate.decode import generate_lockstep
from dami_jax.models import qwen3
from dami_jax.models.kv_cache import KVCache, resolve_layout

LENGTHS = [9, 4, 13, 1]
ATOL = 2e-5  # float32 rounding of differently ordered sums
NEW = 12


def _with(cfg, **changes):
    return dataclasses.replace(cfg, **changes)


@pytest.fixture(scope="module")
def all_moe(tmp_path_factory):
    """moe_norm with every layer MoE (mlp_only_layers=[]): the MoE config that can scan."""
    path = tmp_path_factory.mktemp("moe_all")
    model = build_hf_model("moe_norm", seed=3, mlp_only_layers=[])
    model.save_pretrained(path)
    cfg = dj.ModelConfig.from_hf(path)
    assert all(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    return model, cfg, dj.load_hf(path, progress=False)


def _batch(cfg, seed=5):
    tokens, mask = left_pad(random_prompts(cfg.vocab_size, LENGTHS, seed=seed))
    return jnp.asarray(tokens), jnp.asarray(mask)


def _other(params, seed=1):
    """params + 0.05·N(0, 1) noise: a second endpoint."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _delta(params):
    """Delta params of (params, _other(params)) and a λ per row."""
    return dj.delta_params(params, _other(params)), jnp.asarray([0.0, 0.3, 1.0, 0.7], jnp.float32)


def test_auto_layout_resolves_by_backend():
    assert resolve_layout("auto") == ("cpu" if jax.default_backend() == "cpu" else "readable")
    assert resolve_layout("readable") == "readable"
    with pytest.raises(ConfigError, match="layout='tpu'"):
        dj.ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                       num_kv_heads=1, head_dim=8, layout="tpu")


def test_execution_fields_are_not_architecture(tiny_hf):
    cfg = tiny_hf("dense_tied").cfg
    fast = _with(cfg, layout="readable", scan_layers=True)
    assert fast.architecture_fields() == cfg.architecture_fields()
    assert "layout" not in cfg.to_hf_dict() and "scan_layers" not in cfg.to_hf_dict()


# Both layouts already match HF on every TINY config (test_model_parity.py runs under each);
# here a GQA dense and a mixed dense/MoE config add delta mode and cached greedy decoding.
@pytest.mark.parametrize("name", ["dense_gqa", "moe_sparse"])
def test_layouts_agree(tiny_hf, name):
    """Logits within float32 rounding and identical greedy tokens (prefill + cached decode),
    plain and in delta mode."""
    ckpt = tiny_hf(name)
    cpu, readable = _with(ckpt.cfg, layout="cpu"), _with(ckpt.cfg, layout="readable")
    tokens, mask = _batch(ckpt.cfg)
    real = np.asarray(mask, bool)
    params = ckpt.params()
    a, b = (np.asarray(dj.forward(c, params, tokens, mask)) for c in (cpu, readable))
    np.testing.assert_allclose(a[real], b[real], rtol=0, atol=ATOL)
    delta, lam = _delta(params)
    a, b = (np.asarray(dj.forward(c, delta, tokens, mask, lam=lam)) for c in (cpu, readable))
    np.testing.assert_allclose(a[real], b[real], rtol=0, atol=ATOL)
    prompts = random_prompts(ckpt.cfg.vocab_size, LENGTHS, seed=6)
    for p, row_lam in ((params, None), (delta, lam)):
        x, y = (generate_lockstep(c, p, prompts, NEW, lam=row_lam) for c in (cpu, readable))  # the dense cache's layouts
        np.testing.assert_array_equal(x.tokens, y.tokens)


def test_cache_layouts():
    cfg = dj.ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=16)
    cpu = KVCache.init(_with(cfg, layout="cpu"), 5, 7, jnp.float32)
    assert cpu.k[0].shape == (10, 7, 16) and cpu.v[0].shape == (10, 16, 7) and len(cpu.k) == 3
    readable = KVCache.init(_with(cfg, layout="readable"), 5, 7, jnp.float32)
    assert readable.k[0].shape == readable.v[0].shape == (5, 7, 2, 16)
    scanned = KVCache.init(_with(cfg, layout="readable", scan_layers=True), 5, 7, jnp.float32)
    assert scanned.k.shape == scanned.v.shape == (3, 5, 7, 2, 16)


def _scan_cases(tiny_hf, all_moe):
    """(cfg, params, HF model) of a dense and an all-MoE checkpoint."""
    dense = tiny_hf("dense_gqa")
    model, cfg, params = all_moe
    return [(dense.cfg, dense.params(), dense.hf), (cfg, params, model)]


@pytest.mark.parametrize("layout", ["cpu", "readable"])
def test_scanned_equals_unrolled(tiny_hf, all_moe, layout):
    for cfg, params, _ in _scan_cases(tiny_hf, all_moe):
        cfg = _with(cfg, layout=layout)
        scan, stacked = _with(cfg, scan_layers=True), qwen3.stack_layers(params)
        tokens, mask = _batch(cfg)
        real = np.asarray(mask, bool)
        a, b = np.asarray(dj.forward(cfg, params, tokens, mask)), np.asarray(dj.forward(scan, stacked, tokens, mask))
        np.testing.assert_allclose(a[real], b[real], rtol=0, atol=ATOL)
        for layer in (1, -1):
            h = qwen3.hidden_states(cfg, params, tokens, mask, layer)
            np.testing.assert_allclose(np.asarray(qwen3.hidden_states(scan, stacked, tokens, mask, layer))[real],
                                       np.asarray(h)[real], rtol=0, atol=ATOL)
        prompts = random_prompts(cfg.vocab_size, LENGTHS, seed=8)
        # The engine with scanned layers against the lock-step reference with unrolled ones: one
        # engine compile per mode (an unrolled engine's programs took ~2 min of this test to compile).
        x, y = generate_lockstep(cfg, params, prompts, NEW), dj.generate(scan, stacked, prompts, NEW)
        np.testing.assert_array_equal(x.tokens, y.tokens)
        # Delta mode: delta_params of stacked params is the stacked delta; (2, L, ...) leaves.
        delta, lam = _delta(params)
        sdelta = dj.delta_params(stacked, qwen3.stack_layers(_other(params)))
        assert sdelta["layers"]["input_norm"]["scale"].shape[:2] == (2, cfg.num_layers)
        for u, v in zip(jax.tree.leaves(qwen3.stack_layers(delta)), jax.tree.leaves(sdelta)):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
        a = np.asarray(dj.forward(cfg, delta, tokens, mask, lam=lam))
        np.testing.assert_allclose(np.asarray(dj.forward(scan, sdelta, tokens, mask, lam=lam))[real], a[real],
                                   rtol=0, atol=ATOL)
        x, y = generate_lockstep(cfg, delta, prompts, NEW, lam=lam), dj.generate(scan, sdelta, prompts, NEW, lam=lam)
        np.testing.assert_array_equal(x.tokens, y.tokens)


def test_scanned_matches_hf(tiny_hf, all_moe):
    import torch

    for cfg, params, hf in _scan_cases(tiny_hf, all_moe):
        prompt = random_prompts(cfg.vocab_size, [11], seed=9)[0]
        with torch.no_grad():
            ref = hf(torch.tensor([prompt]), use_cache=False).logits[0].numpy()
        ours = dj.forward(_with(cfg, scan_layers=True), qwen3.stack_layers(params), np.asarray([prompt]))
        np.testing.assert_allclose(np.asarray(ours)[0], ref, rtol=0, atol=1e-4)


def test_stacking_round_trip_and_interpolate(tiny_hf):
    ckpt = tiny_hf("dense_tied")
    params = ckpt.params()
    stacked = qwen3.stack_layers(params)
    assert qwen3.is_stacked(stacked) and not qwen3.is_stacked(params)
    assert stacked["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 4, 16, 64)
    back = qwen3.unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    other = _other(params)
    mixed = dj.interpolate(stacked, qwen3.stack_layers(other), 0.25)
    want = qwen3.stack_layers(dj.interpolate(params, other, 0.25))
    for u, v in zip(jax.tree.leaves(mixed), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    scan = _with(ckpt.cfg, scan_layers=True)
    abstract = qwen3.abstract_params(scan)
    assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(lambda x: x.shape, stacked)
    init = qwen3.init_params(scan, 4)
    for u, v in zip(jax.tree.leaves(init), jax.tree.leaves(qwen3.stack_layers(qwen3.init_params(ckpt.cfg, 4)))):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_scan_refusals(tiny_hf):
    ckpt = tiny_hf("moe_norm")  # layer 1 dense (mlp_only_layers), layers 0 and 2 MoE
    scan = _with(ckpt.cfg, scan_layers=True)
    with pytest.raises(ValueError, match=r"dense layers \[1\] and MoE layers \[0, 2\]"):
        qwen3.abstract_params(scan)
    with pytest.raises(ValueError, match="mix dense and MoE"):
        qwen3.stack_layers(ckpt.params())
    dense = tiny_hf("dense_tied")
    tokens = np.zeros((1, 3), np.int32)
    with pytest.raises(ValueError, match="needs stacked params"):
        dj.forward(_with(dense.cfg, scan_layers=True), dense.params(), tokens)
    with pytest.raises(ValueError, match="use a config with scan_layers=True"):
        dj.forward(dense.cfg, qwen3.stack_layers(dense.params()), tokens)


@pytest.mark.parametrize("layout", ["cpu", "readable"])
@pytest.mark.parametrize("name", ["dense_gqa", "moe_norm"])
def test_hidden_states_match_hf(tiny_hf, name, layout):
    """Every layer's hidden states equal HF output_hidden_states (0: embeddings, last: after
    the final norm), on a left-padded batch against each prompt run alone."""
    import torch

    ckpt = tiny_hf(name)
    cfg = _with(ckpt.cfg, layout=layout)
    prompts = random_prompts(cfg.vocab_size, LENGTHS, seed=12)
    tokens, mask = left_pad(prompts)
    real = mask.astype(bool)
    hidden = jax.jit(qwen3.hidden_states, static_argnums=(0, 4))
    ours = [np.asarray(hidden(cfg, ckpt.params(), tokens, mask, i)) for i in range(cfg.num_layers + 1)]
    np.testing.assert_array_equal(ours[-1], np.asarray(hidden(cfg, ckpt.params(), tokens, mask, -1)))
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = ckpt.hf(torch.tensor([prompt]), use_cache=False, output_hidden_states=True).hidden_states
        assert len(ref) == cfg.num_layers + 1
        for i, h in enumerate(ref):
            diff = float(np.max(np.abs(ours[i][row][real[row]] - h[0].numpy())))
            assert diff <= 1e-4, f"{name} {layout} layer {i} row {row}: {diff:.3g}"


def test_hidden_layer_out_of_range(tiny_hf):
    ckpt = tiny_hf("dense_tied")
    with pytest.raises(ValueError, match=r"hidden_layer=3 is outside \[-3, 2\]"):
        qwen3.hidden_states(ckpt.cfg, ckpt.params(), np.zeros((1, 2), np.int32), np.ones((1, 2), np.int32), 3)


def test_named_scopes_in_the_program(tiny_hf):
    """Profiles read by block: layer_i/attn and layer_i/mlp (or moe) name the ops."""
    ckpt = tiny_hf("moe_norm")
    tokens, mask = _batch(ckpt.cfg)
    text = jax.jit(lambda p, t, m: qwen3.apply(ckpt.cfg, p, t, m)[0]).lower(ckpt.params(), tokens, mask).as_text(
        debug_info=True)
    for scope in ("layer_0/attn", "layer_0/moe", "layer_1/mlp", "layer_2/moe"):
        assert scope in text, scope


def test_schedules_on_stacked_params(tiny_hf):
    """A kind-only schedule gives the stacked result; layer ranges are refused with a clear error."""
    from dami_jax.schedule import Schedule

    params = tiny_hf("dense_tied").params()
    other = _other(params)
    stacked, stacked_other = qwen3.stack_layers(params), qwen3.stack_layers(other)
    kinds = Schedule.from_dict({"default": 0.0, "rules": [{"kinds": ["mlp"], "scale": 1.0}]}, num_layers=2)
    got = dj.interpolate(stacked, stacked_other, 0.5, schedule=kinds)
    want = qwen3.stack_layers(dj.interpolate(params, other, 0.5, schedule=kinds))
    for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    ranged = Schedule.from_dict({"rules": [{"layers": [1, None], "scale": 0.5}]}, num_layers=2)
    with pytest.raises(ValueError, match="layer ranges needs per-layer params, not stacked"):
        dj.interpolate(stacked, stacked_other, 0.5, schedule=ranged)
