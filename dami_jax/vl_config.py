"""The Qwen3-VL part of a `ModelConfig`: vision tower, M-RoPE and the vision token ids.

A Qwen3-VL `config.json` nests a Qwen3 (or Qwen3-MoE) `text_config` and a
`vision_config`; `ModelConfig.from_hf` reads the former as a plain Qwen3 config
and attaches a `VLConfig` built here from the latter (`ModelConfig.vl`, None
for a text-only model). `hf_dict` writes the nested form back for export.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dami_jax.errors import ConfigError

VL_MODEL_TYPES = {"qwen3_vl": "Qwen3VLForConditionalGeneration",
                  "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}


@dataclasses.dataclass(frozen=True)
class VLConfig:
    # Vision tower (transformers' Qwen3VLVisionConfig).
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int  # the text model's width
    deepstack_visual_indexes: tuple[int, ...]
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    num_position_embeddings: int = 2304  # a square table (48 x 48)
    rope_theta: float = 10000.0
    # Text M-RoPE: frequencies per (T, H, W) axis; interleaved (Qwen3-VL) or in three chunks (Qwen2.5-VL).
    mrope_section: tuple[int, ...] = (24, 20, 20)
    mrope_interleaved: bool = True
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self):
        side = int(round(self.num_position_embeddings ** 0.5))
        if side * side != self.num_position_embeddings:
            raise ConfigError(f"vision_config.num_position_embeddings={self.num_position_embeddings} is not a "
                              "square (the learned position table is side x side)")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision_config.hidden_size={self.hidden_size} is not a multiple of "
                              f"num_heads={self.num_heads}")
        if len(self.mrope_section) != 3:
            raise ConfigError(f"mrope_section={list(self.mrope_section)}: expected three sizes (T, H, W)")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"vision_config.deepstack_visual_indexes {bad} outside the {self.depth} blocks")

    @property
    def patch_dim(self) -> int:
        """Values per patch row of pixel_values: (C, T, P, P) flattened."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        """Patches per merged (text) token."""
        return self.spatial_merge_size ** 2

    @classmethod
    def from_hf(cls, raw: dict, text: dict, where: str) -> "VLConfig":
        """From the top level of a Qwen3-VL config.json and its text_config."""
        vision = raw.get("vision_config")
        if not isinstance(vision, dict):
            raise ConfigError(f"{where}: missing the vision_config mapping of a {raw.get('model_type')} config")
        if vision.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ConfigError(f"{where}: vision_config.hidden_act={vision['hidden_act']!r} unsupported; expected "
                              "'gelu_pytorch_tanh'")
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        section = rope.get("mrope_section")
        if section is None:
            raise ConfigError(f"{where}: text_config.rope_parameters has no mrope_section")
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}

        def get(d: dict, key: str, ours: str | None = None):
            value = d.get(key)
            if value is None:
                if defaults[ours or key] is dataclasses.MISSING:
                    raise ConfigError(f"{where}: missing required field {key!r}")
                return defaults[ours or key]
            return value

        patch = get(vision, "patch_size")
        temporal = get(vision, "temporal_patch_size")
        if isinstance(patch, (list, tuple)) or isinstance(temporal, (list, tuple)):
            raise ConfigError(f"{where}: vision_config patch sizes must be integers (square patches)")
        return cls(
            depth=int(get(vision, "depth")), hidden_size=int(get(vision, "hidden_size")),
            intermediate_size=int(get(vision, "intermediate_size")), num_heads=int(get(vision, "num_heads")),
            out_hidden_size=int(get(vision, "out_hidden_size")),
            deepstack_visual_indexes=tuple(int(i) for i in get(vision, "deepstack_visual_indexes")),
            patch_size=int(patch), temporal_patch_size=int(temporal),
            spatial_merge_size=int(get(vision, "spatial_merge_size")), in_channels=int(get(vision, "in_channels")),
            num_position_embeddings=int(get(vision, "num_position_embeddings")),
            rope_theta=float((vision.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            mrope_section=tuple(int(s) for s in section),
            mrope_interleaved=bool(rope.get("mrope_interleaved", True)),
            **{k: int(get(raw, k)) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                             "vision_end_token_id")},
        )

    def hf_dict(self, flat: dict[str, Any]) -> dict[str, Any]:
        """The nested Qwen3-VL config.json from the flat Qwen3 one of its text model."""
        moe = "num_experts" in flat
        text = {k: v for k, v in flat.items() if k not in ("architectures", "tie_word_embeddings", "torch_dtype")}
        text["model_type"] = "qwen3_vl_moe_text" if moe else "qwen3_vl_text"
        text["rope_parameters"] = {**flat["rope_parameters"], "mrope_section": list(self.mrope_section),
                                   "mrope_interleaved": self.mrope_interleaved}
        model_type = "qwen3_vl_moe" if moe else "qwen3_vl"
        vision = {
            "model_type": model_type + "_vision",
            "depth": self.depth, "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_heads": self.num_heads, "out_hidden_size": self.out_hidden_size,
            "deepstack_visual_indexes": list(self.deepstack_visual_indexes), "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size, "spatial_merge_size": self.spatial_merge_size,
            "in_channels": self.in_channels, "num_position_embeddings": self.num_position_embeddings,
            "hidden_act": "gelu_pytorch_tanh",
            "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta},
        }
        return {
            "architectures": [VL_MODEL_TYPES[model_type]], "model_type": model_type,
            "text_config": text, "vision_config": vision,
            "tie_word_embeddings": flat["tie_word_embeddings"], "torch_dtype": flat["torch_dtype"],
            "dtype": flat["dtype"],
            **{k: getattr(self, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                             "vision_end_token_id")},
            **{k: flat[k] for k in ("bos_token_id", "pad_token_id", "eos_token_id")},
        }


def text_config(raw: dict, where: str) -> dict:
    """The text_config of a Qwen3-VL config.json as a flat Qwen3 / Qwen3-MoE config.json."""
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{where}: missing the text_config mapping of a {raw.get('model_type')} config")
    moe = raw["model_type"] == "qwen3_vl_moe"
    # The VL-MoE router always renormalizes its top-k weights (it has no norm_topk_prob field),
    # and the top level's tie_word_embeddings is the one transformers applies (the text config's
    # only when the top level has none).
    extra = {"norm_topk_prob": True} if moe else {}
    tied = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return {**text, **extra, "model_type": "qwen3_moe" if moe else "qwen3", "tie_word_embeddings": bool(tied)}
