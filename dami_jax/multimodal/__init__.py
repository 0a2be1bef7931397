"""Images into prompts: safe decoding (`images`), transformers' Qwen3-VL processor fed with them
(`processor`), and patch-count buckets that keep jit shapes fixed (`buckets`)."""

from dami_jax.multimodal.buckets import PATCH_LADDER, num_patches, patch_bucket, patch_ladder
from dami_jax.multimodal.images import ImageError, ImageLimits, decode_image, load_image, load_images
from dami_jax.multimodal.processor import (
    build_processor,
    encode_chats,
    load_processor,
    prompt_ids,
    split_media,
    vision_kwargs,
)

__all__ = [
    "PATCH_LADDER", "num_patches", "patch_bucket", "patch_ladder",
    "ImageError", "ImageLimits", "decode_image", "load_image", "load_images",
    "build_processor", "encode_chats", "load_processor", "prompt_ids", "split_media", "vision_kwargs",
]
