"""HF safetensors import/export, Orbax conversion, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dami_jax as dj
from helpers import left_pad, random_prompts
from dami_jax.checkpoint import store

LENGTHS = [9, 4, 13, 1]


def _leaves(params):
    return jax.tree_util.tree_flatten_with_path(params)


def assert_same_params(a, b):
    """Same tree, shapes, dtypes and bitwise-equal values."""
    (la, ta), (lb, tb) = _leaves(a), _leaves(b)
    assert ta == tb
    for (path, x), (_, y) in zip(la, lb):
        assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _hf_load(path, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, attn_implementation="eager")
    return model.eval()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


@pytest.mark.parametrize("name", ["dense_tied", "dense_gqa", "moe_sparse"])
def test_save_hf_round_trip(tiny_hf, tmp_path, name):
    import torch

    ckpt = tiny_hf(name)
    cfg, params = ckpt.cfg, ckpt.params()
    out = dj.save_hf(cfg, params, tmp_path / "export", progress=False)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]  # no temp dir left behind
    assert dj.ModelConfig.from_hf(out) == cfg

    # transformers loads it, with exactly the original weights ...
    model = _hf_load(out)
    orig, back = _state(ckpt.hf), _state(model)
    assert set(orig) == set(back)
    for k in orig:
        assert torch.equal(orig[k], back[k]), k
    # ... and its logits equal ours.
    prompts = random_prompts(cfg.vocab_size, LENGTHS, seed=4)
    tokens, mask = left_pad(prompts)
    ours = np.asarray(dj.forward(cfg, params, tokens, mask))
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = model(torch.tensor([p])).logits[0].numpy()
        assert np.max(np.abs(ours[i, -len(p):] - ref)) <= 1e-4
    # Our own import of the export is bit-identical.
    assert_same_params(dj.load_hf(out, progress=False), params)


def test_save_hf_overwrites_existing_dir(tiny_hf, tmp_path):
    ckpt = tiny_hf("dense_tied")
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    dj.save_hf(ckpt.cfg, ckpt.params(), out, progress=False)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


def test_sharded_export_and_import(tiny_hf, tmp_path):
    import torch

    ckpt = tiny_hf("moe_norm")
    cfg, params = ckpt.cfg, ckpt.params()
    limit = 40_000
    out = dj.save_hf(cfg, params, tmp_path / "sharded", max_shard_bytes=limit, progress=False)
    files = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert len(files) > 2
    assert files == [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    # The index lists every tensor exactly where it is, and the total size of the data.
    seen, total = {}, 0
    for fname in files:
        header = _header(os.path.join(out, fname))
        data = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())
        # Shards are cut between leaves: one over the limit holds a single leaf (for MoE, one
        # stacked expert leaf = that projection of every expert of one layer).
        leaves = {re.sub(r"\.experts\.\d+\.", ".experts.*.", k) for k in header}
        assert data <= limit or len(leaves) == 1, (fname, data, sorted(leaves))
        total += data
        seen.update({k: fname for k in header})
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == total
    assert set(seen) == set(_header(os.path.join(ckpt.path, "model.safetensors")))  # transformers' names

    assert_same_params(dj.load_hf(out, progress=False), params)
    model = _hf_load(out)
    orig, back = _state(ckpt.hf), _state(model)
    for k in orig:
        assert torch.equal(orig[k], back[k]), k


def test_bfloat16_export_import(tiny_hf, tmp_path):
    import torch

    ckpt = tiny_hf("dense_gqa")
    cfg = ckpt.cfg
    p16 = ckpt.params("bfloat16")
    out = dj.save_hf(cfg, p16, tmp_path / "bf16", progress=False)
    header = _header(os.path.join(out, "model.safetensors"))
    assert {v["dtype"] for v in header.values()} == {"BF16"}
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    assert_same_params(dj.load_hf(out, dtype="bfloat16", progress=False), p16)
    # Exporting float32 params as bfloat16 rounds exactly like loading as bfloat16 does.
    out2 = dj.save_hf(cfg, ckpt.params(), tmp_path / "bf16b", dtype="bfloat16", progress=False)
    assert_same_params(dj.load_hf(out2, dtype="bfloat16", progress=False), p16)
    # bf16 -> float32 is exact.
    p32 = dj.load_hf(out, dtype="float32", progress=False)
    assert_same_params(p32, jax.tree.map(lambda x: x.astype(jnp.float32), p16))
    # transformers reads our bf16 file as the same bits it would get by casting itself.
    model = _hf_load(out, dtype=torch.bfloat16)
    orig = {k: v.to(torch.bfloat16) for k, v in _state(ckpt.hf).items()}
    back = _state(model)
    for k in orig:
        assert back[k].dtype == torch.bfloat16 and torch.equal(orig[k], back[k]), k


def test_orbax_convert_round_trip(tiny_hf, tmp_path):
    for name in ("dense_tied", "moe_sparse"):
        ckpt = tiny_hf(name)
        params = ckpt.params()
        conv = store.save_params(ckpt.cfg, params, tmp_path / name, source=ckpt.path)
        assert store.is_converted(conv)
        assert dj.ModelConfig.from_hf(conv) == ckpt.cfg
        assert_same_params(dj.load_hf(conv, progress=False), params)
        assert_same_params(dj.load_hf(conv, dtype="bfloat16", progress=False), ckpt.params("bfloat16"))


def test_convert_keeps_the_generation_ids(tiny_hf, tmp_path):
    ckpt = tiny_hf("dense_tied")
    ids = dj.GenerationIds(eos=(3, 4), pad=0)
    src = dj.save_hf(ckpt.cfg, ckpt.params(), tmp_path / "src", generation_ids=ids, progress=False)
    conv = store.save_params(ckpt.cfg, ckpt.params(), tmp_path / "conv", source=src)
    assert dj.GenerationIds.from_hf(conv) == ids


def test_converted_by_an_older_layout_is_refused(tiny_hf, tmp_path):
    ckpt = tiny_hf("dense_tied")
    conv = store.save_params(ckpt.cfg, ckpt.params(), tmp_path / "old", source=ckpt.path)
    marker = os.path.join(conv, store.MARKER)
    with open(marker) as f:
        meta = json.load(f)
    with open(marker, "w") as f:
        json.dump({**meta, "format": 1}, f)
    with pytest.raises(dj.CheckpointError, match="params format 1.*convert it again"):
        dj.load_hf(conv, progress=False)


# ---------------------------------------------------------------------------
# What save_hf, convert and merge share: the shard plan and the tokenizer files.

def test_plan_shards():
    from dami_jax.checkpoint.hf import plan_shards

    assert plan_shards([4, 6], 10) == [("model.safetensors", range(0, 2))]
    assert plan_shards([], 10) == [("model.safetensors", range(0, 0))]
    names = [f"model-{k:05d}-of-00003.safetensors" for k in (1, 2, 3)]
    # a tensor that would overflow the shard opens the next; one over the limit sits alone
    assert plan_shards([5, 5, 11, 1, 3], 10) == list(zip(names, [range(0, 2), range(2, 3), range(3, 5)]))


def test_merge_and_save_hf_shard_alike(tiny_hf, tmp_path):
    from dami_jax.checkpoint.merge import merge_checkpoints

    a, b = tiny_hf("dense_gqa"), tiny_hf("dense_gqa", 1)
    saved = dj.save_hf(a.cfg, a.params(), tmp_path / "saved", max_shard_bytes=30_000, progress=False)
    merged = merge_checkpoints(a.path, b.path, 0.0, tmp_path / "merged", max_shard_bytes=30_000, progress=False)

    def index(d):
        with open(os.path.join(d, "model.safetensors.index.json")) as f:
            return json.load(f)

    assert len(set(index(saved)["weight_map"].values())) > 2
    assert index(merged) == index(saved)
    assert_same_params(dj.load_hf(merged, progress=False), a.params())  # λ = 0 is the Instruct model


def test_convert_and_merge_copy_the_same_tokenizer_files(tiny_hf, tmp_path):
    from dami_jax.checkpoint.merge import merge_checkpoints
    from dami_jax.checkpoint.tokenizer_files import TOKENIZER_FILES

    a, b = tiny_hf("dense_gqa"), tiny_hf("dense_gqa", 1)
    src = tmp_path / "src"
    shutil.copytree(b.path, src)
    for name in TOKENIZER_FILES:
        (src / name).write_text(json.dumps({"file": name}))
    (src / "notes.txt").write_text("not a tokenizer file")
    conv = store.save_params(b.cfg, b.params(), tmp_path / "conv", source=str(src))
    merged = merge_checkpoints(a.path, src, 0.5, tmp_path / "merged", progress=False)
    for out in (conv, merged):
        for name in TOKENIZER_FILES:
            with open(os.path.join(out, name)) as f:
                assert json.load(f) == {"file": name}, (out, name)
        assert not os.path.exists(os.path.join(out, "notes.txt"))


# ---------------------------------------------------------------------------
# Bad input: each refused with a message naming the file/field and what was expected.

def _copy(ckpt, tmp_path, name="bad"):
    dst = tmp_path / name
    shutil.copytree(ckpt.path, dst)
    return dst


def _rewrite(path, fn):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    save_file(fn(dict(tensors)), str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("config, name", [
    ("dense_gqa", "model.layers.1.mlp.down_proj.weight"),
    ("moe_norm", "model.layers.2.mlp.experts.5.up_proj.weight"),  # one expert of a stacked leaf
])
def test_missing_tensor(tiny_hf, tmp_path, config, name):
    bad = _copy(tiny_hf(config), tmp_path)
    _rewrite(bad / "model.safetensors", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(dj.CheckpointError, match=f"missing tensor '{name}'"):
        dj.load_hf(bad, progress=False)


def test_wrong_shape(tiny_hf, tmp_path):
    bad = _copy(tiny_hf("dense_gqa"), tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"  # (K*H, D) = (32, 48)

    def shrink(t):
        t[name] = t[name][:16]
        return t

    _rewrite(bad / "model.safetensors", shrink)
    with pytest.raises(dj.CheckpointError,
                       match=rf"model\.safetensors: tensor '{name}' has shape \(16, 48\), expected \(32, 48\)"):
        dj.load_hf(bad, progress=False)


def test_unexpected_tensor(tiny_hf, tmp_path):
    bad = _copy(tiny_hf("dense_gqa"), tmp_path)
    _rewrite(bad / "model.safetensors", lambda t: {**t, "model.layers.9.mlp.up_proj.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(dj.CheckpointError, match=r"unexpected tensor.*model\.layers\.9\.mlp\.up_proj\.weight"):
        dj.load_hf(bad, progress=False)


def test_integer_tensor(tiny_hf, tmp_path):
    bad = _copy(tiny_hf("dense_gqa"), tmp_path)
    name = "model.norm.weight"
    _rewrite(bad / "model.safetensors", lambda t: {**t, name: np.ones(t[name].shape, np.int32)})
    with pytest.raises(dj.CheckpointError, match=f"tensor '{name}' has dtype int32, expected a float"):
        dj.load_hf(bad, progress=False)


@pytest.mark.parametrize("keep", [5, 100, -1000])
def test_truncated_file(tiny_hf, tmp_path, keep):
    bad = _copy(tiny_hf("dense_gqa"), tmp_path)
    path = bad / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])  # no header / cut inside the header / cut inside the data
    with pytest.raises(dj.CheckpointError, match=r"model\.safetensors: truncated safetensors file"):
        dj.load_hf(bad, progress=False)


def test_missing_shard(tiny_hf, tmp_path):
    ckpt = tiny_hf("dense_gqa")
    out = dj.save_hf(ckpt.cfg, ckpt.params(), tmp_path / "sharded", max_shard_bytes=30_000, progress=False)
    victim = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))[-1]
    os.remove(os.path.join(out, victim))
    with pytest.raises(dj.CheckpointError, match=f"{victim}: listed in the index but missing"):
        dj.load_hf(out, progress=False)


def test_pickle_checkpoint_refused(tiny_hf, tmp_path):
    ckpt = tiny_hf("dense_gqa")
    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copyfile(os.path.join(ckpt.path, "config.json"), bad / "config.json")
    # Not even a valid pickle: the loader must refuse by name, never try to unpickle it.
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04 definitely not opened")
    with pytest.raises(dj.CheckpointError, match=r"only pickle checkpoints found \(pytorch_model\.bin\).*never unpickles"):
        dj.load_hf(bad, progress=False)


def test_no_weights_at_all(tiny_hf, tmp_path):
    bad = tmp_path / "empty"
    bad.mkdir()
    shutil.copyfile(os.path.join(tiny_hf("dense_gqa").path, "config.json"), bad / "config.json")
    with pytest.raises(dj.CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        dj.load_hf(bad, progress=False)
    with pytest.raises(dj.CheckpointError, match="not a model directory"):
        dj.load_hf(tmp_path / "does-not-exist", progress=False)


def test_unknown_architecture(tiny_hf, tmp_path):
    bad = _copy(tiny_hf("dense_gqa"), tmp_path)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(dj.ConfigError, match=r"config\.json: model_type='mistral' is not supported"):
        dj.load_hf(bad, progress=False)


def test_prompt_longer_than_context(tiny_hf):
    ckpt = tiny_hf("dense_tied")
    cfg = ckpt.cfg
    n = cfg.max_position_embeddings
    with pytest.raises(ValueError, match=f"prompt of {n} tokens does not fit the context of {n} tokens"):
        dj.generate(cfg, ckpt.params(), [[1, 2], [3] * n], 4)
    with pytest.raises(ValueError, match="prompt of 16 tokens does not fit the context of 16 tokens"):
        dj.generate(cfg, ckpt.params(), [[3] * 16], 4, max_cache=16)
    with pytest.raises(ValueError, match="at least one token"):
        dj.generate(cfg, ckpt.params(), [[1], []], 4)


@pytest.mark.parametrize("bad_id", [128, 10_000, -1])
def test_token_id_outside_vocab(tiny_hf, bad_id):
    ckpt = tiny_hf("dense_tied")
    assert ckpt.cfg.vocab_size == 128
    with pytest.raises(ValueError, match=rf"token id {bad_id} outside the vocabulary \[0, 128\)"):
        dj.generate(ckpt.cfg, ckpt.params(), [[1, 2, 3], [4, bad_id]], 4)


@pytest.mark.parametrize("bad_id", [128, -1])
def test_forward_refuses_token_id_outside_vocab(tiny_hf, bad_id):
    ckpt = tiny_hf("dense_tied")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        dj.forward(ckpt.cfg, ckpt.params(), np.array([[1, 2, bad_id]], np.int32))
