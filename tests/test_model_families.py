"""The Qwen2 and Llama 3 families: parity with transformers (Qwen2ForCausalLM, LlamaForCausalLM),
interpolation, export and `dami merge`, Conf and Pref features on a pair, and the pair's bad inputs.

Tiny random checkpoints (helpers.TINY_FAMILIES): Qwen2 untied and tied; Llama with attention and
MLP biases and untied, and without biases and tied; both Llamas with llama3 RoPE scaling whose
pretraining context (32 positions) the long prompt (80 tokens) runs well past. A pair is seeds 0
and 1 of one architecture (Instruct, Thinking).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import warnings

import jax
import numpy as np
import pytest

import dami_jax as dj
from dami_jax.checkpoint.hf import leaf_table
from dami_jax.cli import main
from dami_jax.config import ConfigError
from dami_jax.generate.decode import generate_lockstep
from dami_jax.interpolate import interpolate
from dami_jax.pair import PairMismatchError, TokenizerMismatchWarning, generate_pair, load_pair
from dami_jax.policies import ConfConfig, ConfPolicy, calibrate_conf, score_prompts
from dami_jax.pref.features import prompt_features
from dami_jax.schedule import module_kind
from helpers import TINY_FAMILIES, hf_config, leaves, left_pad, random_prompts

ATOL_F32 = 1e-4  # DESIGN 2.3
LENGTHS = [9, 4, 80, 1]  # left-padded rows; 80 runs past llama3's pretraining context (32)
FAMILIES = list(TINY_FAMILIES)
# Both layouts where the biases are (they run through either layout's Linear); the tied ones on one.
PARITY = [(n, layout) for n in FAMILIES for layout in (("cpu",) if n.endswith("_tied") else ("cpu", "readable"))]
# One pair per family. The llama pair holds every option the qwen2 one has (q/k/v biases) and more,
# so the qwen2 pair's repeat of each check (and its compiles) is in the slow tier.
PAIRS = [pytest.param("qwen2", marks=pytest.mark.slow), "llama"]
LAMS = np.array([0.0, 0.35, 1.0, 0.8], np.float32)
NEW = 8


def _real_rows(logits, mask):
    return [np.asarray(logits[i])[mask[i].astype(bool)] for i in range(len(mask))]


def _hf_logits(model, prompt):
    import torch

    with torch.no_grad():
        return model(torch.tensor([prompt]), use_cache=False).logits[0].numpy()


def _hf_greedy(model, prompt, n):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _max_diff_to_hf(model, cfg, params, prompts):
    tokens, mask = left_pad(prompts)
    ours = _real_rows(dj.forward(cfg, params, tokens, mask), mask)
    return max(float(np.max(np.abs(o - _hf_logits(model, p)))) for o, p in zip(ours, prompts))


# ---------------------------------------------------------------------------
# Config and mapping table

@pytest.mark.parametrize("name", FAMILIES)
def test_config_and_mapping_table_match_hf(tiny_hf, name):
    """The family's options come from config.json, and the mapping table names exactly the tensors
    transformers holds (a tied head has none of its own)."""
    ckpt = tiny_hf(name)
    spec, cfg = TINY_FAMILIES[name], ckpt.cfg
    llama = spec["model_type"] == "llama"
    assert cfg.family == cfg.model_type == spec["model_type"]
    assert not cfg.qk_norm
    assert cfg.qkv_bias == (not llama or spec.get("attention_bias", False))
    assert cfg.o_bias == cfg.mlp_bias == spec.get("attention_bias", False) == spec.get("mlp_bias", False)
    assert bool(cfg.rope_scaling) == llama
    hf_names = set(ckpt.hf.state_dict()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    assert {n for leaf in leaf_table(cfg) for n in leaf.hf_names} == hf_names
    for leaf in leaf_table(cfg):  # a λ schedule counts a bias with its module (attn or mlp)
        if leaf.path[-1] == "bias":
            assert module_kind(leaf.path) == leaf.path[-3], leaf.path
    params = ckpt.params()
    assert ("bias" in params["layers"][0]["attn"]["q_proj"]) == cfg.qkv_bias
    assert ("q_norm" in params["layers"][0]["attn"]) is False


# ---------------------------------------------------------------------------
# Parity with transformers

@pytest.fixture(scope="module", params=PARITY, ids=lambda p: f"{p[0]}-{p[1]}")
def ckpt(request, tiny_hf):
    name, layout = request.param
    base = tiny_hf(name)
    return dataclasses.replace(base, _cfg=dataclasses.replace(base.cfg, layout=layout))


def test_logits_match_hf_left_padded(ckpt):
    prompts = random_prompts(ckpt.cfg.vocab_size, LENGTHS, seed=1)
    diff = _max_diff_to_hf(ckpt.hf, ckpt.cfg, ckpt.params(), prompts)
    assert diff <= ATOL_F32, f"{ckpt.name}: max abs diff {diff:.3g}"


def test_llama3_scaling_is_what_matches(tiny_hf):
    """Guards the parity test: without the llama3 scaling the same weights miss HF by far."""
    ckpt = tiny_hf("llama")
    plain = dataclasses.replace(ckpt.cfg, rope_scaling=())
    prompts = random_prompts(ckpt.cfg.vocab_size, LENGTHS, seed=1)
    assert _max_diff_to_hf(ckpt.hf, plain, ckpt.params(), prompts) > 1e-2


def test_convert_round_trip_and_scanned_layers(tiny_hf, tmp_path):
    """`dami convert` (Orbax) keeps the family's config and every leaf (biases included); the scanned
    layer loop over stacked params gives the unrolled logits."""
    from dami_jax.checkpoint import store
    from dami_jax.models.qwen3 import stack_layers

    ckpt = tiny_hf("llama")  # every bias
    conv = store.save_params(ckpt.cfg, ckpt.params(), tmp_path / "conv", source=ckpt.path)
    assert dj.ModelConfig.from_hf(conv) == ckpt.cfg
    back, want = leaves(dj.load_hf(conv, progress=False)), leaves(ckpt.params())
    assert back.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(back[path], want[path], err_msg=str(path))
    tokens, mask = left_pad(random_prompts(ckpt.cfg.vocab_size, [9, 4], seed=2))
    scanned = dj.forward(dataclasses.replace(ckpt.cfg, scan_layers=True), stack_layers(ckpt.params()), tokens, mask)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(dj.forward(ckpt.cfg, ckpt.params(), tokens, mask)),
                               atol=1e-5, rtol=0)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (conftest sets XLA_FLAGS)")
def test_biased_llama_on_a_mesh(tiny_hf):
    """Sharded load on a (2, 2, 2) mesh: each bias split as its kernel's output axis; logits unchanged."""
    from jax.sharding import PartitionSpec as P

    ckpt = tiny_hf("llama")
    mesh = dj.make_mesh(data=2, fsdp=2, tensor=2)
    params = dj.load_hf(ckpt.path, mesh=mesh, progress=False)
    layer = params["layers"][0]
    for module, spec in (("q_proj", P("tensor")), ("o_proj", P("fsdp"))):
        assert layer["attn"][module]["bias"].sharding.spec == spec, module
    assert layer["mlp"]["down_proj"]["bias"].sharding.spec == P("fsdp")
    prompts = random_prompts(ckpt.cfg.vocab_size, [8, 8], seed=4)
    tokens, mask = left_pad(prompts)
    with jax.set_mesh(mesh):
        got = np.asarray(dj.forward(ckpt.cfg, params, tokens, mask))
    np.testing.assert_allclose(got, np.asarray(dj.forward(ckpt.cfg, ckpt.params(), tokens, mask)), atol=1e-5)


# ---------------------------------------------------------------------------
# A pair of each family: delta == merged, export, `dami merge`, Conf and Pref features

@pytest.fixture(scope="module", params=PAIRS)
def fp(request, tiny_hf):
    """The pair, its HF checkpoints, prompts (one past llama3's pretraining context) and the Instruct
    model's greedy tokens in lock step (shared by the HF parity and Conf tests: one compile; the engine
    runs the pair in test_delta_equals_merged)."""
    ci, ct = tiny_hf(request.param, 0), tiny_hf(request.param, 1)
    pair = load_pair(ci.path, ct.path, tokenizer="none")
    prompts = random_prompts(pair.cfg.vocab_size, [5, 40, 3, 12], seed=1)
    greedy = generate_lockstep(pair.cfg, pair.instruct, prompts, NEW)
    return types.SimpleNamespace(name=request.param, pair=pair, instruct=ci, thinking=ct, prompts=prompts,
                                 greedy=greedy)


def test_greedy_matches_hf_generate(fp):
    assert fp.greedy.lengths.tolist() == [NEW] * len(fp.prompts)
    for i, prompt in enumerate(fp.prompts):
        assert fp.greedy.tokens[i].tolist() == _hf_greedy(fp.instruct.hf, prompt, NEW), f"{fp.name} row {i}"


@pytest.mark.slow
def test_delta_equals_merged(fp):
    """Delta mode on the engine and merged mode in lock step: the same tokens; delta logits per row
    equal the merged model's."""
    delta = generate_pair(fp.pair, fp.prompts, LAMS, NEW, mode="delta")
    merged = generate_pair(fp.pair, fp.prompts, LAMS, NEW, mode="merged")
    np.testing.assert_array_equal(delta.tokens, merged.tokens)
    np.testing.assert_array_equal(delta.tokens[0], fp.greedy.tokens[0])  # λ = 0 is the Instruct model
    assert (delta.tokens[2] != fp.greedy.tokens[2]).any()  # λ = 1 is not
    cfg, tokens, mask = fp.pair.cfg, *left_pad(fp.prompts)
    got = np.asarray(dj.forward(cfg, fp.pair.delta, tokens, mask, lam=LAMS))
    for b, lam in enumerate(LAMS):
        want = np.asarray(dj.forward(cfg, fp.pair.merged(float(lam)), tokens[b:b + 1], mask[b:b + 1]))[0]
        real = mask[b].astype(bool)
        np.testing.assert_allclose(got[b][real], want[real], atol=1e-5, rtol=0, err_msg=f"row {b} λ={lam}")


def test_dami_merge_and_export_load_in_transformers(fp, tmp_path):
    """`dami merge` at λ: the interpolated tensors, and transformers on them gives our merged model's
    logits and greedy tokens. save_hf's export of Θ(λ) (config.json written by us) reloads in
    transformers with the same logits."""
    import torch
    from transformers import AutoModelForCausalLM

    lam = 0.7
    assert main(["merge", "--instruct", fp.instruct.path, "--thinking", fp.thinking.path, "--lam", str(lam),
                 "--out", str(tmp_path / "merged"), "--no-progress"]) == 0
    theta = interpolate(fp.pair.instruct, fp.pair.thinking, lam)
    got = leaves(dj.load_hf(tmp_path / "merged", progress=False))
    want = leaves(theta)
    assert got.keys() == want.keys()
    for path in want:  # NumPy (merge) vs XLA (interpolate) float32: within one rounding
        np.testing.assert_allclose(got[path], want[path], rtol=3e-7, atol=2e-7, err_msg=str(path))
    dj.save_hf(fp.pair.cfg, theta, tmp_path / "export", progress=False)
    with open(tmp_path / "export" / "config.json") as f:
        assert json.load(f)["model_type"] == fp.pair.cfg.family
    assert dj.ModelConfig.from_hf(tmp_path / "export") == fp.pair.cfg
    ours = generate_lockstep(fp.pair.cfg, theta, fp.prompts, NEW).token_lists()  # fp.greedy's compile
    for out in ("merged", "export"):
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / out, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
        assert type(hf).__name__ == {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[fp.name]
        diff = _max_diff_to_hf(hf, fp.pair.cfg, theta, fp.prompts)
        assert diff <= ATOL_F32, f"{out}: {diff:.3g}"
        for p, want_tokens in zip(fp.prompts, ours):
            assert _hf_greedy(hf, p, NEW) == want_tokens, out


def test_conf_on_the_pair(fp):
    """Conf's scoring, unchanged: the probe is the Instruct model's greedy output and the signals equal
    a float64 NumPy reference on both models' teacher-forced logits; the policy gives λ per row."""
    probe = NEW
    conf = ConfConfig(probe_tokens=probe, batch_size=4, w_entropy=1.0, w_js=1.0)
    out = score_prompts(fp.pair, fp.prompts, conf)
    cfg = fp.pair.cfg
    np.testing.assert_array_equal(out["probe"], fp.greedy.tokens)  # the pair has no stop ids
    tokens, mask = left_pad([p + out["probe"][i].tolist() for i, p in enumerate(fp.prompts)])
    lpi, lpt = (_log_softmax64(np.asarray(dj.forward(cfg, m, tokens, mask))[:, -probe - 1:-1])
                for m in (fp.pair.instruct, fp.pair.thinking))
    pi, pt = np.exp(lpi), np.exp(lpt)
    lpm = np.log(0.5 * (pi + pt))
    js = (0.5 * (pi * (lpi - lpm)).sum(-1) + 0.5 * (pt * (lpt - lpm)).sum(-1)) / np.log(2)
    ent = -(pi * lpi).sum(-1) / np.log(cfg.vocab_size)
    np.testing.assert_allclose(out["js_pos"], js, atol=2e-5)
    np.testing.assert_allclose(out["entropy_pos"], ent, atol=2e-5)
    assert out["js"].min() > 1e-3  # the two random checkpoints really disagree
    result = ConfPolicy(calibrate_conf(fp.pair, fp.prompts, conf))(fp.prompts, fp.pair)
    assert result.lam.shape == (len(fp.prompts),) and np.ptp(result.lam) > 0


def test_pref_features_are_hf_hidden_states(fp):
    """Pref's features (last prompt token, after the final norm) equal transformers' hidden state."""
    import torch

    feats = prompt_features(fp.pair.cfg, fp.pair.instruct, fp.prompts, layer=-1, pooling="last", batch=4)
    for i, p in enumerate(fp.prompts):
        with torch.no_grad():
            h = fp.instruct.hf(torch.tensor([p]), output_hidden_states=True, use_cache=False).hidden_states
        np.testing.assert_allclose(feats[i], h[-1][0, -1].numpy(), atol=1e-4, err_msg=f"row {i}")


# ---------------------------------------------------------------------------
# Bad input

def _config_dirs(tmp_path, *specs):
    dirs = []
    for k, (name, overrides) in enumerate(specs):
        d = tmp_path / f"m{k}"
        hf_config(name, **overrides).save_pretrained(d)
        dirs.append(str(d))
    return dirs


@pytest.mark.parametrize("a, b, match", [
    (("qwen2", {}), ("llama", dict(vocab_size=192)),
     r"differ in family: 'qwen2' vs 'llama'; DAMI interpolates two checkpoints of one model family"),
    (("llama", {}), ("llama", dict(vocab_size=192)),
     r"differ in vocab_size: 128 vs 192; the vocabularies must be the same size"),
    (("llama", {}), ("llama", dict(mlp_bias=False)), r"differ in mlp_bias: True vs False"),
])
def test_mismatched_pair_is_refused(tmp_path, a, b, match):
    from dami_jax.checkpoint.merge import merge_checkpoints

    dirs = _config_dirs(tmp_path, a, b)
    with pytest.raises(PairMismatchError, match=match):
        load_pair(*dirs, tokenizer="none")
    with pytest.raises(PairMismatchError, match=match):
        merge_checkpoints(*dirs, 0.5, tmp_path / "out", progress=False)


@pytest.mark.parametrize("name, fields, match", [
    ("qwen2", {"use_sliding_window": True}, r"use_sliding_window=true is not supported: sliding-window"),
    ("qwen2", {"attention_bias": True}, r"attention_bias=true is not supported for model_type='qwen2'"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     r"rope_type='yarn' is not supported"),
    ("llama", {"rope_parameters": None, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     r"rope_scaling of rope_type 'llama3' lacks \['low_freq_factor', 'high_freq_factor'\]"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 4.0,
                                   "high_freq_factor": 1.0, "original_max_position_embeddings": 32}},
     r"0 < low_freq_factor < high_freq_factor"),
])
def test_unsupported_fields_refused(name, fields, match):
    raw = hf_config(name).to_dict()
    with pytest.raises(ConfigError, match=match):
        dj.ModelConfig.from_hf({**raw, **fields})


def test_hub_llama_rope_scaling_form():
    """The hub's Llama 3.1 config.json form (rope_theta + rope_scaling) reads as transformers 5's."""
    raw = hf_config("llama").to_dict()
    hub = {**raw, "rope_parameters": None, "rope_theta": 10000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 32}}
    assert dj.ModelConfig.from_hf(hub) == dj.ModelConfig.from_hf(raw)


def _with_added_tokens(ckpt, dst, tokens: dict[int, str]):
    os.makedirs(dst)
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(ckpt.path, name), os.path.join(dst, name))
    decoder = {str(i): {"content": s, "special": True} for i, s in tokens.items()}
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": decoder}, f)
    return str(dst)


def test_differing_special_tokens_warn_with_their_ids(tiny_hf, tmp_path):
    """As R1-Distill-Qwen against Qwen2.5-Math: one id, two strings; the warning names each id."""
    ci, ct = tiny_hf("qwen2", 0), tiny_hf("qwen2", 1)
    base = {120: "<|endoftext|>", 121: "<|im_start|>", 122: "<|im_end|>"}
    inst = _with_added_tokens(ci, tmp_path / "i", base)
    think = _with_added_tokens(ct, tmp_path / "t", {**base, 121: "<｜User｜>", 123: "<think>"})
    same = _with_added_tokens(ct, tmp_path / "same", base)
    with pytest.warns(TokenizerMismatchWarning) as caught:
        load_pair(inst, think, tokenizer="none")
    (msg,) = [str(w.message) for w in caught]
    assert "2 special token id(s)" in msg
    assert "121: '<|im_start|>' vs '<｜User｜>'" in msg and "123: None vs '<think>'" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokenizerMismatchWarning)
        load_pair(inst, same, tokenizer="none")


@pytest.mark.parametrize("fields, match", [
    (dict(family="mistral"), r"family='mistral': expected one of \['qwen3', 'qwen2', 'llama'\]"),
    (dict(family="qwen2", attention_bias=True), r"attention_bias / mlp_bias are Llama options, not 'qwen2'"),
    (dict(family="llama", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8), r"no MoE variant"),
    (dict(family="llama", rope_scaling=(8.0, 1.0)), r"expected the llama3 values"),
])
def test_inconsistent_model_config_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        dj.ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                       head_dim=8, **fields)


def test_family_options_leave_qwen3_architecture_fields_alone():
    """A Qwen3 config's architecture fields, hashed into the fingerprints of shipped calibrations and
    reward models (policies.base.pair_fingerprint), do not gain the family options; other families'
    do, so two families never compare equal."""
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                head_dim=8)
    options = {"family", "attention_bias", "mlp_bias", "rope_scaling"}
    assert not options & set(dj.ModelConfig(**base).architecture_fields())
    llama = dj.ModelConfig(**base, family="llama", mlp_bias=True).architecture_fields()
    assert llama["family"] == "llama" and llama["mlp_bias"] is True
