"""Configuration as data: the model architecture config and YAML run configs.

`ModelConfig` is the frozen description of a Qwen3 / Qwen3-MoE, Qwen2 (Qwen2.5,
R1-Distill-Qwen) or Llama 3 architecture, built from a Hugging Face `config.json`.
Fields that would change the model's semantics in a way we do not implement are
refused, never silently ignored. It holds the architecture only (it is a static jit argument): the generation
ids (EOS/BOS/PAD), which differ between an Instruct and a Thinking checkpoint
of one architecture, are a separate `GenerationIds`.

`load_yaml` / `from_dict` turn YAML files plus dotted `key=value` overrides into
frozen dataclasses; unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from typing import Any

import yaml

from dami_jax.errors import ConfigError
from dami_jax.vl_config import VL_MODEL_TYPES, VLConfig, text_config

SUPPORTED_MODEL_TYPES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                         "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", **VL_MODEL_TYPES}
# What sets the families apart, all of it options of the one decoder (models/qwen3.py): qwen3 has
# q/k RMSNorms (and MoE variants), qwen2 biases on q/k/v, llama optional biases (attention_bias: q, k,
# v and o; mlp_bias) and llama3 RoPE scaling.
FAMILIES = ("qwen3", "qwen2", "llama")
_FAMILY_OPTIONS = ("family", "attention_bias", "mlp_bias", "rope_scaling")
LLAMA3_ROPE_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    # Mixture of experts (num_experts == 0 means a dense model).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # Family options (FAMILIES); rope_scaling: llama3 RoPE's LLAMA3_ROPE_FIELDS values, () for plain RoPE.
    family: str = "qwen3"
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: tuple[float, ...] = ()
    # Qwen3-VL: the vision tower, M-RoPE and vision token ids (None: a text-only model).
    vl: VLConfig | None = None
    # Execution, not architecture (static under jit, not exported to HF):
    # layout "cpu" (XLA:CPU-tuned cache and dots), "readable" (einsums, (B, S, K, H)
    # cache) or "auto" (cpu on the CPU backend, else readable; models/kv_cache.resolve_layout);
    # scan_layers: the layer loop as one lax.scan over stacked params (qwen3.stack_layers);
    # paged_attention: the engine's attention in decode bursts, "xla" or a decode-only Pallas
    # kernel, "pallas_tpu" / "pallas_gpu" (engine/paged_attention.py; steps with prefill
    # chunks always take the XLA path, the kernels being decode-only).
    layout: str = "auto"
    scan_layers: bool = False
    paged_attention: str = "xla"

    def __post_init__(self):
        if self.layout not in ("auto", "cpu", "readable"):
            raise ConfigError(f"layout={self.layout!r}: expected 'auto', 'cpu' or 'readable'")
        if self.paged_attention not in ("xla", "pallas_tpu", "pallas_gpu"):
            raise ConfigError(f"paged_attention={self.paged_attention!r}: expected 'xla', 'pallas_tpu' or "
                              "'pallas_gpu'")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} must be a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                    f"[1, num_experts={self.num_experts}]"
                )
            if self.moe_intermediate_size <= 0:
                raise ConfigError("moe_intermediate_size must be > 0 for a MoE model")
        if self.decoder_sparse_step < 1:
            raise ConfigError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        if self.family not in FAMILIES:
            raise ConfigError(f"family={self.family!r}: expected one of {list(FAMILIES)}")
        if self.num_experts and self.family != "qwen3":
            raise ConfigError(f"family={self.family!r} has no MoE variant here (num_experts={self.num_experts})")
        if (self.attention_bias or self.mlp_bias) and self.family != "llama":
            raise ConfigError(f"attention_bias / mlp_bias are Llama options, not {self.family!r} ones")
        if self.rope_scaling:
            if len(self.rope_scaling) != len(LLAMA3_ROPE_FIELDS):
                raise ConfigError(f"rope_scaling={self.rope_scaling}: expected the llama3 values "
                                  f"{LLAMA3_ROPE_FIELDS}")
            factor, low, high, _ = self.rope_scaling
            if not (factor > 0 and 0 < low < high):
                raise ConfigError(f"llama3 rope scaling needs factor > 0 and 0 < low_freq_factor < "
                                  f"high_freq_factor, got {dict(zip(LLAMA3_ROPE_FIELDS, self.rope_scaling))}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def model_type(self) -> str:
        if self.vl is not None:
            return "qwen3_vl_moe" if self.is_moe else "qwen3_vl"
        return "qwen3_moe" if self.is_moe else self.family

    @property
    def qk_norm(self) -> bool:
        """RMSNorm on each query and key head (Qwen3)."""
        return self.family == "qwen3"

    @property
    def qkv_bias(self) -> bool:
        """Biases on the q, k and v projections (always in Qwen2, attention_bias in Llama)."""
        return self.family == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    def is_moe_layer(self, layer: int) -> bool:
        """Same rule as transformers' Qwen3MoeDecoderLayer."""
        return (
            self.is_moe
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def architecture_fields(self) -> dict[str, Any]:
        """Fields that fix shapes and semantics (not the context length or execution fields). The
        family options and `vl` appear only when they differ from a text Qwen3's, so a Qwen3 config's
        fields, and the pair fingerprints of calibrations and reward models made before they existed,
        are unchanged."""
        skip = {"max_position_embeddings", "layout", "scan_layers", "paged_attention"}
        qwen3 = {f.name: f.default for f in dataclasses.fields(self) if f.name in (*_FAMILY_OPTIONS, "vl")}
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in skip and not (k in qwen3 and v == qwen3[k])}

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict) -> "ModelConfig":
        """Build from a HF `config.json` (a file, a model directory, a hub id or a dict)."""
        if isinstance(path_or_dict, dict):
            return cls._from_hf_dict(path_or_dict, where="config dict")
        path = _resolve_config_json(path_or_dict)
        return cls._from_hf_dict(_read_json(path), where=str(path))

    @classmethod
    def _from_hf_dict(cls, raw: dict, where: str) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type in VL_MODEL_TYPES:  # a Qwen3 text model plus the vision part
            text = text_config(raw, where)
            plain = cls._from_hf_dict(text, where=f"{where} (text_config)")
            return dataclasses.replace(plain, vl=VLConfig.from_hf(raw, text, where))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{where}: model_type={model_type!r} is not supported; expected one of "
                f"{sorted(SUPPORTED_MODEL_TYPES)}"
            )

        def need(key: str):
            if key not in raw or raw[key] is None:
                raise ConfigError(f"{where}: missing required field {key!r}")
            return raw[key]

        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: hidden_act={raw['hidden_act']!r} unsupported; expected 'silu'")
        family = "qwen3" if model_type == "qwen3_moe" else model_type
        if family != "llama":  # Qwen2's q/k/v biases are implied by its model_type, not this field
            for key in ("attention_bias", "mlp_bias"):
                if raw.get(key, False):
                    raise ConfigError(f"{where}: {key}=true is not supported for model_type={model_type!r} "
                                      "(only Llama checkpoints carry it)")
        if raw.get("use_sliding_window", False):
            raise ConfigError(f"{where}: use_sliding_window=true is not supported: sliding-window attention is "
                              "not implemented (Qwen2.5 and the R1-Distill-Qwen checkpoints ship with it off)")
        layer_types = raw.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise ConfigError(f"{where}: layer_types {sorted(set(layer_types))} unsupported; only 'full_attention'")

        rope_theta, rope_scaling = _rope(raw, where)
        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        num_experts = int(raw.get("num_experts", raw.get("num_local_experts", 0)) or 0)
        if model_type == "qwen3_moe" and num_experts <= 0:
            raise ConfigError(f"{where}: model_type 'qwen3_moe' needs num_experts > 0")
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=int(raw.get("max_position_embeddings", 40960)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            num_experts=num_experts if model_type == "qwen3_moe" else 0,
            num_experts_per_tok=int(raw.get("num_experts_per_tok", 0) or 0) if model_type == "qwen3_moe" else 0,
            moe_intermediate_size=int(raw.get("moe_intermediate_size", 0) or 0) if model_type == "qwen3_moe" else 0,
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            decoder_sparse_step=int(raw.get("decoder_sparse_step", 1) or 1),
            mlp_only_layers=tuple(int(i) for i in (raw.get("mlp_only_layers") or ())),
            family=family,
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            rope_scaling=rope_scaling,
        )

    def to_hf_dict(self, dtype: str = "float32", generation_ids: GenerationIds | None = None) -> dict[str, Any]:
        """The config.json transformers needs to load this architecture, with `generation_ids`
        (default none) as its eos/bos/pad fields."""
        out: dict[str, Any] = {
            "architectures": [SUPPORTED_MODEL_TYPES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": self.rope_parameters(),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "use_sliding_window": False,
            "torch_dtype": dtype,
            "dtype": dtype,
            **(generation_ids or GenerationIds()).hf_fields(),
        }
        if self.is_moe:
            out.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
            )
        return out if self.vl is None else self.vl.hf_dict(out)

    def rope_parameters(self) -> dict[str, Any]:
        """transformers' `rope_parameters` of this config."""
        if not self.rope_scaling:
            return {"rope_type": "default", "rope_theta": self.rope_theta}
        scaling = dict(zip(LLAMA3_ROPE_FIELDS, self.rope_scaling))
        scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
        return {"rope_type": "llama3", "rope_theta": self.rope_theta, **scaling}


@dataclasses.dataclass(frozen=True)
class GenerationIds:
    """The special token ids generation uses: `eos` ends a row, `bos`/`pad` are kept for export."""

    eos: tuple[int, ...] = ()
    bos: int | None = None
    pad: int | None = None

    @classmethod
    def from_hf(cls, model_dir: str | os.PathLike) -> "GenerationIds":
        """The ids of a HF model directory, read from `generation_config.json` as transformers'
        `generate` does (Qwen3-2507: eos [151645, 151643], where config.json says 151645 only);
        `config.json` gives each id the former leaves unset or null, or all when it is absent.
        """
        model_dir = os.fspath(model_dir)
        if not os.path.isdir(model_dir):
            raise ConfigError(f"{model_dir}: not a model directory (generation ids are read from its "
                              "config.json and generation_config.json)")
        found: dict[str, tuple[Any, str]] = {}  # key -> (value, file it came from)
        for name in ("config.json", "generation_config.json"):  # the later file wins
            path = os.path.join(model_dir, name)
            if os.path.isfile(path):
                raw = _read_json(path)
                found.update({k: (raw[k], path) for k in _HF_ID_KEYS if raw.get(k) is not None})
        bos, pad = (_token_id(*found[k], k) if k in found else None for k in ("bos_token_id", "pad_token_id"))
        eos, where = found.get("eos_token_id", ([], model_dir))
        eos = eos if isinstance(eos, list) else [eos]
        return cls(tuple(_token_id(e, where, "eos_token_id") for e in eos), bos, pad)

    def hf_fields(self) -> dict[str, Any]:
        """The config.json fields: eos as one id, a list of ids, or null."""
        eos = list(self.eos) if len(self.eos) > 1 else (self.eos[0] if self.eos else None)
        return {"bos_token_id": self.bos, "pad_token_id": self.pad, "eos_token_id": eos}


_HF_ID_KEYS = ("bos_token_id", "pad_token_id", "eos_token_id")


def _token_id(value, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: {key} must be a non-negative token id (or a list of them for eos), "
                          f"got {value!r}")
    return value


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return raw


def _rope(raw: dict, where: str) -> tuple[float, tuple[float, ...]]:
    """RoPE theta and llama3 scaling (LLAMA3_ROPE_FIELDS, or () for plain RoPE) from `rope_theta`
    and the `rope_parameters` (transformers 5) or `rope_scaling` (the hub's Llama 3.1 files) dict."""
    theta, scaling = raw.get("rope_theta"), ()
    for key in ("rope_parameters", "rope_scaling"):
        params = raw.get(key)
        if not params:
            continue
        if not isinstance(params, dict):
            raise ConfigError(f"{where}: {key} must be a dict, got {type(params).__name__}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ConfigError(
                f"{where}: {key}.rope_type={rope_type!r} is not supported; only 'default' and 'llama3' RoPE"
            )
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"{where}: {key}.partial_rotary_factor={params['partial_rotary_factor']} is not "
                              "supported; RoPE over the whole head only")
        theta = params.get("rope_theta", theta)
        if rope_type == "llama3":
            # As transformers: the pretraining context defaults to max_position_embeddings.
            given = {"original_max_position_embeddings": raw.get("max_position_embeddings"), **params}
            missing = [f for f in LLAMA3_ROPE_FIELDS if given.get(f) is None]
            if missing:
                raise ConfigError(f"{where}: {key} of rope_type 'llama3' lacks {missing}")
            scaling = tuple(float(given[f]) for f in LLAMA3_ROPE_FIELDS)
    return float(theta if theta is not None else 10000.0), scaling


def _resolve_config_json(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        cand = os.path.join(path, "config.json")
        if not os.path.isfile(cand):
            raise ConfigError(f"{path}: no config.json in this directory")
        return cand
    if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") != 1:
        raise ConfigError(f"{path}: not a file, a model directory or a hub id 'org/name'")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(path, "config.json")


# ---------------------------------------------------------------------------
# YAML run configs: dataclasses from dicts with unknown keys refused.

def from_dict(cls, data: dict | None, where: str = "config"):
    """Build (nested) frozen dataclass `cls` from a dict; unknown keys are errors."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


def _coerce(tp, value, where):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where) if len(args) == 1 else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (elem, *_rest) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(elem, v, where) for v in value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `2e-3` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted `a.b.c=value` overrides (values parsed as YAML scalars)."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_yaml(cls, path: str | os.PathLike | None, overrides: list[str] = ()):
    """YAML file (or nothing) + dotted overrides -> frozen dataclass `cls`."""
    data = {}
    if path is not None:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    return from_dict(cls, apply_overrides(data, list(overrides)), where=str(path or cls.__name__))
