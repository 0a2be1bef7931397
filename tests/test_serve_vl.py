"""Serving a Qwen3-VL pair: image chat requests through the official `openai` client.

A tiny random Qwen3-VL Instruct/Thinking pair (two independent inits, the vision tower
included) is saved with the tiny processor of mm_helpers (transformers' own image processor,
patch 16, merge 2) and served by uvicorn in a thread. The server lays out each image prompt
with the pair's processor (loaded from the pair config's tokenizer directory); its greedy
tokens are compared with `generate_pair` on the processor's output for the same conversation.
"""

from __future__ import annotations

import concurrent.futures
from typing import ClassVar

import numpy as np
import pytest
from helpers import perturb_
from mm_helpers import data_url, png_bytes, random_image, save_tiny_processor, tiny_tokenizer

from dami_jax.multimodal import encode_chats, prompt_ids, vision_kwargs
from dami_jax.pair import generate_pair, load_pair
from dami_jax.policies.base import Policy, PolicyResult, register_policy

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

NEW = 6
LIMITS = dict(max_images=2, max_image_bytes=40_000, max_image_pixels=20_000)
ENGINE = dict(max_rows=4, page_size=16, max_seq_len=256, max_tokens_per_step=64, warmup=False)
QUESTION = "what is in the picture?"
# Two images of one patch bucket (4×4 and 6×4 patches of 16 pixels), so one tower program serves both.
IMAGES = [random_image(64, 64, seed=1), random_image(96, 64, seed=2)]


class SpyPolicy(Policy):
    """λ 0.5 for every prompt; records the pixel inputs each call gets (the vlpol interface:
    `policy(prompts, pair, **pixel_inputs)`)."""

    spec = "vl-spy"
    calls: ClassVar[list] = []

    def __call__(self, prompts, pair=None, **pixel_inputs) -> PolicyResult:
        SpyPolicy.calls.append((list(map(list, prompts)), pixel_inputs))
        return PolicyResult(np.full((len(prompts),), 0.5, np.float32), {})


register_policy("vl-spy", lambda pair=None: SpyPolicy())


def _build(path, seed: int) -> None:
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = tiny_tokenizer()
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=16, temporal_patch_size=2,
                  spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0])
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision, **ids))
    perturb_(model, seed)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(path)
    save_tiny_processor(path)


@pytest.fixture(scope="module")
def pair_cfg(tmp_path_factory):
    from dami_jax.eval.pairs import PairConfig

    root = tmp_path_factory.mktemp("vl-serve-pair")
    for name, seed in (("instruct", 0), ("thinking", 1)):
        _build(root / name, seed)
    return PairConfig(instruct=str(root / "instruct"), thinking=str(root / "thinking"), dtype="float32")


@pytest.fixture(scope="module")
def pair(pair_cfg):
    pair = load_pair(pair_cfg.instruct, pair_cfg.thinking, dtype="float32")
    assert pair.cfg.vl is not None
    return pair


@pytest.fixture(scope="module")
def served(pair, pair_cfg):
    from test_serve import serving

    from dami_jax.serve import ServeConfig, create_app

    policies = {"dami-half": "static:0.5", "dami-thinking": "static:1", "dami-spy": "vl-spy"}
    cfg = ServeConfig(**ENGINE, **LIMITS, policies=policies, default_model="dami-half", max_body_bytes=256 << 10)
    app = create_app(cfg, pair=pair, pair_cfg=pair_cfg)  # the processor: from the pair config's tokenizer dir
    with serving(app) as url:
        yield app.server, url


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0, timeout=300)


def _messages(image, text=QUESTION):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": text}]}]


def _ask(client, image, model="dami-half", **kw):
    return client.chat.completions.create(model=model, messages=_messages(image), max_tokens=NEW, temperature=0,
                                          extra_body={"return_token_ids": True}, **kw)


def _reference(served, pair, image, lam: float):
    """(prompt ids, pixel inputs, greedy tokens) of `generate_pair` on the processor's output for
    the conversation the server gets (transformers' format), on the served engine's sizes."""
    processor = served[0].processor
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    features = encode_chats(processor, [chat])
    prompt, pixels = prompt_ids(features)[0], vision_kwargs(features)
    out = generate_pair(pair, [prompt], lam, NEW, max_rows=ENGINE["max_rows"], **pixels)
    return prompt, pixels, out.token_lists()[0]


@pytest.fixture(scope="module")
def solo(served, pair):
    """Each image's reference at λ 0.5 and 1."""
    return {(i, lam): _reference(served, pair, image, lam) for i, image in enumerate(IMAGES) for lam in (0.5, 1.0)}


def test_an_image_request_equals_generate_pair_on_the_processor_output(client, solo):
    prompt, pixels, tokens = solo[0, 0.5]
    assert pixels["image_grid_thw"].tolist() == [[1, 4, 4]] and len(set(tokens)) > 1  # not degenerate
    r = _ask(client, IMAGES[0])
    assert r.choices[0].token_ids == tokens and r.model_extra["lambda"] == 0.5
    assert r.usage.prompt_tokens == len(prompt)  # the image's 4 placeholders included


def test_two_concurrent_image_requests_match_their_solo_answers(client, solo):
    """Different images (and grids) at λ 0.5 and 1 share the engine's batch."""
    asks = [(IMAGES[0], "dami-thinking", (0, 1.0)), (IMAGES[1], "dami-half", (1, 0.5))]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda a: _ask(client, a[0], a[1]), asks))
    assert solo[0, 1.0][2] != solo[1, 0.5][2]  # the comparison can tell the rows apart
    for (_, _, ref), r in zip(asks, answers):
        assert r.choices[0].token_ids == solo[ref][2], ref


def test_the_policy_gets_the_request_pixel_inputs(client, solo):
    """λ comes from `policy(prompts, pair, **pixel_inputs)` with the processor's arrays."""
    SpyPolicy.calls.clear()
    r = _ask(client, IMAGES[1], model="dami-spy")
    prompt, pixels, tokens = solo[1, 0.5]
    assert r.choices[0].token_ids == tokens and r.model_extra["lambda"] == 0.5
    [(prompts, got)] = SpyPolicy.calls
    assert prompts == [prompt] and sorted(got) == ["image_grid_thw", "pixel_values"]
    for key, value in pixels.items():
        np.testing.assert_array_equal(got[key], value)


def test_streamed_image_request_equals_the_whole_one(client, solo):
    stream = client.chat.completions.create(model="dami-half", messages=_messages(IMAGES[0]), max_tokens=NEW,
                                            temperature=0, stream=True, extra_body={"return_token_ids": True})
    ids = [t for chunk in stream for c in chunk.choices for t in (c.model_extra.get("token_ids") or [])]
    assert ids == solo[0, 0.5][2]


BAD = [  # (name, image bytes or PIL image, words in the message)
    ("broken bytes", png_bytes(random_image(40, 40))[:150], "not a readable image"),
    ("over the pixel limit", random_image(150, 150).convert("1"), "the limit is 20000 pixels"),
    ("refused by the processor", random_image(1, 250), "the processor failed"),  # aspect ratio over 200
]


@pytest.mark.parametrize("name, image, words", BAD, ids=[b[0] for b in BAD])
def test_bad_images_get_400_and_the_server_keeps_serving(client, served, solo, name, image, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="dami-half", messages=_messages(image), max_tokens=2)
    assert e.value.status_code == 400 and words in e.value.body["message"], e.value.body
    assert e.value.body["param"] == "messages" and e.value.body["code"] == "invalid_image"
    assert _ask(client, IMAGES[0]).choices[0].token_ids == solo[0, 0.5][2]


def test_a_text_request_on_the_vision_pair_uses_the_chat_template(client, pair):
    from dami_jax.generate.chat import chat_prompt

    r = client.chat.completions.create(model="dami-half", messages=[{"role": "user", "content": QUESTION}],
                                       max_tokens=NEW, temperature=0, extra_body={"return_token_ids": True})
    ref = generate_pair(pair, [chat_prompt(pair.tokenizer, QUESTION)], 0.5, NEW, max_rows=ENGINE["max_rows"])
    assert r.choices[0].token_ids == ref.token_lists()[0]


def test_a_vision_pair_without_its_processor_is_refused_at_startup(pair):
    from dami_jax.config import ConfigError
    from dami_jax.serve import Server, ServeConfig

    with pytest.raises(ConfigError, match="pass processor="):
        Server(ServeConfig(**ENGINE, policies={"dami-half": "static:0.5"}, default_model="dami-half"), pair=pair)


def test_pixels_travel_beside_the_tick_json():
    """What process 0 broadcasts: the tick as JSON, each spec's arrays apart; the followers' tick
    holds them again, value for value."""
    import json

    from dami_jax.serve.engine import with_pixels, without_pixels

    pixels = {"pixel_values": np.arange(12, dtype=np.float32).reshape(3, 4), "image_grid_thw": np.array([[1, 2, 2]])}
    tick = [{"cancel": [], "admit": [{"key": 3, "prompt": [1], "pixels": None}]},
            {"cancel": [[0, 0]], "admit": [{"key": 4, "prompt": [2], "pixels": pixels}]}]
    plain, arrays = without_pixels(tick)
    assert json.loads(json.dumps(plain)) == plain and sorted(arrays) == ["4.image_grid_thw", "4.pixel_values"]
    back = with_pixels(plain, arrays)
    assert back[0] == tick[0] and back[1]["cancel"] == [[0, 0]]
    for key, value in pixels.items():
        np.testing.assert_array_equal(back[1]["admit"][0]["pixels"][key], value)
    assert without_pixels(None) == (None, {})
