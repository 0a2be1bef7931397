"""Qwen3-VL against transformers (CPU, float32, tiny random checkpoints built here).

One dense and one MoE checkpoint per module, each with a 4×4 position table (so the
6×8 grids below are larger than the table and not square), two deepstack blocks and
a vision tower of three blocks. Prompts are laid out as the processor lays them
out: <vision_start> + t·h·w/4 placeholders + <vision_end> per image, one such group
per video frame after a timestamp token.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import left_pad, perturb_

import dami_jax as dj
from dami_jax.generate.decode import generate_lockstep
from dami_jax.models import qwen3, qwen3_vl
from dami_jax.models.mrope import rope_index

IMAGE, VIDEO, START, END = 150, 151, 152, 153  # the tiny vocabulary's vision ids
TEXT = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                             "mrope_interleaved": True})
VISION = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=2, temporal_patch_size=2,
              spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0, 2])
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1)
TOL = 1e-4


def build_hf(kind: str, seed: int = 0, vision_seed: int | None = None):
    """A tiny random Qwen3-VL (kind "dense" or "moe"), every weight perturbed; the tower's
    weights drawn with `vision_seed` (default: seed)."""
    import torch
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
    )

    torch.manual_seed(seed)
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    if kind == "moe":
        cfg = Qwen3VLMoeConfig(text_config={**TEXT, **MOE}, vision_config=VISION, **ids)
        model = Qwen3VLMoeForConditionalGeneration(cfg)
    else:
        cfg = Qwen3VLConfig(text_config=TEXT, vision_config=VISION, **ids)
        model = Qwen3VLForConditionalGeneration(cfg)
    perturb_(model, seed)
    perturb_(model.model.visual, seed if vision_seed is None else vision_seed)  # its own draws
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model.eval()


@dataclasses.dataclass
class Ckpt:
    path: str
    hf: object
    cfg: dj.ModelConfig
    params: dict


def _ckpt(tmp_path_factory, kind: str, seed: int = 0, vision_seed: int | None = None) -> Ckpt:
    import torch

    torch.set_num_threads(1)
    model = build_hf(kind, seed, vision_seed)
    path = str(tmp_path_factory.mktemp(f"vl-{kind}-{seed}-{vision_seed}"))
    model.save_pretrained(path)
    return Ckpt(path, model, dj.ModelConfig.from_hf(path), dj.load_hf(path, progress=False))


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return _ckpt(tmp_path_factory, "dense")


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return _ckpt(tmp_path_factory, "moe")


# ---------------------------------------------------------------------------
# Prompts with images and video, laid out as the processor lays them out.

def _image(grid) -> list[int]:
    t, h, w = grid
    return [START] + [IMAGE] * (t * h * w // 4) + [END]


def _video(grid) -> list[int]:
    t, h, w = grid
    return [tok for f in range(t) for tok in [40 + f, START] + [VIDEO] * (h * w // 4) + [END]]


@dataclasses.dataclass
class Case:
    tokens: np.ndarray
    mask: np.ndarray
    inputs: dict  # our / transformers' pixel keywords


def make_case(rows: list[list], seed: int = 0) -> Case:
    """rows: per batch row a list of text token lists, ("image", grid) and ("video", grid)."""
    rng = np.random.default_rng(seed)
    prompts, grids = [], {"image": [], "video": []}
    for row in rows:
        toks = []
        for part in row:
            if isinstance(part, tuple):
                grids[part[0]].append(part[1])
                toks += (_image if part[0] == "image" else _video)(part[1])
            else:
                toks += part
        prompts.append(toks)
    tokens, mask = left_pad(prompts)
    inputs = {}
    for kind, (pix_key, grid_key) in {"image": ("pixel_values", "image_grid_thw"),
                                      "video": ("pixel_values_videos", "video_grid_thw")}.items():
        if grids[kind]:
            grid = np.array(grids[kind], np.int64)
            inputs[pix_key] = rng.standard_normal((int(grid.prod(-1).sum()), 24)).astype(np.float32)
            inputs[grid_key] = grid
    return Case(tokens, mask, inputs)


CASES = {
    "text": [[[3, 4, 5, 6, 7, 8, 9]]],
    "one_image": [[[5, 6], ("image", (1, 6, 8)), [7, 8, 9]]],
    "two_images": [[[5], ("image", (1, 6, 8)), [7, 8], ("image", (1, 4, 4)), [9, 10]]],
    "padded_batch": [[[5], ("image", (1, 4, 4)), [7]],
                     [[11, 12], ("image", (1, 6, 8)), [13], ("image", (1, 4, 6)), [14, 15, 16]],
                     [[17, 18, 19]]],
    "video": [[[5, 6], ("video", (2, 4, 6)), [7, 8]]],
    "image_video": [[[5], ("image", (1, 6, 4)), [6], ("video", (2, 4, 4)), [7, 8]]],
}


def hf_logits(model, case: Case, **inputs) -> np.ndarray:
    import torch

    t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
    mm = np.where(case.tokens == IMAGE, 1, np.where(case.tokens == VIDEO, 2, 0))
    kw = {k: t(v) for k, v in {**case.inputs, **inputs}.items()}
    with torch.no_grad():
        out = model(input_ids=t(case.tokens).long(), attention_mask=t(case.mask).long(),
                    mm_token_type_ids=t(mm).long(), **kw)
    return out.logits.numpy()


def masked_err(a, b, mask) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask).astype(bool)].max())


WIDTH = 32  # our side pads every prompt to this width, so the cases share compiled programs


def widen(case: Case) -> Case:
    """The case left-padded to WIDTH (logits of its last T columns are the case's)."""
    pad = WIDTH - case.tokens.shape[1]
    return dataclasses.replace(case, tokens=np.pad(case.tokens, ((0, 0), (pad, 0))),
                               mask=np.pad(case.mask, ((0, 0), (pad, 0))))


def ours(cfg, params, case: Case, **kw) -> np.ndarray:
    """dj.forward on the widened case, cut back to the case's columns."""
    wide = widen(case)
    out = dj.forward(cfg, params, wide.tokens, wide.mask, **case.inputs, **kw)
    assert out.shape == (*wide.tokens.shape, 160) and out.dtype == jnp.float32
    return np.asarray(out)[:, -case.tokens.shape[1]:]


# ---------------------------------------------------------------------------
# Vision tower and rope index

def test_vision_tower_equals_hf(dense):
    """Several images (non-square, larger than the 4x4 table) and a 2-frame video in one call."""
    import torch

    grid = np.array([[1, 6, 8], [1, 4, 4], [2, 4, 6], [1, 8, 10]])
    pixels = np.random.default_rng(1).standard_normal((int(grid.prod(-1).sum()), 24)).astype(np.float32)
    with torch.no_grad():
        ref = dense.hf.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grid))
    merged, deepstack = qwen3_vl.vision_tower(dense.cfg, dense.params, pixels, grid)
    assert merged.shape == (int(grid.prod(-1).sum()) // 4, 64)
    np.testing.assert_allclose(merged, ref.pooler_output.numpy(), atol=1e-5, rtol=0)
    assert len(deepstack) == len(ref.deepstack_features) == 2
    for ours, theirs in zip(deepstack, ref.deepstack_features):
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5, rtol=0)


def test_frame_attention_in_query_blocks():
    """Blocks of queries (the last one padded) give the attention of all queries at once."""
    from dami_jax.models.vision import frame_attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((40, 2, 8)), jnp.float32) for _ in range(3))
    frame = jnp.asarray(np.repeat([0, 1, 2], [16, 8, 16]), jnp.int32)
    whole = frame_attention(q, k, v, frame, block=40)
    np.testing.assert_allclose(frame_attention(q, k, v, frame, block=16), whole, atol=1e-6, rtol=0)
    # and each frame alone: patches of other frames do not enter
    np.testing.assert_allclose(frame_attention(q[16:24], k[16:24], v[16:24], frame[16:24]), whole[16:24],
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", [n for n in CASES if n != "text"])
def test_rope_index_equals_hf(dense, name):
    import torch

    case = make_case(CASES[name])
    mm = np.where(case.tokens == IMAGE, 1, np.where(case.tokens == VIDEO, 2, 0))
    grids = {k: torch.tensor(case.inputs[k]) for k in ("image_grid_thw", "video_grid_thw") if k in case.inputs}
    ref_pos, ref_delta = dense.hf.model.get_rope_index(torch.tensor(case.tokens).long(), torch.tensor(mm),
                                                       attention_mask=torch.tensor(case.mask), **grids)
    pos, delta = rope_index(case.tokens, case.mask, dense.cfg.vl, case.inputs.get("image_grid_thw"),
                            case.inputs.get("video_grid_thw"))
    real = case.mask.astype(bool)
    np.testing.assert_array_equal(pos[:, real], ref_pos.numpy()[:, real])
    np.testing.assert_array_equal(delta, ref_delta.numpy()[:, 0])


def test_rope_index_refuses_mismatched_grids(dense):
    case = make_case(CASES["one_image"])
    with pytest.raises(dj.InputError, match="grid"):
        rope_index(case.tokens, case.mask, dense.cfg.vl, np.array([[1, 4, 4]]))
    with pytest.raises(dj.InputError, match="placeholder"):
        rope_index(case.tokens, case.mask, dense.cfg.vl, np.array([[1, 6, 8], [1, 4, 4]]))


# ---------------------------------------------------------------------------
# Logits

@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_logits_equal_hf(request, kind, name):
    ckpt = request.getfixturevalue(kind)
    case = make_case(CASES[name])
    assert masked_err(ours(ckpt.cfg, ckpt.params, case), hf_logits(ckpt.hf, case), case.mask) < TOL


def test_bfloat16_close_to_float32(dense):
    """bfloat16 params (the tower included) run and stay close to float32, with the bounds of
    test_model_parity's dense check: rms error <= 8% of the logits' rms, max error <= 5% of max |logit|."""
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), dense.params)
    case = make_case(CASES["one_image"])
    f32, b16 = ours(dense.cfg, dense.params, case), ours(dense.cfg, params16, case)
    err = b16 - f32
    assert np.sqrt(np.mean(err ** 2)) <= 0.08 * np.sqrt(np.mean(f32 ** 2))
    assert np.abs(err).max() <= 0.05 * np.abs(f32).max()


def test_text_only_vl_equals_qwen3(dense):
    """The VL language model is Qwen3: the same logits without the tower, as a plain Qwen3 config."""
    case = widen(make_case(CASES["padded_batch"][2:] + [[[3, 4, 5, 6, 7]]]))
    text_cfg = dataclasses.replace(dense.cfg, vl=None)
    text_params = {k: v for k, v in dense.params.items() if k != "visual"}
    vl = dj.forward(dense.cfg, dense.params, case.tokens, case.mask)
    plain = qwen3.forward(text_cfg, text_params, case.tokens, case.mask)
    np.testing.assert_array_equal(np.asarray(vl), np.asarray(plain))


def _linear_positions(case: Case) -> np.ndarray:
    return np.broadcast_to(np.maximum(np.cumsum(case.mask, 1) - 1, 0), (3, *case.tokens.shape)).astype(np.int32)


def _wrong(variant: str, cfg, vis, case: Case):
    """(cfg, vis, deepstack_layers) of one known porting mistake."""
    if variant == "deepstack_dropped":
        return cfg, vis, ()
    if variant == "deepstack_at_vit_indexes":
        return cfg, vis, cfg.vl.deepstack_visual_indexes
    if variant == "1d_rope":
        return cfg, vis.replace(pos_3bt=_linear_positions(case)), None
    if variant == "text_resumes_at_linear_index":
        pos = np.array(vis.pos_3bt)
        after = np.cumsum(case.tokens == IMAGE, axis=1) > 0
        text_after = after & (case.tokens != IMAGE) & case.mask.astype(bool)
        pos[:, text_after] = _linear_positions(case)[:, text_after]
        return cfg, vis.replace(pos_3bt=pos), None
    if variant == "non_interleaved_mrope":
        return dataclasses.replace(cfg, vl=dataclasses.replace(cfg.vl, mrope_interleaved=False)), vis, None
    raise ValueError(variant)


@pytest.mark.parametrize("variant", ["deepstack_dropped", "deepstack_at_vit_indexes", "1d_rope",
                                     "text_resumes_at_linear_index", "non_interleaved_mrope"])
def test_pitfalls_break_the_one_image_case(dense, variant):
    """Each known porting mistake alone moves the one-image logits far past the tolerance, so
    the parity tests above would catch it."""
    case = widen(make_case(CASES["one_image"]))
    ref = hf_logits(dense.hf, case)
    vis = qwen3_vl.vision_inputs(dense.cfg, case.tokens, case.mask, pad_patches=64, **case.inputs)
    cfg, wrong_vis, layers = _wrong(variant, dense.cfg, vis, case)
    if layers is None:  # the compiled program of the parity tests
        logits = qwen3_vl._forward(cfg, dense.params, case.tokens, case.mask, wrong_vis, None)
    else:
        logits = jax.jit(functools.partial(qwen3_vl.apply, cfg, deepstack_layers=layers))(
            dense.params, case.tokens, case.mask, wrong_vis)[0]
    err = masked_err(logits, ref, case.mask)
    assert err > 100 * TOL, f"{variant}: error {err}"


# ---------------------------------------------------------------------------
# Checkpoints: both expert layouts, export

def test_expert_layouts_both_load(moe, tmp_path):
    """transformers 5 saves the fused (E, 2F, D) / (E, D, F) experts; hub files hold (E, D, 2F) /
    (E, F, D). A hub-layout copy of the checkpoint loads to the same params."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(os.path.join(moe.path, "model.safetensors"))
    fused = tensors["model.language_model.layers.0.mlp.experts.gate_up_proj"]
    assert fused.shape == (4, 48, 64)  # (E, 2F, D): the fixture is the fused layout
    hub = {k: (np.ascontiguousarray(v.transpose(0, 2, 1)) if ".mlp.experts." in k else v)
           for k, v in tensors.items()}
    save_file(hub, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(moe.path, "config.json")) as f, open(tmp_path / "config.json", "w") as g:
        g.write(f.read())
    loaded = dj.load_hf(tmp_path, progress=False)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(moe.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    gate = np.asarray(loaded["layers"][0]["mlp"]["gate_proj"])
    np.testing.assert_array_equal(gate, fused[:, :24].transpose(0, 2, 1))  # gate first, ours (E, D, F)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_export_reloads_in_transformers(request, kind, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText

    ckpt = request.getfixturevalue(kind)
    dj.save_hf(ckpt.cfg, ckpt.params, tmp_path / "out", progress=False)
    assert dj.ModelConfig.from_hf(tmp_path / "out") == ckpt.cfg
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["architectures"] == [type(ckpt.hf).__name__]
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    case = make_case(CASES["image_video"])
    np.testing.assert_array_equal(hf_logits(reloaded, case), hf_logits(ckpt.hf, case))


# ---------------------------------------------------------------------------
# Interpolation: Θ(λ) with the tower, delta mode with per-row λ, a tower shared by both

@pytest.fixture(scope="module")
def thinking(tmp_path_factory):
    """A second dense checkpoint: every weight differs from `dense`, its tower included."""
    return _ckpt(tmp_path_factory, "dense", seed=1)


@pytest.fixture(scope="module")
def thinking_same_tower(tmp_path_factory):
    """A second dense checkpoint whose vision tower equals `dense`'s."""
    return _ckpt(tmp_path_factory, "dense", seed=2, vision_seed=0)


def hf_merged(instruct, thinking, lam: float):
    """transformers' model holding Θ(λ) = λ·Θ_T + (1 − λ)·Θ_I, the tower included."""
    import copy

    import torch

    model = copy.deepcopy(instruct.hf)
    theta_t = thinking.hf.state_dict()
    with torch.no_grad():
        model.load_state_dict({k: lam * theta_t[k] + (1 - lam) * v for k, v in instruct.hf.state_dict().items()})
    return model.eval()


LAMS = (0.0, 0.5, 1.0)


@pytest.mark.parametrize("lam", LAMS)
def test_interpolated_equals_transformers_merged(dense, thinking, lam):
    case = make_case(CASES["padded_batch"])
    theta = dj.interpolate(dense.params, thinking.params, lam)
    ref = hf_logits(hf_merged(dense, thinking, lam), case)
    assert masked_err(ours(dense.cfg, theta, case), ref, case.mask) < TOL


@pytest.mark.parametrize("same_tower", [False, True])
def test_delta_mode_per_row_lam_equals_transformers(request, dense, same_tower):
    """Rows at λ = 0, 0.5, 1 in one batch, each with its own images; with equal towers the
    pair keeps the tower plain (found by comparing the arrays), so it runs once."""
    other = request.getfixturevalue("thinking_same_tower" if same_tower else "thinking")
    pair = dj.ModelPair(dense.cfg, dense.params, other.params)
    assert (pair.delta["visual"]["pos_embed"]["embedding"].ndim == 2) == same_tower
    case = make_case(CASES["padded_batch"])
    got = ours(dense.cfg, pair.delta, case, lam=np.array(LAMS, np.float32))
    for row, lam in enumerate(LAMS):
        ref = hf_logits(hf_merged(dense, other, lam), case)
        assert masked_err(got[row], ref[row], case.mask[row]) < TOL, (row, lam)


def test_vision_schedule_kind(dense, thinking):
    """A `vision` rule scales λ on the tower alone."""
    schedule = dj.Schedule.from_dict({"rules": [{"kinds": ["vision"], "scale": 0.0}]}, dense.cfg.num_layers)
    theta = dj.interpolate(dense.params, thinking.params, 1.0, schedule=schedule)
    for a, b in zip(jax.tree.leaves(theta["visual"]), jax.tree.leaves(dense.params["visual"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(theta["embed"]["embedding"]),
                                  np.asarray(thinking.params["embed"]["embedding"]))


# ---------------------------------------------------------------------------
# Generation with images

NEW = 6


def hf_generate(model, case: Case) -> np.ndarray:
    import torch

    t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
    mm = np.where(case.tokens == IMAGE, 1, np.where(case.tokens == VIDEO, 2, 0))
    with torch.no_grad():
        out = model.generate(input_ids=t(case.tokens).long(), attention_mask=t(case.mask).long(),
                             mm_token_type_ids=t(mm).long(), max_new_tokens=NEW, do_sample=False,
                             **{k: t(v) for k, v in case.inputs.items()})
    return out[:, case.tokens.shape[1]:].numpy()


def prompts_of(case: Case) -> list[list[int]]:
    return [row[m.astype(bool)].tolist() for row, m in zip(case.tokens, case.mask)]


# Two rows of one image each, left-padded; every row (and row group) fits one compiled shape.
GEN_CASE = [[[5], ("image", (1, 4, 4)), [7]], [[11, 12], ("image", (1, 6, 4)), [13]]]


@pytest.mark.parametrize("path", [pytest.param("engine", marks=pytest.mark.slow), "lockstep"])
def test_greedy_equals_hf_generate(dense, path):
    """Decoding continues at each row's max position + 1 (text position + the row's delta): on the
    paged engine, its prefill in chunks of 8 tokens that split the images (generate_pair's delta
    mode below runs the engine as dj.generate sizes it), and in lock step."""
    case = make_case(GEN_CASE)
    prompts = prompts_of(case)
    if path == "lockstep":
        out = generate_lockstep(dense.cfg, dense.params, prompts, NEW, **case.inputs)
    else:
        engine = dj.Engine(dense.cfg, dense.params, num_pages=16, page_size=8, max_rows=2, max_tokens_per_step=8)
        out = engine.generate(prompts, NEW, **case.inputs)
    expected = hf_generate(dense.hf, case)
    assert len(set(expected.ravel().tolist())) > 2  # not a degenerate repetition
    np.testing.assert_array_equal(out.tokens, expected)


@pytest.mark.slow
def test_generate_pair_with_images_mixed_lam(dense, thinking):
    """Rows at λ = 0.5 and 1 with their own images: delta mode (one batch) gives merged mode's
    tokens (one batch per λ), each row those of its λ alone, and transformers' with Θ(λ)."""
    case = make_case(GEN_CASE)
    prompts, lams = prompts_of(case), (0.5, 1.0)
    pair = dj.ModelPair(dense.cfg, dense.params, thinking.params)
    delta = dj.generate_pair(pair, prompts, lams, NEW, mode="delta", **case.inputs)
    merged = dj.generate_pair(pair, prompts, lams, NEW, mode="merged", **case.inputs)
    np.testing.assert_array_equal(delta.tokens, merged.tokens)
    alone = dj.generate_pair(pair, prompts[:1], lams[0], NEW, mode="merged",
                             **qwen3_vl.select_rows(dense.cfg, prompts, case.inputs, [0]))
    np.testing.assert_array_equal(alone.tokens[0], delta.tokens[0])
    for row, lam in enumerate(lams):
        np.testing.assert_array_equal(delta.tokens[row], hf_generate(hf_merged(dense, thinking, lam), case)[row])


def test_real_4b_config_round_trip():
    """A config.json shaped as Qwen3-VL-4B's (rope_scaling in the text config, no rope_parameters
    in the vision one, tied embeddings at the top) parses, and our export is transformers'."""
    from transformers import Qwen3VLConfig

    raw = {
        "model_type": "qwen3_vl", "architectures": ["Qwen3VLForConditionalGeneration"], "tie_word_embeddings": True,
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "text_config": {"model_type": "qwen3_vl_text", "vocab_size": 151936, "hidden_size": 2560,
                        "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
                        "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-6,
                        "max_position_embeddings": 262144, "rope_theta": 5000000,
                        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                         "rope_type": "default"}},
        "vision_config": {"model_type": "qwen3_vl", "depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
                          "num_heads": 16, "out_hidden_size": 2560, "deepstack_visual_indexes": [5, 11, 17],
                          "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3,
                          "num_position_embeddings": 2304, "hidden_act": "gelu_pytorch_tanh"},
    }
    cfg = dj.ModelConfig.from_hf(raw)
    assert (cfg.tie_word_embeddings, cfg.rope_theta, cfg.num_layers) == (True, 5e6, 36)
    assert (cfg.vl.mrope_section, cfg.vl.deepstack_visual_indexes, cfg.vl.patch_dim) == ((24, 20, 20), (5, 11, 17),
                                                                                         1536)
    exported = cfg.to_hf_dict()
    assert dj.ModelConfig.from_hf(exported) == cfg
    theirs = Qwen3VLConfig(**{k: v for k, v in exported.items() if k != "architectures"})
    assert theirs.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
    assert theirs.vision_config.deepstack_visual_indexes == [5, 11, 17] and theirs.tie_word_embeddings
    with pytest.raises(dj.ConfigError, match="vision_config"):
        dj.ModelConfig.from_hf({**raw, "vision_config": None})
