"""Image prompts through the λ-policies and `dami eval` (CPU, float32, a tiny random Qwen3-VL pair).

The pair's two checkpoints (every weight different, towers included) are saved with the tiny
processor of mm_helpers (patch 16, merge 2), whose tokenizer's vision ids the configs use, so
prompts are made as `dami eval` makes them: problem messages through transformers' processor.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from helpers import perturb_
from mm_helpers import png_bytes, random_image, save_tiny_processor, tiny_tokenizer

import dami_jax as dj
from dami_jax.errors import InputError
from dami_jax.eval.benchmarks import Problem, problem_messages
from dami_jax.eval.pairs import PairConfig
from dami_jax.models.qwen3_vl import select_rows
from dami_jax.multimodal import encode_chats, load_processor, prompt_ids, vision_kwargs
from dami_jax.policies.base import Policy, PolicyResult, pair_fingerprint
from dami_jax.policies.calibration import Calibration
from dami_jax.policies.conf import ConfPolicy, position_signals, score_prompts
from dami_jax.policies.conf_config import ConfConfig
from dami_jax.policies.execute import answer
from dami_jax.pref.features import prompt_features

TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                             "mrope_interleaved": True})
VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=16, temporal_patch_size=2,
              spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
CONF = ConfConfig(probe_tokens=5, batch_size=4)
NEW = 5


def _checkpoint(path, seed: int):
    """A tiny random Qwen3VLForConditionalGeneration saved at `path` with the tiny processor."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = tiny_tokenizer()
    ids = {key: tok.convert_tokens_to_ids(token) for key, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=TEXT, vision_config=VISION, **ids))
    perturb_(model, seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = None
    model.save_pretrained(path)
    save_tiny_processor(path)
    return model.eval()


@dataclasses.dataclass
class VL:
    dirs: tuple[str, str]
    hf: tuple  # transformers' instruct, thinking
    pair: dj.ModelPair
    processor: object


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    dirs = tuple(str(tmp_path_factory.mktemp(name)) for name in ("vl-instruct", "vl-thinking"))
    hf = tuple(_checkpoint(d, seed) for d, seed in zip(dirs, (0, 1)))
    pair = dj.load_pair(*dirs, dtype="float32")
    return VL(dirs, hf, pair, load_processor(dirs[1]))


IMAGES = {"a": random_image(64, 64, seed=1), "b": random_image(64, 96, seed=2)}
# A mixed batch: an image row, a text row, a row of two images.
PROBLEMS = [Problem("p0", "What is x?", "1", images=(png_bytes(IMAGES["a"]),)),
            Problem("p1", "Is 2+2 4?", "1"),
            Problem("p2", "Which is larger?", "2", images=(png_bytes(IMAGES["b"]), png_bytes(IMAGES["a"])))]


def encode(processor, problems):
    features = encode_chats(processor, [problem_messages(p) for p in problems])
    return prompt_ids(features), vision_kwargs(features)


@pytest.fixture(scope="module")
def batch(vl):
    prompts, pixels = encode(vl.processor, PROBLEMS)
    assert pixels["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6], [1, 4, 4]]
    return prompts, pixels


def padded(rows: list[list[int]]):
    width = max(map(len, rows))
    tokens = np.array([[0] * (width - len(r)) + r for r in rows], np.int64)
    return tokens, (np.arange(width)[None] >= width - np.array([len(r) for r in rows])[:, None]).astype(np.int32)


# ---------------------------------------------------------------------------
# Conf: the probe sees the images

def test_conf_signals_with_images_equal_teacher_forcing(vl, batch):
    """Each row's probe is the Instruct model's greedy continuation and its signals are those of
    `dj.forward` on prompt + probe with the row's images (both models; the Thinking model's own
    tower): the scoring's prefill + cached steps equal one full forward."""
    prompts, pixels = batch
    out = score_prompts(vl.pair, prompts, CONF, with_js=True, **pixels)
    lens = out["probe_len"]
    assert lens.min() >= 2
    seqs = [p + out["probe"][r, : lens[r]].tolist() for r, p in enumerate(prompts)]
    tokens, mask = padded(seqs)
    logits = [np.asarray(dj.forward(vl.pair.cfg, params, tokens, mask, **pixels))
              for params in (vl.pair.instruct, vl.pair.thinking)]
    for r, prompt in enumerate(prompts):
        start = tokens.shape[1] - len(seqs[r]) + len(prompt) - 1  # the position predicting probe token 0
        at = slice(start, start + lens[r])
        np.testing.assert_array_equal(logits[0][r, at].argmax(-1), out["probe"][r, : lens[r]])
        ent, js, maxp = (np.asarray(x) for x in position_signals(logits[0][r, at], logits[1][r, at]))
        np.testing.assert_allclose(out["entropy_pos"][r, : lens[r]], ent, atol=2e-5)
        np.testing.assert_allclose(out["js_pos"][r, : lens[r]], js, atol=2e-5)
        np.testing.assert_allclose(out["maxprob_pos"][r, : lens[r]], maxp, atol=2e-5)


def test_conf_reads_the_images_and_text_rows_are_unchanged(vl, batch):
    """Another image of the same size changes the score (the probe really sees the pixels);
    a text row scored beside image rows equals it scored alone on the text path."""
    prompts, pixels = batch
    out = score_prompts(vl.pair, prompts, CONF, with_js=True, **pixels)
    flipped = {**pixels, "pixel_values": -pixels["pixel_values"]}
    other = score_prompts(vl.pair, prompts, CONF, with_js=True, **flipped)
    for r in (0, 2):
        assert abs(other["score"][r] - out["score"][r]) > 1e-3, r
    alone = score_prompts(vl.pair, [prompts[1]], CONF, with_js=True)
    np.testing.assert_array_equal(alone["probe"][0], out["probe"][1])
    for key in ("entropy", "js", "score"):
        np.testing.assert_allclose(alone[key][0], out[key][1], atol=1e-5)
    with pytest.raises(InputError, match="unknown pixel input"):
        score_prompts(vl.pair, prompts, CONF, pixel_value=pixels["pixel_values"])


def test_calibration_with_images(vl, batch):
    """calibrate_conf scores the prompts with their images (its shards' pixels selected)."""
    from dami_jax.policies.calibrate import calibrate_conf

    prompts, pixels = batch
    cal = calibrate_conf(vl.pair, prompts, CONF, **pixels)
    want = score_prompts(vl.pair, prompts, CONF, **pixels)["score"]
    np.testing.assert_allclose(cal.scores, np.sort(want), atol=1e-6)


def _calibration_prompts(root) -> str:
    """PROBLEMS as `dami calibrate conf --prompts` takes them: image paths relative to the file."""
    rows = []
    for i, p in enumerate(PROBLEMS):
        for j, image in enumerate(p.images):
            (root / f"{i}-{j}.png").write_bytes(image)
        rows.append({"question": p.question, **({"image": [f"{i}-{j}.png" for j in range(len(p.images))]}
                                                 if p.images else {})})
    path = root / "calib.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_dami_calibrate_conf_scores_image_prompts(vl, batch, tmp_path):
    """`dami calibrate conf --prompts` with image rows on a VL pair: the prompts are the processor's,
    as eval makes them, and the scores those of score_prompts with the images."""
    from dami_jax.cli import main

    pair_yaml = tmp_path / "pair.yaml"
    pair_yaml.write_text(f"instruct: {vl.dirs[0]}\nthinking: {vl.dirs[1]}\ndtype: float32\n"
                         f"conf: {{probe_tokens: {CONF.probe_tokens}, batch_size: {CONF.batch_size}}}\n")
    prompts_file, out = _calibration_prompts(tmp_path), tmp_path / "cal.json"
    assert main(["calibrate", "conf", "--pair", str(pair_yaml), "--prompts", prompts_file, "--out", str(out)]) == 0
    prompts, pixels = batch
    conf = Calibration.load(out).conf
    assert (conf.probe_tokens, conf.batch_size) == (CONF.probe_tokens, CONF.batch_size)
    want = score_prompts(vl.pair, prompts, conf, with_js=True, **pixels)["score"]
    np.testing.assert_allclose(Calibration.load(out).scores, np.sort(want), atol=1e-6)


def test_dami_calibrate_conf_names_a_missing_image_before_loading(tmp_path, capsys):
    from dami_jax.cli import main

    prompts_file = tmp_path / "calib.jsonl"
    prompts_file.write_text('{"question": "a?", "image": "gone.png"}\n{"question": "b?"}\n')
    assert main(["calibrate", "conf", "--pair", "toy", "--prompts", str(prompts_file), "--out",
                 str(tmp_path / "cal.json")]) == 2
    assert f"calib.jsonl line 1: no image file {tmp_path / 'gone.png'}" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Pref: h(q) of the prompt with its images

@pytest.mark.parametrize("layer,pooling,probe", [(2, "mean", 0), (-1, "last", 0),
                                                  pytest.param(-1, "probe", 3, marks=pytest.mark.slow)])
def test_pref_features_with_images_equal_transformers(vl, batch, layer, pooling, probe):
    """Features equal transformers' output_hidden_states of the prompt with its images (layer 2
    is after the deepstack addition of layer 0 and before that of layer 1, as HF records it);
    with a probe, of prompt + transformers' greedy answer (the probe's positions pooled)."""
    import torch

    prompts, pixels = batch
    got = prompt_features(vl.pair.cfg, vl.pair.instruct, prompts, layer=layer, pooling=pooling, batch=4,
                          probe_tokens=probe, **pixels)
    image_id = vl.pair.cfg.vl.image_token_id
    for r, prompt in enumerate(prompts):
        rows = {k: torch.tensor(v) for k, v in select_rows(vl.pair.cfg, prompts, pixels, [r]).items()}
        ids = torch.tensor([prompt])
        with torch.no_grad():
            if probe:
                ids = vl.hf[0].generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=probe,
                                        min_new_tokens=probe, do_sample=False,
                                        mm_token_type_ids=(ids == image_id).long(), **rows)
            hs = vl.hf[0](input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == image_id).long(),
                          output_hidden_states=True, **rows).hidden_states
        h = hs[layer][0].numpy()
        want = h[-1] if pooling == "last" else h[-probe:].mean(0) if probe else h.mean(0)
        np.testing.assert_allclose(got[r], want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------
# answer(): a mixed batch equals its rows alone

class ByPrompt(Policy):
    """λ (and a reused Instruct answer) looked up by prompt, so a row gets the same alone; records
    the pixel inputs it was given."""

    def __init__(self, lams: dict, answers: dict):
        self.lams, self.answers, self.seen = lams, answers, []

    def __call__(self, prompts, pair, **pixel_inputs) -> PolicyResult:
        self.seen.append(pixel_inputs)
        keys = [tuple(p) for p in prompts]
        return PolicyResult(np.array([self.lams[k] for k in keys], np.float32), {},
                            tuple(self.answers.get(k) for k in keys))


@pytest.mark.slow
def test_answer_with_a_mixed_batch_equals_each_row_alone(vl, batch):
    """Rows at λ = 0 (its answer reused), 0.5 (text) and 1 (two images): the λ = 0.5 and 1 rows
    generate with their own images after the reused row is taken out."""
    prompts, pixels = batch
    stop = vl.pair.stop_tokens[0]
    policy = ByPrompt({tuple(p): lam for p, lam in zip(prompts, (0.0, 0.5, 1.0))}, {tuple(prompts[0]): [7, 8, stop]})
    out, _ = answer(vl.pair, policy, prompts, NEW, **pixels)
    assert out.token_lists()[0] == [7, 8, stop]
    np.testing.assert_array_equal(policy.seen[0]["pixel_values"], pixels["pixel_values"])
    for r in range(len(prompts)):
        alone, _ = answer(vl.pair, policy, [prompts[r]], NEW, **select_rows(vl.pair.cfg, prompts, pixels, [r]))
        assert alone.token_lists()[0] == out.token_lists()[r], r
    # the λ = 1 row is the Thinking model with its two images
    want = dj.generate(vl.pair.cfg, vl.pair.thinking, [prompts[2]], NEW, stop_tokens=vl.pair.stop_tokens,
                       **select_rows(vl.pair.cfg, prompts, pixels, [2]))
    assert want.token_lists()[0] == out.token_lists()[2]


def test_conf_policy_through_answer(vl, batch):
    """The conf policy in answer() scores the rows with their images (without them the image
    rows' placeholders would be read as text, and the score would differ)."""
    prompts, pixels = batch
    scores = score_prompts(vl.pair, prompts, CONF, **pixels)["score"]
    blind = score_prompts(vl.pair, prompts, CONF)["score"]
    assert np.abs(blind - scores)[[0, 2]].min() > 1e-3
    cal = Calibration(float(np.median(scores)), 0.05, CONF, pair_fingerprint(vl.pair), tuple(sorted(scores)))
    out, chosen = answer(vl.pair, ConfPolicy(cal), prompts, NEW, **pixels)
    np.testing.assert_allclose(chosen.info["score"], scores, atol=1e-6)
    assert out.tokens.shape == (3, NEW)


@pytest.mark.slow
def test_deer_probes_see_their_rows_images(vl, batch):
    """Each trial answer of an image row equals greedy generation at λ from the row's prompt (its
    images included) + its thinking before the trigger + the inducer: the probe keeps its row's
    images and M-RoPE delta. The trigger is a pair of tokens this random model writes."""
    from dami_jax.policies.deer import deer_rule, generate_deer
    from dami_jax.policies.deer_config import DeerConfig

    prompts, pixels = batch
    rule = deer_rule(vl.pair.tokenizer, DeerConfig(trigger="&g", probe_tokens=4, think_ratio=1.0))
    out, probes = generate_deer(vl.pair, prompts, 24, rule, **pixels)
    checked = 0
    for r in (0, 2):
        row_pixels = select_rows(vl.pair.cfg, prompts, pixels, [r])
        for probe in probes[r]:
            seq = prompts[r] + out.token_lists()[r][: probe.at] + list(rule.inducer)
            want = dj.generate_pair(vl.pair, [seq], 1.0, len(probe.tokens), stop_tokens=[], **row_pixels)
            assert list(probe.tokens) == want.token_lists()[0], (r, probe.at)
            checked += 1
    assert checked >= 2


# ---------------------------------------------------------------------------
# dami eval on a local JSONL benchmark with image paths

def _benchmark(root) -> str:
    (root / "img").mkdir()
    for name, image in IMAGES.items():
        (root / "img" / f"{name}.png").write_bytes(png_bytes(image))
    rows = [{"id": "a", "question": "Which?", "image": "img/a.png", "choices": ["1", "2"], "answer": "2"},
            {"id": "b", "question": "How many?", "image": ["img/b.png", "img/a.png"], "choices": [], "answer": "3"},
            {"id": "c", "question": "Two?", "image": [], "choices": [], "answer": "2"}]
    path = root / "figures.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.slow
def test_dami_eval_runs_image_problems(vl, tmp_path):
    from dami_jax.eval.benchmarks import load_benchmark
    from dami_jax.eval.run import chunk_inputs, pair_processor, run_eval

    bench = _benchmark(tmp_path)
    problems = load_benchmark(bench)
    assert [len(p.images) for p in problems] == [1, 2, 0] and problems[0].choices == ("1", "2")
    cal_path = str(tmp_path / "cal.json")
    Calibration(0.3, 0.1, CONF, pair_fingerprint(vl.pair), (0.1, 0.3, 0.5)).save(cal_path)
    pair_cfg = PairConfig(*vl.dirs, dtype="float32", max_new_tokens=NEW, batch_size=2, conf_calibration=cal_path,
                          thinking_budget=2, conf=CONF)
    # the chunk's prompts and pixels are the processor's for those problems
    prompts, pixels = chunk_inputs(vl.pair, pair_cfg, problems, pair_processor(vl.pair, pair_cfg))([1, 2])
    want_prompts, want_pixels = encode(vl.processor, problems[1:])
    assert prompts == want_prompts and pixels["image_grid_thw"].tolist() == want_pixels["image_grid_thw"].tolist()
    policies = ["static:0", "static:1", "conf", "budget"]
    out = tmp_path / "out"
    rows = run_eval(vl.pair, pair_cfg, [bench], policies, out_dir=str(out), progress=False)
    assert [r["policy"] for r in rows] == policies and all(r["n_items"] == 3 for r in rows)
    saved = [json.loads(line) for line in (out / "records_figures.jsonl").read_text().splitlines()]
    assert len(saved) == 3 * len(policies)
    # static:1's outputs are the Thinking model's answers to the processor's prompts, images included
    all_prompts, all_pixels = encode(vl.processor, problems)
    thinking = dj.generate(vl.pair.cfg, vl.pair.thinking, all_prompts, NEW, stop_tokens=vl.pair.stop_tokens,
                           **all_pixels)
    texts = [vl.pair.tokenizer.decode(ids, skip_special_tokens=True) for ids in thinking.token_lists()]
    got = {r["id"]: r["output"] for r in saved if r["policy"] == "static:1"}
    assert [got[p.id] for p in problems] == texts
    assert {r["lam"] for r in saved if r["policy"] == "static:0"} == {0.0}


def test_text_pair_refuses_image_problems(tmp_path):
    """`dami eval` with a text pair (the toy pair) on image problems: a clear error before any work."""
    from dami_jax.eval.pairs import load_pair_config, open_pair
    from dami_jax.eval.run import run_eval

    pair_cfg = load_pair_config("toy")
    with pytest.raises(InputError, match=r"problems \['a', 'b'\] have images; they need a vision-language pair"):
        run_eval(open_pair(pair_cfg), pair_cfg, [_benchmark(tmp_path)], ["static:0"], out_dir=str(tmp_path / "o"),
                 progress=False)
    assert not (tmp_path / "o" / "records_figures.jsonl").exists()
