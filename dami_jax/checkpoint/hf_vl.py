"""The Qwen3-VL rows of the HF mapping table (checkpoint/hf.py).

The language model is Qwen3 / Qwen3-MoE with `model.` renamed to
`model.language_model.`, except the MoE experts: one tensor per layer for all
experts, in either of two layouts,

    hub files              gate_up_proj (E, D, 2F), down_proj (E, F, D)
    transformers 5 saves   gate_up_proj (E, 2F, D), down_proj (E, D, F)

(gate before up on the 2F axis). Both load; when the two shapes coincide
(D = 2F, or D = F for down) the tensor is read as the second layout, as
transformers does. Export writes the hub layout, which transformers transposes
on load. The vision tower's tensors are copied as they are (models/vision.py
keeps torch's shapes).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dami_jax.checkpoint.safetensors_io import CheckpointError
from dami_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ExpertLeaf:
    """One of our stacked expert kernels, from the one tensor of a layer's experts: `part` is
    gate or up (the halves of gate_up_proj; ours (E, D, F)) or down (down_proj; ours (E, F, D)).
    Loads and exports as checkpoint/hf.py's `Leaf` does (`read`, `tensors`)."""
    path: tuple
    hf_names: tuple[str, ...]  # the one fused tensor
    part: str
    stacked: bool = False  # one HF tensor, not one per expert

    def _layouts(self, want):
        e, a, b = want  # ours: (E, D, F) for gate/up, (E, F, D) for down
        if self.part == "down":
            return (e, a, b), (e, b, a)
        return (e, a, 2 * b), (e, 2 * b, a)

    def hf_shape(self, ours):
        raise CheckpointError(f"{self.hf_names[0]}: Qwen3-VL-MoE experts come in two layouts, so they are not "
                              "merged tensor by tensor; merge with load_pair + interpolate + save_hf")

    def read(self, index, want, dtype) -> np.ndarray:
        name = self.hf_names[0]
        f = index.file_of(name)
        raw = f.get(name)
        hub, fused = self._layouts(want)
        if raw.shape == fused:  # checked first, as transformers does when both shapes agree
            raw = raw.transpose(0, 2, 1)
        elif raw.shape != hub:
            raise CheckpointError(f"{f.path}: tensor {name!r} has shape {raw.shape}, expected {hub} (hub layout) "
                                  f"or {fused} (transformers' fused layout) from config.json")
        f_size = want[2]
        part = {"gate": raw[..., :f_size], "up": raw[..., f_size:], "down": raw}[self.part]
        value = np.array(part, dtype=dtype)  # copies off the mmap
        f.release(name)
        return value

    def tensors(self, params, np_dtype):
        if self.part == "gate":  # written with up, as the one gate_up_proj tensor
            return
        mlp = params
        for key in self.path[:-1]:
            mlp = mlp[key]
        value = np.asarray(mlp[self.path[-1]]).astype(np_dtype, copy=False)
        if self.part == "up":
            value = np.concatenate([np.asarray(mlp["gate_proj"]).astype(np_dtype, copy=False), value], axis=-1)
        yield self.hf_names[0], value


def vision_rows(cfg: ModelConfig) -> list[tuple[str, tuple]]:
    """(HF name, our path) of every vision tower tensor; copied as they are."""
    def dense(hf: str, ours: tuple) -> list[tuple[str, tuple]]:
        return [(f"{hf}.weight", (*ours, "kernel")), (f"{hf}.bias", (*ours, "bias"))]

    def norm(hf: str, ours: tuple) -> list[tuple[str, tuple]]:
        return [(f"{hf}.weight", (*ours, "scale")), (f"{hf}.bias", (*ours, "bias"))]

    def merger(hf: str, ours: tuple) -> list[tuple[str, tuple]]:
        return (norm(f"{hf}.norm", (*ours, "norm")) + dense(f"{hf}.linear_fc1", (*ours, "fc1"))
                + dense(f"{hf}.linear_fc2", (*ours, "fc2")))

    rows = dense("patch_embed.proj", ("patch_embed",)) + [("pos_embed.weight", ("pos_embed", "embedding"))]
    for b in range(cfg.vl.depth):
        blk = f"blocks.{b}"
        rows += (norm(f"{blk}.norm1", ("blocks", b, "norm1")) + norm(f"{blk}.norm2", ("blocks", b, "norm2"))
                 + dense(f"{blk}.attn.qkv", ("blocks", b, "attn", "qkv"))
                 + dense(f"{blk}.attn.proj", ("blocks", b, "attn", "proj"))
                 + dense(f"{blk}.mlp.linear_fc1", ("blocks", b, "fc1"))
                 + dense(f"{blk}.mlp.linear_fc2", ("blocks", b, "fc2")))
    rows += merger("merger", ("merger",))
    for k in range(len(cfg.vl.deepstack_visual_indexes)):
        rows += merger(f"deepstack_merger_list.{k}", ("deepstack", k))
    return [(f"model.visual.{hf}", ("visual", *ours)) for hf, ours in rows]


def text_name(name: str) -> str:
    """A Qwen3 tensor name as the VL checkpoint names it."""
    return name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name


def expert_leaf(path: tuple, qwen3_moe_name: str) -> ExpertLeaf:
    """The leaf at `path` (a stacked expert kernel) from its layer's fused tensor; qwen3_moe_name
    is the Qwen3-MoE name of one of its experts' tensors."""
    layer_mlp = text_name(qwen3_moe_name).rsplit(".experts.", 1)[0]
    part = path[-1].removesuffix("_proj")
    return ExpertLeaf(path, (f"{layer_mlp}.experts.{'down_proj' if part == 'down' else 'gate_up_proj'}",), part)
