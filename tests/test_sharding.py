"""Sharded loading, forward and generate on an 8-device CPU mesh (data=2, fsdp=2, tensor=2)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import dami_jax as dj
from helpers import left_pad, random_prompts
from dami_jax.checkpoint import store
from dami_jax.models import qwen3
from dami_jax.models.sharding import batch_sharding
from dami_jax.tree import path_keys

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (conftest sets XLA_FLAGS)")

# Expected spec of each param role on this project's default rules, written out by hand.
EXPECTED = {
    ("embed", "embedding"): P("tensor", "fsdp"),
    ("lm_head", "kernel"): P("tensor", "fsdp"),
    ("final_norm", "scale"): P(None),
    ("input_norm", "scale"): P(None),
    ("post_attn_norm", "scale"): P(None),
    ("q_norm", "scale"): P(None),
    ("k_norm", "scale"): P(None),
    ("q_proj", "kernel"): P("tensor", None, "fsdp"),
    ("k_proj", "kernel"): P("tensor", None, "fsdp"),
    ("v_proj", "kernel"): P("tensor", None, "fsdp"),
    ("o_proj", "kernel"): P("fsdp", "tensor"),
    ("router", "kernel"): P(None, "fsdp"),
    ("gate_proj", "kernel"): P("tensor", "fsdp"),  # dense MLP (F, D)
    ("up_proj", "kernel"): P("tensor", "fsdp"),
    ("down_proj", "kernel"): P("fsdp", "tensor"),
    ("mlp", "gate_proj"): P(None, "fsdp", "tensor"),  # stacked experts (E, D, F)
    ("mlp", "up_proj"): P(None, "fsdp", "tensor"),
    ("mlp", "down_proj"): P(None, "tensor", "fsdp"),
}


@pytest.fixture(scope="module")
def mesh():
    return dj.make_mesh(data=2, fsdp=2, tensor=2)


def _shard_shape(shape, spec, mesh):
    out = []
    for i, dim in enumerate(shape):
        axis = spec[i] if i < len(spec) else None
        out.append(dim // (mesh.shape[axis] if axis else 1))
    return tuple(out)


def _check_placement(params, reference, mesh, expected):
    """Every leaf: a NamedSharding on `mesh` with the expected spec, the right shard shape, same values."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    ref = jax.tree_util.tree_flatten_with_path(reference)[0]
    assert len(flat) == len(ref)
    for (path, leaf), (rpath, rleaf) in zip(flat, ref):
        assert path == rpath
        name = "/".join(path_keys(path))
        spec = expected(path_keys(path), leaf.shape)
        assert isinstance(leaf.sharding, NamedSharding), name
        assert leaf.sharding.mesh == mesh, name
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), (name, leaf.sharding.spec, spec)
        assert len(leaf.addressable_shards) == 8
        assert leaf.addressable_shards[0].data.shape == _shard_shape(leaf.shape, spec, mesh), name
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(rleaf), err_msg=name)


def _default_expected(key, shape):
    return EXPECTED[key[-2:]]


@pytest.mark.parametrize("name", ["dense_tied", "moe_norm"])
def test_load_hf_on_mesh(tiny_hf, mesh, name):
    ckpt = tiny_hf(name)
    sharded = dj.load_hf(ckpt.path, mesh=mesh, progress=False)
    _check_placement(sharded, ckpt.params(), mesh, _default_expected)
    # Spot checks of real splitting on the tiny dims.
    q = sharded["layers"][0]["attn"]["q_proj"]["kernel"]  # (4, 16, 64) over tensor=2, fsdp=2
    assert q.addressable_shards[0].data.shape == (2, 16, 32)
    if name == "moe_norm":
        experts = sharded["layers"][0]["mlp"]["gate_proj"]  # (8, 64, 32)
        assert experts.addressable_shards[0].data.shape == (8, 32, 16)


def test_axes_that_do_not_divide_are_replicated(tiny_hf):
    """tensor=4: the 2 KV heads cannot split 4 ways, so that axis is dropped (replicated) for them."""
    ckpt = tiny_hf("dense_tied")  # 4 query heads, 2 KV heads
    mesh = dj.make_mesh(data=1, fsdp=2, tensor=4)

    def expected(key, shape):
        if key[-2] in ("k_proj", "v_proj"):
            return P(None, None, "fsdp")
        return EXPECTED[key[-2:]]

    _check_placement(dj.load_hf(ckpt.path, mesh=mesh, progress=False), ckpt.params(), mesh, expected)


@pytest.fixture(scope="module")
def sharded(tiny_hf, mesh):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = dj.load_hf(tiny_hf(name).path, mesh=mesh, progress=False)
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["dense_tied", "moe_norm"])
def test_sharded_forward_matches_single_device(tiny_hf, mesh, sharded, name):
    ckpt = tiny_hf(name)
    cfg = ckpt.cfg
    prompts = random_prompts(cfg.vocab_size, [9, 4, 13, 1], seed=21)
    tokens, mask = left_pad(prompts)
    single = np.asarray(dj.forward(cfg, ckpt.params(), tokens, mask))
    put = batch_sharding(mesh, 2)  # batch split over data x fsdp
    logits = dj.forward(cfg, sharded(name), jax.device_put(tokens, put), jax.device_put(mask, put))
    real = mask.astype(bool)
    # Sharded matmuls sum partial products in another order: float32 rounding only.
    np.testing.assert_allclose(np.asarray(logits)[real], single[real], rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", ["dense_tied", pytest.param("moe_norm", marks=pytest.mark.slow)])
def test_sharded_generate_matches_single_device(tiny_hf, sharded, name):
    ckpt = tiny_hf(name)
    prompts = random_prompts(ckpt.cfg.vocab_size, [9, 4, 13, 1], seed=21)
    ref = dj.generate(ckpt.cfg, ckpt.params(), prompts, 16)
    out = dj.generate(ckpt.cfg, sharded(name), prompts, 16)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    assert out.lengths.tolist() == ref.lengths.tolist() and out.finish_reasons == ref.finish_reasons


def test_orbax_restore_onto_mesh_keeps_shardings(tiny_hf, mesh, sharded, tmp_path):
    ckpt = tiny_hf("moe_norm")
    conv = store.save_params(ckpt.cfg, sharded("moe_norm"), tmp_path / "conv", source=ckpt.path)  # saved from the mesh
    restored = dj.load_hf(conv, mesh=mesh, progress=False)
    _check_placement(restored, ckpt.params(), mesh, _default_expected)
    # Without a mesh the same directory restores onto one device.
    plain = dj.load_hf(conv, progress=False)
    for leaf in jax.tree.leaves(plain):
        assert len(leaf.sharding.device_set) == 1
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(ckpt.params())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("layout", ["cpu", "readable"])
def test_constrained_forward_matches_unconstrained(tiny_hf, mesh, sharded, layout):
    """Under an active mesh the model pins its activations (batch on data, heads on tensor):
    the program gains sharding constraints and computes the same logits."""
    ckpt = tiny_hf("moe_norm")
    cfg = dataclasses.replace(ckpt.cfg, layout=layout)
    tokens, mask = left_pad(random_prompts(cfg.vocab_size, [9, 4, 13, 1], seed=22))
    put = batch_sharding(mesh, 2)
    args = (sharded("moe_norm"), jax.device_put(tokens, put), jax.device_put(mask, put))

    def logits(p, t, m):
        return qwen3.apply(cfg, p, t, m)[0]

    free = jax.jit(logits).lower(*args)
    with jax.set_mesh(mesh):
        pinned = jax.jit(logits).lower(*args)
    assert "sharding_constraint" not in free.as_text()
    # per layer: q, k, v, the layer output; plus the embeddings
    assert pinned.as_text().count("sharding_constraint") >= 4 * cfg.num_layers + 1
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(pinned.compile()(*args))[real], np.asarray(free.compile()(*args))[real],
                               rtol=0, atol=2e-5)
