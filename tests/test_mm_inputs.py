"""Images into Qwen3-VL prompts: decoding with limits, transformers' processor fed with the decoded
images (outputs equal to calling it directly), and patch buckets (tests/mm_helpers.py builds the
tiny processor offline)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from mm_helpers import data_url, png_bytes, png_header_only, random_image, save_tiny_processor

from dami_jax.errors import InputError
from dami_jax.multimodal import (
    ImageError,
    ImageLimits,
    encode_chats,
    load_image,
    load_images,
    load_processor,
    num_patches,
    patch_bucket,
    patch_ladder,
    prompt_ids,
    vision_kwargs,
)
from dami_jax.multimodal.buckets import PATCH_LADDER


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    """Saved and reloaded through load_processor: the path a checkpoint directory takes."""
    return load_processor(save_tiny_processor(tmp_path_factory.mktemp("processor")))


def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


def _image(source):
    return {"type": "image", "image": source}


def _text(text):
    return {"type": "text", "text": text}


# --- the processor's own output --------------------------------------------------------------

def test_encode_chats_equals_the_processor_on_the_decoded_images(processor, tmp_path):
    a, b, c = random_image(70, 100, 1), random_image(130, 40, 2), random_image(64, 64, 3)
    path = tmp_path / "c.png"
    path.write_bytes(png_bytes(c))
    chats = [_user(_image(a), _text("what is x?"), _image(data_url(b))),
             _user(_text("no image here")),
             _user(_image(str(path)), _text("area?"))]
    features = encode_chats(processor, chats)

    reduced = [_user({"type": "image"}, _text("what is x?"), {"type": "image"}), _user(_text("no image here")),
               _user({"type": "image"}, _text("area?"))]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in reduced]
    direct = processor(text=texts, images=[a, b, c], return_tensors="np", padding=True, padding_side="left")
    assert sorted(features) == sorted(direct)
    for key in direct:
        np.testing.assert_array_equal(features[key], np.asarray(direct[key]), err_msg=key)
    grid = features["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 6], [1, 8, 2], [1, 4, 4]]  # smart resize to multiples of 32 px
    assert features["pixel_values"].shape == (int(np.prod(grid, 1).sum()), 3 * 2 * 16 * 16)


def test_image_tokens_and_their_type_ids(processor):
    chat = _user(_image(random_image(70, 100)), _text("hi"), _image(random_image(64, 64)))
    features = encode_chats(processor, [chat])
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids, types = features["input_ids"][0], features["mm_token_type_ids"][0]
    assert (ids == image_pad).sum() == (24 + 16) // 4  # t·h·w / merge² per image
    np.testing.assert_array_equal(types == 1, ids == image_pad)
    assert set(types.tolist()) == {0, 1}


def test_prompt_ids_are_the_rows_without_padding(processor):
    chats = [_user(_text("a much longer question than the other one")), _user(_image(random_image(64, 64)), _text("q"))]
    features = encode_chats(processor, chats)
    mask = features["attention_mask"]
    assert mask.all(axis=1).tolist() == [True, False] and mask[1, 0] == 0  # row 1 left-padded
    rows = prompt_ids(features)
    for chat, row in zip(chats, rows):
        alone = encode_chats(processor, [chat])
        assert row == alone["input_ids"][0].tolist()


def test_a_string_content_and_a_system_message_pass_unchanged(processor):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    features = encode_chats(processor, [chat])
    assert "pixel_values" not in features
    text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert processor.tokenizer.decode(features["input_ids"][0]) == text


@pytest.mark.parametrize("bad, words", [
    ([{"role": "user", "content": [{"type": "audio"}]}], "part type"),
    ([{"role": "user", "content": [{"type": "image"}]}], "'image' field"),
    ([{"content": "no role"}], "message"),
    ([], "non-empty list"),
])
def test_malformed_messages_are_refused(processor, bad, words):
    with pytest.raises(InputError, match=words):
        encode_chats(processor, [bad])


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision present: videos work")
def test_video_without_torchvision_is_a_clear_error(processor):
    frames = np.zeros((4, 64, 64, 3), np.uint8)
    with pytest.raises(InputError, match="video input needs torchvision"):
        encode_chats(processor, [_user({"type": "video", "video": frames}, _text("what happens?"))])
    with pytest.raises(InputError, match="a video part needs a 'video' field"):
        encode_chats(processor, [_user({"type": "video"})])


def test_image_count_is_limited_per_conversation(processor):
    chat = _user(*[_image(random_image(32, 32, i)) for i in range(3)])
    with pytest.raises(ImageError, match="3 images given; the limit is 2"):
        encode_chats(processor, [chat], ImageLimits(max_images=2))


# --- buckets ------------------------------------------------------------------------------

def test_patch_ladder():
    assert PATCH_LADDER[0] == 64 and PATCH_LADDER[-1] == 1 << 20
    assert all(s % 4 == 0 for s in PATCH_LADDER)
    assert all(1 < b / a <= 1.5 for a, b in zip(PATCH_LADDER, PATCH_LADDER[1:]))
    assert patch_ladder(16, 64) == (16, 24, 32, 48, 64)
    assert [patch_bucket(n, (16, 24, 32)) for n in (4, 16, 20, 24, 28)] == [16, 16, 24, 24, 32]
    with pytest.raises(InputError, match="exceed the largest bucket"):
        patch_bucket(36, (16, 24, 32))
    with pytest.raises(InputError, match="multiple of 4"):
        patch_bucket(18, (16, 24, 32))
    with pytest.raises(InputError, match="increasing multiples"):
        patch_bucket(8, (16, 10))
    with pytest.raises(InputError, match="smallest a multiple of 4"):
        patch_ladder(6, 64)


def test_images_of_different_sizes_share_a_bucket(processor):
    buckets = set()
    for h, w in ((64, 64), (70, 100), (96, 128)):  # 16, 24 and 48 patches
        features = encode_chats(processor, [_user(_image(random_image(h, w)), _text("x"))])
        pixels = vision_kwargs(features)
        assert sorted(pixels) == ["image_grid_thw", "pixel_values"]
        np.testing.assert_array_equal(pixels["pixel_values"], features["pixel_values"])  # unpadded, as HF's
        n = num_patches(pixels["image_grid_thw"])
        assert n == len(pixels["pixel_values"]) and n in (16, 24, 48)
        buckets.add(patch_bucket(n))
    assert buckets == {64}
    assert vision_kwargs(encode_chats(processor, [_user(_text("text only"))])) == {}


# --- decoding with limits -----------------------------------------------------------------

def test_every_source_kind_decodes_to_the_same_rgb_image(tmp_path):
    image = random_image(20, 30)
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(image))
    for source in (image, png_bytes(image), data_url(image), str(path), path):
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (30, 20)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(image))
    gray = load_image(png_bytes(random_image(8, 8).convert("L")))
    assert gray.mode == "RGB"


def test_remote_urls_need_a_fetcher():
    with pytest.raises(ImageError, match="remote image URLs are not fetched"):
        load_image("https://example.com/a.png")
    calls = []

    def fetch(url, max_bytes):
        calls.append((url, max_bytes))
        return png_bytes(random_image(8, 8))

    assert load_image("https://example.com/a.png", ImageLimits(max_bytes=5000), fetch=fetch).size == (8, 8)
    assert calls == [("https://example.com/a.png", 5000)]


LIMITS = ImageLimits(max_bytes=4000, max_pixels=10_000, max_images=2)
BAD_IMAGES = [  # (name, source, words in the message)
    ("broken bytes", b"this is not an image at all", "not a readable image"),
    ("truncated png", png_bytes(random_image(40, 40))[:300], "not a readable image"),
    ("too many bytes", png_bytes(random_image(60, 60)), "the limit is 4000 bytes"),
    ("too many pixels", png_bytes(random_image(101, 100).convert("1")), "10100 pixels; the limit is 10000 pixels"),
    ("bomb header", png_header_only(5000, 5000), "25000000 pixels; the limit is 10000 pixels"),
    ("bad data url", "data:image/png;base64,!!!notbase64", "not valid base64"),
    ("not an image data url", "data:text/plain;base64,aGk=", "data:image/<type>;base64"),
    ("data url too long", "data:image/png;base64," + "A" * 8000, "the limit is 4000 bytes"),
    ("missing file", "/nonexistent/x.png", "file not found"),
    ("other scheme", "ftp://host/x.png", "scheme 'ftp'"),
    ("refused format", png_bytes(random_image(8, 8), "PPM"), "format PPM is not accepted"),
    ("not a source", 3.5, "expected a PIL image"),
    ("pil over the pixel limit", random_image(101, 100), "the limit is 10000 pixels"),
]


@pytest.mark.parametrize("name, source, words", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_bad_images_raise_an_input_error_naming_the_limit(name, source, words):
    with pytest.raises(ImageError, match=words.replace("(", r"\(").replace("[", r"\[")) as e:
        load_image(source, LIMITS)
    assert isinstance(e.value, InputError)


def test_pil_own_bomb_guard_is_reported_as_a_bomb():
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(png_header_only(100_000, 100_000), ImageLimits(max_pixels=10**11))


def test_image_count_limit():
    with pytest.raises(ImageError, match="3 images given; the limit is 2"):
        load_images([random_image(4, 4)] * 3, LIMITS)
    with pytest.raises(InputError, match="max_images"):
        ImageLimits(max_images=0)
