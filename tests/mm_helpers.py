"""A tiny Qwen3-VL processor built offline: transformers' own image and video processors
(patch 16, merge 2, temporal patch 2, as the real ones) with a small word-level tokenizer that
holds Qwen3-VL's special tokens, and a chat template that lays out vision parts as Qwen3-VL's
does (`<|vision_start|><|image_pad|><|vision_end|>` per image, images where they appear)."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib

import numpy as np

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]
WORDS = ["<think>", "</think>", "user", "assistant", "system"]
CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n?.,:;+-*/=()[]{}\\$^_'\"<>|#%!&")

CHAT_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['content'] is string %}{{- m['content'] }}{%- else %}{%- for c in m['content'] %}"
    "{%- if c['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif c['type'] == 'video' %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif c['type'] == 'text' %}{{- c['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")

MIN_PIXELS = 32 * 32 * 4  # smallest image: 4×4 patches (one 2×2 merge block each way)
MAX_PIXELS = 32 * 32 * 64  # largest: 64 merge blocks = 256 patches


def tiny_tokenizer():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]"] + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(w, special=True, normalized=False) for w in SPECIAL])
    tok.add_tokens([AddedToken(w, normalized=False) for w in WORDS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="[UNK]", chat_template=CHAT_TEMPLATE)


def tiny_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from dami_jax.multimodal import build_processor

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    images = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, size=size,
                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
    videos = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, size=size)
    return build_processor(tiny_tokenizer(), images, videos, CHAT_TEMPLATE)


def save_tiny_processor(path: str | os.PathLike) -> str:
    tiny_processor().save_pretrained(path)
    return os.fspath(path)


def random_image(height: int, width: int, seed: int = 0):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_bytes(image, format: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=format)
    return buf.getvalue()


def data_url(image_or_bytes, mime: str = "image/png") -> str:
    data = image_or_bytes if isinstance(image_or_bytes, bytes) else png_bytes(image_or_bytes)
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height over almost no data (a decompression bomb's start)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
