"""Chat messages with images -> the arrays transformers' Qwen3-VL processor makes.

The processor is transformers' own (`AutoProcessor`: smart resize, patchify,
`image_grid_thw`, the chat template's vision tokens, `mm_token_type_ids`);
this module only feeds it safely decoded images:

    processor = load_processor("Qwen/Qwen3-VL-4B-Thinking")
    features = encode_chats(processor, [[{"role": "user", "content": [
        {"type": "image", "image": "data:image/png;base64,..."},
        {"type": "text", "text": "What is the area of the shaded region?"}]}]])
    features["input_ids"], features["pixel_values"], features["image_grid_thw"], ...

Messages follow transformers' chat format: `content` is a string or a list of
parts `{"type": "text", "text": ...}`, `{"type": "image", "image": source}`
(any source `images.load_image` takes) or `{"type": "video", "video": frames}`.
`vision_kwargs` picks the model's pixel keywords out of the features; the
model pads the patch rows to a bucket (see `buckets`).

Without torchvision, transformers 5 cannot build Qwen3-VL's video processor, and
with it the whole processor; `load_processor` then builds it from its parts with
the video processor unchecked, so images work with PIL alone and videos raise.
"""

from __future__ import annotations

import os

import numpy as np

from dami_jax.errors import InputError
from dami_jax.multimodal.images import Fetch, ImageError, ImageLimits, load_images

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def load_processor(path_or_id: str | os.PathLike):
    """transformers' processor of a Qwen3-VL checkpoint (a local directory or a hub id)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    path = os.fspath(path_or_id)
    try:
        return AutoProcessor.from_pretrained(path)
    except ImportError as e:
        if "orchvision" not in str(e):
            raise
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    processor_dict, _ = Qwen3VLProcessor.get_processor_dict(path)
    return build_processor(AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path),
                           Qwen3VLVideoProcessor.from_pretrained(path), processor_dict.get("chat_template"))


def build_processor(tokenizer, image_processor, video_processor, chat_template: str | None = None):
    """A Qwen3VLProcessor from its parts; the video processor's class is not checked (see the module
    docstring: without torchvision transformers cannot name its base class)."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    class Processor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor":
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    Processor.__name__ = Qwen3VLProcessor.__name__  # what save_pretrained records, so AutoProcessor reloads it
    return Processor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                     chat_template=chat_template)


def split_media(messages: list[dict], limits: ImageLimits, fetch: Fetch | None = None, where: str = "messages"):
    """(messages with each image part reduced to `{"type": "image"}` for the template, the decoded
    images in order, the videos in order). Images are checked against `limits`."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: expected a non-empty list of chat messages, got {type(messages).__name__}")
    sources, videos, out = [], [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise InputError(f"{where}[{i}]: expected a message {{role, content}}, got {message!r:.80}")
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                if "image" not in part:
                    raise InputError(f"{where}[{i}].content[{j}]: an image part needs an 'image' field")
                sources.append(part["image"])
                parts.append({"type": "image"})
            elif kind == "video":
                if part.get("video") is None:
                    raise InputError(f"{where}[{i}].content[{j}]: a video part needs a 'video' field (its frames)")
                videos.append(part["video"])
                parts.append({"type": "video"})
            elif kind == "text":
                parts.append(part)
            else:
                raise InputError(f"{where}[{i}].content[{j}]: part type must be 'text', 'image' or 'video', "
                                 f"got {kind!r}")
        out.append({**message, "content": parts})
    return out, load_images(sources, limits, fetch=fetch), videos


def encode_chats(processor, conversations: list[list[dict]], limits: ImageLimits = ImageLimits(), *,
                 fetch: Fetch | None = None, **template_kwargs) -> dict[str, np.ndarray]:
    """The processor's output (NumPy) for a batch of conversations, each ending with the assistant's
    generation prompt: `input_ids` and `attention_mask` (B, T) left-padded, `mm_token_type_ids`,
    and `pixel_values` / `image_grid_thw` (all images of the batch, in order) when there are images."""
    texts, images, videos = [], [], []
    for b, messages in enumerate(conversations):
        messages, imgs, vids = split_media(messages, limits, fetch, where=f"conversation {b}")
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                   **template_kwargs))
        images += imgs
        videos += vids
    try:
        out = processor(text=texts, images=images or None, videos=videos or None, return_tensors="np",
                        padding=True, padding_side="left")
    except NameError as e:  # transformers' video code without torchvision
        raise InputError(f"video input needs torchvision installed ({e})") from None
    return {k: np.asarray(v) for k, v in out.items() if k != "video_metadata"}


def prompt_ids(features: dict) -> list[list[int]]:
    """The rows of `input_ids` without their left padding: the prompts as `dj.generate` takes them."""
    ids, mask = np.asarray(features["input_ids"]), np.asarray(features["attention_mask"])
    return [row[m.astype(bool)].tolist() for row, m in zip(ids, mask)]


def vision_kwargs(features: dict) -> dict[str, np.ndarray]:
    """The pixel keywords of `dj.generate` / `dj.forward` in `features` (`pixel_values`,
    `image_grid_thw`, and the video pair), as the processor made them."""
    return {k: features[k] for k in VISION_KEYS if k in features}


__all__ = ["ImageError", "build_processor", "encode_chats", "load_processor", "prompt_ids", "split_media",
           "vision_kwargs"]
