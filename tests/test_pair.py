"""ModelPair: delta and merged modes agree, sweeps, mismatched pairs, and `merge_checkpoints` exports.

Each pair is two tiny random HF checkpoints of one architecture (seeds 0 and 1:
Instruct and Thinking), dense (untied lm_head, GQA 3:1) and MoE (a dense layer
in the middle). The HF export is checked against transformers itself.
"""

from __future__ import annotations

import json
import os
import shutil
import types

import numpy as np
import pytest

import dami_jax as dj
from helpers import hf_config, leaves, left_pad, random_prompts
from dami_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from dami_jax.interpolate import interpolate
from dami_jax.checkpoint.merge import merge_checkpoints
from dami_jax.pair import PairMismatchError, generate_pair, load_pair, sweep
from dami_jax.schedule import Schedule

# The MoE pair repeats every check; its extra compiles put it in the slow tier.
MODELS = ["dense_gqa", pytest.param("moe_norm", marks=pytest.mark.slow)]
# Six rows, five distinct λ (both endpoints included); rows 0 and 4 share a prompt.
LAMS = np.array([0.0, 0.3, 0.55, 0.8, 1.0, 0.3], np.float32)
NEW = 6


@pytest.fixture(scope="module", params=MODELS)
def tp(request, tiny_hf):
    """The pair, its two HF directories and a batch of prompts."""
    ci, ct = tiny_hf(request.param, 0), tiny_hf(request.param, 1)
    pair = load_pair(ci.path, ct.path, tokenizer="none")
    prompts = random_prompts(pair.cfg.vocab_size, [5, 9, 3, 12, 7, 4], seed=1)
    prompts[4] = prompts[0]
    return types.SimpleNamespace(name=request.param, pair=pair, instruct=ci.path, thinking=ct.path,
                                 prompts=prompts)


def assert_within_one_rounding(got: dict, want: dict) -> None:
    """NumPy (merge) vs XLA (interpolate) float32 arithmetic: XLA may fuse a multiply-add."""
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=3e-7, atol=2e-7, err_msg=str(path))


# ---------------------------------------------------------------------------
# delta vs merged

def test_delta_and_merged_give_same_greedy_tokens(tp):
    delta = generate_pair(tp.pair, tp.prompts, LAMS, NEW, mode="delta")
    merged = generate_pair(tp.pair, tp.prompts, LAMS, NEW, mode="merged")
    np.testing.assert_array_equal(delta.tokens, merged.tokens)
    np.testing.assert_array_equal(delta.lengths, [NEW] * len(LAMS))
    assert delta.finish_reasons == merged.finish_reasons == ["length"] * len(LAMS)
    # λ matters: the same prompt at λ=0 and λ=1 continues differently
    assert delta.token_lists()[0] != delta.token_lists()[4]


def test_delta_logits_match_merged_per_row(tp):
    cfg, pair = tp.pair.cfg, tp.pair
    tokens, mask = left_pad(tp.prompts)
    got = np.asarray(dj.forward(cfg, pair.delta, tokens, mask, lam=LAMS))
    for b, lam in enumerate(LAMS):
        merged = interpolate(pair.instruct, pair.thinking, float(lam))
        want = np.asarray(dj.forward(cfg, merged, tokens[b:b + 1], mask[b:b + 1]))[0]
        real = mask[b].astype(bool)
        np.testing.assert_allclose(got[b][real], want[real], atol=1e-5, rtol=0, err_msg=f"row {b} λ={lam}")


@pytest.mark.slow
def test_delta_and_merged_give_same_sampled_tokens(tp):
    sampling = dj.Sample(temperature=0.9, top_k=20, top_p=0.95)
    delta = generate_pair(tp.pair, tp.prompts, LAMS, NEW, mode="delta", sampling=sampling, seed=7)
    merged = generate_pair(tp.pair, tp.prompts, LAMS, NEW, mode="merged", sampling=sampling, seed=7)
    np.testing.assert_array_equal(delta.tokens, merged.tokens)
    greedy = generate_pair(tp.pair, tp.prompts, LAMS, NEW, mode="delta")
    assert (delta.tokens != greedy.tokens).any()  # really sampled


@pytest.mark.slow
def test_sweep_equals_separate_merged_runs(tp):
    lams = [0.0, 0.5, 1.0]
    prompts = tp.prompts[:3]
    outs = sweep(tp.pair, prompts, lams, NEW)
    assert len(outs) == len(lams)
    for lam, out in zip(lams, outs):
        one = dj.generate(tp.pair.cfg, tp.pair.merged(lam), prompts, NEW, stop_tokens=[])
        np.testing.assert_array_equal(out.tokens, one.tokens, err_msg=f"λ={lam}")
        np.testing.assert_array_equal(out.lengths, one.lengths)


def test_sweep_in_waves_of_rows_equals_one_wave(tp):
    lams = [0.0, 0.3, 0.6, 1.0, 0.45]
    sampling = dj.Sample(0.8, top_k=5)
    whole = sweep(tp.pair, tp.prompts[:3], lams, NEW, sampling=sampling, seed=3)
    chunked = sweep(tp.pair, tp.prompts[:3], lams, NEW, sampling=sampling, seed=3, max_rows=2)
    assert len(chunked) == len(lams)
    for lam, a, b in zip(lams, whole, chunked):
        np.testing.assert_array_equal(a.tokens, b.tokens, err_msg=f"λ={lam}")
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        sweep(tp.pair, tp.prompts[:3], lams, NEW, max_rows=0)


def test_bad_lam_is_refused(tp):
    p = tp.prompts[:2]
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        generate_pair(tp.pair, p, [0.5, 1.2], NEW)
    with pytest.raises(ValueError, match="NaN"):
        generate_pair(tp.pair, p, [0.5, float("nan")], NEW, mode="merged")
    with pytest.raises(ValueError, match="3 values for 2 prompts"):
        generate_pair(tp.pair, p, [0.1, 0.2, 0.3], NEW)
    with pytest.raises(ValueError, match="mode must be"):
        generate_pair(tp.pair, p, 0.5, NEW, mode="mixed")
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        sweep(tp.pair, p, [0.0, 1.5], NEW)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        merge_checkpoints(tp.instruct, tp.thinking, -0.1, "/nonexistent/never-written", progress=False)


# ---------------------------------------------------------------------------
# Mismatched pairs (config.json is enough: the check runs before any weight is read)

@pytest.mark.parametrize("a, b, field", [
    (("dense_gqa", {}), ("dense_gqa", dict(num_hidden_layers=4)), "num_layers"),
    (("dense_gqa", {}), ("dense_gqa", dict(vocab_size=192)), "vocab_size"),
    (("dense_tied", dict(num_hidden_layers=3, tie_word_embeddings=False)), ("moe_norm", {}), "num_experts"),
    (("moe_norm", {}), ("moe_norm", dict(num_experts=4)), "num_experts"),
])
def test_mismatched_pair_is_refused(tmp_path, a, b, field):
    dirs = []
    for k, (name, overrides) in enumerate((a, b)):
        d = tmp_path / f"m{k}"
        hf_config(name, **overrides).save_pretrained(d)
        dirs.append(str(d))
    with pytest.raises(PairMismatchError, match=rf"instruct and thinking differ in {field}:"):
        load_pair(*dirs, tokenizer="none")
    with pytest.raises(PairMismatchError, match=rf"differ in {field}:"):
        merge_checkpoints(*dirs, 0.5, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# merge_checkpoints: HF export of Θ(λ)

def test_merged_export_generates_like_merged_mode(tp, tmp_path):
    """transformers on the merged export == our merged mode, token for token (greedy)."""
    import torch
    from transformers import AutoModelForCausalLM

    lam = 0.8
    out = merge_checkpoints(tp.instruct, tp.thinking, lam, tmp_path / "merged", progress=False)
    assert_within_one_rounding(leaves(dj.load_hf(out, progress=False)),
                               leaves(interpolate(tp.pair.instruct, tp.pair.thinking, lam)))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    prompts = tp.prompts[:3]
    ours = generate_pair(tp.pair, prompts, lam, NEW, mode="merged").token_lists()
    for p, want in zip(prompts, ours):
        with torch.no_grad():
            ids = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=NEW, do_sample=False)
        assert ids[0, len(p):].tolist() == want


def test_merge_with_schedule_equals_interpolate(tp, tmp_path):
    yaml_path = tmp_path / "schedule.yaml"
    yaml_path.write_text("default: 0.0\nrules:\n  - kinds: [mlp, experts, router]\n    layers: [1, null]\n"
                         "  - kinds: [attn]\n    fraction: [0.5, 1.0]\n    scale: 0.5\n")
    sched = Schedule.from_yaml(str(yaml_path), tp.pair.cfg.num_layers)
    want32 = leaves(interpolate(tp.pair.instruct, tp.pair.thinking, 0.7, schedule=sched))
    out = merge_checkpoints(tp.instruct, tp.thinking, 0.7, tmp_path / "m32", schedule=str(yaml_path),
                            progress=False)
    got = leaves(dj.load_hf(out, progress=False))
    assert_within_one_rounding(got, want32)
    base = leaves(tp.pair.instruct)
    for path in got:  # scale 0: Instruct exactly; scaled leaves really moved
        untouched = sched.scale(path) == 0.0
        assert np.array_equal(got[path], base[path]) == untouched, path
    with open(os.path.join(out, "dami_merge.json")) as f:
        record = json.load(f)
    assert record["lam"] == pytest.approx(0.7) and record["schedule"]["default"] == 0.0

    # bfloat16 output: interpolate in float32, one rounding to bfloat16
    out16 = merge_checkpoints(tp.instruct, tp.thinking, 0.7, tmp_path / "m16", schedule=sched,
                              dtype="bfloat16", progress=False)
    with open(os.path.join(out16, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    got16 = leaves(dj.load_hf(out16, dtype="bfloat16", progress=False))
    exact = total = 0
    for path, w in want32.items():
        g = got16[path].astype(np.float64)
        w16 = w.astype(got16[path].dtype).astype(np.float64)
        ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(w16), 1e-30))) - 7)
        assert np.all(np.abs(g - w16) <= ulp), path
        exact += int(np.sum(g == w16))
        total += g.size
    assert exact / total > 0.99


@pytest.mark.parametrize("lam, src", [(0.0, "instruct"), (1.0, "thinking")])
def test_merge_endpoints_are_the_checkpoints_bytes(tp, tmp_path, lam, src):
    out = merge_checkpoints(tp.instruct, tp.thinking, lam, tmp_path / "m", progress=False)
    want = SafetensorsFile(os.path.join(getattr(tp, src), "model.safetensors"))
    got = SafetensorsFile(os.path.join(out, "model.safetensors"))
    assert set(got.keys()) == set(want.keys())  # (a tied checkpoint would drop lm_head.weight)
    for name in got.keys():
        assert got.get(name).tobytes() == want.get(name).tobytes(), name
    got.close()
    want.close()


def test_sharded_export_writes_index_and_loads_in_transformers(tp, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    limit = 30_000
    single = merge_checkpoints(tp.instruct, tp.thinking, 0.4, tmp_path / "single", progress=False)
    out = merge_checkpoints(tp.instruct, tp.thinking, 0.4, tmp_path / "sharded", max_shard_bytes=limit,
                            progress=False)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert len(shards) >= 3 and "model.safetensors" not in shards
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    for name in shards:
        f = SafetensorsFile(os.path.join(out, name))
        sizes = [f.get(k).nbytes for k in f.keys()]
        assert sum(sizes) <= limit or len(sizes) == 1, name  # only a lone oversized tensor may exceed
        assert all(index["weight_map"][k] == name for k in f.keys())
        total += sum(sizes)
        f.close()
    assert index["metadata"]["total_size"] == total
    # same values as the single-file export
    a, b = leaves(dj.load_hf(single, progress=False)), leaves(dj.load_hf(out, progress=False))
    for path in a:
        assert np.array_equal(a[path], b[path]), path
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    prompt = tp.prompts[1]
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0].numpy()
    got = np.asarray(dj.forward(tp.pair.cfg, dj.load_hf(out, progress=False), np.array([prompt])))[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------
# Files around the weights, atomicity, CLI (dense pair only: file handling does not depend on the model)

@pytest.fixture
def dense(tiny_hf):
    return tiny_hf("dense_gqa", 0).path, tiny_hf("dense_gqa", 1).path


def test_merge_copies_config_and_tokenizer_from_thinking(dense, tmp_path):
    inst, think = dense
    src = tmp_path / "thinking"
    shutil.copytree(think, src)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    (src / "chat_template.jinja").write_text("{{ messages }}")
    cfg = json.loads((src / "config.json").read_text())
    cfg["eos_token_id"] = 7
    (src / "config.json").write_text(json.dumps(cfg))
    out = merge_checkpoints(inst, src, 0.5, tmp_path / "m", dtype="bfloat16", progress=False)
    names = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja",
            "dami_merge.json", "model.safetensors"} <= names
    written = json.loads(open(os.path.join(out, "config.json")).read())
    assert written["eos_token_id"] == 7 and written["dtype"] == "bfloat16"
    assert dj.GenerationIds.from_hf(out).eos == (7,)
    out_i = merge_checkpoints(inst, src, 0.5, tmp_path / "mi", tokenizer_from="instruct", progress=False)
    assert "chat_template.jinja" not in os.listdir(out_i)
    assert dj.GenerationIds.from_hf(out_i).eos == ()


def test_save_hf_round_trips_generation_ids_into_load_pair(dense, tmp_path):
    """Instruct and Thinking with different EOS ids: save_hf writes them, transformers and load_pair
    read them back, and the pair's ids (so its stop tokens) follow the model whose tokenizer it uses."""
    import torch
    from transformers import AutoModelForCausalLM

    from dami_jax.toyworld import language as L
    from dami_jax.toyworld.tokenizer import save_tokenizer

    cfg, params = dj.ModelConfig.from_hf(dense[0]), dj.load_hf(dense[0], progress=False)
    ids = {"instruct": dj.GenerationIds(eos=(5,), bos=1, pad=0),
           "thinking": dj.GenerationIds(eos=(5, 7), bos=1, pad=0)}
    for name in ids:
        dj.save_hf(cfg, params, tmp_path / name, generation_ids=ids[name], progress=False)
        assert dj.GenerationIds.from_hf(tmp_path / name) == ids[name]
        assert dj.ModelConfig.from_hf(tmp_path / name) == cfg
    gen = AutoModelForCausalLM.from_pretrained(tmp_path / "thinking", dtype=torch.float32).generation_config
    assert (gen.eos_token_id, gen.bos_token_id, gen.pad_token_id) == ([5, 7], 1, 0)
    pair = load_pair(tmp_path / "instruct", tmp_path / "thinking", tokenizer="none")
    assert pair.cfg == cfg and pair.generation_ids == ids["thinking"] and pair.stop_tokens == [5, 7]
    save_tokenizer(tmp_path / "instruct")  # the toy tokenizer: its EOS joins the stop tokens
    pair = load_pair(tmp_path / "instruct", tmp_path / "thinking", tokenizer="instruct")
    assert pair.generation_ids == ids["instruct"] and pair.stop_tokens == [5, L.EOS_ID]


def test_failed_merge_leaves_no_partial_output(dense, tmp_path, monkeypatch):
    inst, think = dense
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    # a tensor missing from the Thinking checkpoint: refused before anything is written
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copyfile(os.path.join(think, "config.json"), broken / "config.json")
    f = SafetensorsFile(os.path.join(think, "model.safetensors"))
    drop = "model.layers.1.mlp.up_proj.weight"
    write_safetensors(broken / "model.safetensors", [(k, np.array(f.get(k))) for k in f.keys() if k != drop])
    f.close()
    with pytest.raises(CheckpointError, match=drop.replace(".", r"\.")):
        merge_checkpoints(inst, broken, 0.5, out, progress=False)
    # a failure after the shards are written: the temporary directory is removed, `out` untouched
    import dami_jax.checkpoint.merge as merge_mod

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(merge_mod, "_write_config", boom)
    with pytest.raises(OSError, match="disk full"):
        merge_checkpoints(inst, think, 0.5, out, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["broken", "out"]
    assert os.listdir(out) == ["keep.txt"]


def test_merge_refuses_shape_mismatch_and_self_overwrite(dense, tmp_path):
    inst, think = dense
    with pytest.raises(ValueError, match="is the thinking checkpoint"):
        merge_checkpoints(inst, think, 0.5, think, progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(think, bad)
    f = SafetensorsFile(os.path.join(think, "model.safetensors"))
    tensors = [(k, np.array(f.get(k))) for k in f.keys()]
    f.close()
    tensors = [(k, v[:, :-1] if k == "model.layers.0.self_attn.q_proj.weight" else v) for k, v in tensors]
    write_safetensors(bad / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight.*has shape \(96, 47\), expected \(96, 48\)"):
        merge_checkpoints(inst, bad, 0.5, tmp_path / "out", progress=False)


def test_cli_merge(dense, tmp_path, capsys):
    from dami_jax.cli import main

    inst, think = dense
    out = tmp_path / "cli"
    assert main(["merge", "--instruct", inst, "--thinking", think, "--lam", "0.8", "--out", str(out),
                 "--max-shard-bytes", "20KB", "--dtype", "float32", "--no-progress"]) == 0
    assert "merged" in capsys.readouterr().out
    assert os.path.isfile(out / "model.safetensors.index.json")
    assert json.loads((out / "dami_merge.json").read_text())["lam"] == pytest.approx(0.8)
    assert main(["merge", "--instruct", inst, "--thinking", think, "--lam", "1.5", "--out",
                 str(tmp_path / "x")]) == 2
    assert "outside [0, 1]" in capsys.readouterr().err
