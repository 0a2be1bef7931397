"""ModelConfig.from_hf / to_hf_dict, GenerationIds and the YAML run-config helpers."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import pytest

from dami_jax.config import ConfigError, GenerationIds, ModelConfig, apply_overrides, from_dict, load_yaml

DENSE = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 5000000,
    "max_position_embeddings": 262144,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

MOE = {
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000000,
    "max_position_embeddings": 262144,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "decoder_sparse_step": 2,
    "mlp_only_layers": [0, 5],
    "eos_token_id": [151645, 151643],
}


def test_from_hf_dense(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(DENSE))
    for src in (str(path), tmp_path, DENSE):  # a file, a model directory, a dict
        cfg = ModelConfig.from_hf(src)
        assert cfg.vocab_size == 151936 and cfg.hidden_size == 2560 and cfg.intermediate_size == 9728
        assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (36, 32, 8, 128)
        assert cfg.rope_theta == 5_000_000.0 and isinstance(cfg.rope_theta, float)
        assert cfg.rms_norm_eps == 1e-6 and cfg.max_position_embeddings == 262144
        assert cfg.tie_word_embeddings is True
        assert not cfg.is_moe and cfg.model_type == "qwen3" and cfg.num_experts == 0
        assert not any(cfg.is_moe_layer(i) for i in range(cfg.num_layers))


def test_from_hf_moe():
    cfg = ModelConfig.from_hf(MOE)
    assert cfg.is_moe and cfg.model_type == "qwen3_moe"
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (128, 8, 768)
    assert cfg.norm_topk_prob is True
    assert cfg.decoder_sparse_step == 2 and cfg.mlp_only_layers == (0, 5)
    assert cfg.tie_word_embeddings is False  # default when absent
    # transformers' rule: MoE where (i + 1) % step == 0 and i not in mlp_only_layers.
    moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    assert moe_layers == [i for i in range(48) if (i + 1) % 2 == 0 and i not in (0, 5)]
    assert 5 not in moe_layers and 1 in moe_layers and 3 in moe_layers


def test_moe_fields_ignored_for_dense():
    cfg = ModelConfig.from_hf({**DENSE, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 4})
    assert not cfg.is_moe and cfg.num_experts == 0


@pytest.mark.parametrize(
    "fields, theta",
    [
        ({"rope_theta": 1234.0}, 1234.0),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 777.0}}, 777.0),
        ({"rope_scaling": {"type": "default", "rope_theta": 4321.0}}, 4321.0),
        # rope_parameters wins over a stale top-level rope_theta (transformers 5 writes both forms).
        ({"rope_theta": 1.0, "rope_parameters": {"rope_type": "default", "rope_theta": 99.0}}, 99.0),
        ({"rope_scaling": None}, 10000.0),  # nothing given: transformers' default
    ],
)
def test_rope_theta_sources(fields, theta):
    raw = {k: v for k, v in DENSE.items() if k != "rope_theta"}
    cfg = ModelConfig.from_hf({**raw, **fields})
    assert cfg.rope_theta == theta


def test_head_dim_independent_of_hidden_and_heads():
    cfg = ModelConfig.from_hf({**DENSE, "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2,
                               "head_dim": 16})
    assert cfg.head_dim == 16 and cfg.hidden_size // cfg.num_heads == 8
    # Absent head_dim: hidden / heads, as transformers does.
    raw = {k: v for k, v in DENSE.items() if k != "head_dim"}
    assert ModelConfig.from_hf(raw).head_dim == 2560 // 32
    # Absent num_key_value_heads: plain multi-head attention.
    raw = {k: v for k, v in DENSE.items() if k != "num_key_value_heads"}
    assert ModelConfig.from_hf(raw).num_kv_heads == 32


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_type"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
        ({"model_type": "mistral"}, "model_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"vocab_size": None}, "vocab_size"),
    ],
)
def test_unsupported_fields_refused(fields, named):
    with pytest.raises(ConfigError, match=named):
        ModelConfig.from_hf({**DENSE, **fields})


def test_unsupported_field_message_names_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**DENSE, "use_sliding_window": True}))
    with pytest.raises(ConfigError, match=r"config\.json.*use_sliding_window"):
        ModelConfig.from_hf(tmp_path)


def test_moe_bad_fields_refused():
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        ModelConfig.from_hf({**MOE, "num_experts_per_tok": 129})
    with pytest.raises(ConfigError, match="num_experts"):
        ModelConfig.from_hf({**MOE, "num_experts": 0})
    with pytest.raises(ConfigError, match="decoder_sparse_step"):
        ModelConfig.from_hf({**MOE, "decoder_sparse_step": -1})


def test_missing_or_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(ConfigError, match="not a file"):
        ModelConfig.from_hf(str(tmp_path / "absent" / "deeper"))


@pytest.mark.parametrize("raw", [DENSE, MOE, {**MOE, "eos_token_id": 7, "mlp_only_layers": []}],
                         ids=["dense", "moe", "moe-one-eos"])
def test_to_hf_dict_round_trip(raw, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg, ids = ModelConfig.from_hf(raw), GenerationIds.from_hf(tmp_path)
    hf = cfg.to_hf_dict(generation_ids=ids)
    (tmp_path / "config.json").write_text(json.dumps(hf))  # plain JSON data
    assert ModelConfig.from_hf(hf) == cfg and GenerationIds.from_hf(tmp_path) == ids
    assert hf["eos_token_id"] == raw["eos_token_id"]
    assert hf["model_type"] == cfg.model_type
    assert hf["architectures"] == ["Qwen3MoeForCausalLM" if cfg.is_moe else "Qwen3ForCausalLM"]


def test_to_hf_dict_loads_in_transformers():
    from transformers import AutoConfig

    ids = GenerationIds(eos=(151645, 151643), bos=151643, pad=151643)
    for raw in (DENSE, MOE):
        cfg = ModelConfig.from_hf(raw)
        hf = cfg.to_hf_dict(generation_ids=ids)
        tcfg = AutoConfig.for_model(**hf)
        assert (tcfg.eos_token_id, tcfg.bos_token_id, tcfg.pad_token_id) == ([151645, 151643], 151643, 151643)
        assert tcfg.model_type == cfg.model_type
        assert tcfg.head_dim == cfg.head_dim and tcfg.num_key_value_heads == cfg.num_kv_heads
        assert tcfg.rope_parameters["rope_theta"] == cfg.rope_theta
        # ... and back through transformers' own serialization.
        assert ModelConfig.from_hf(tcfg.to_dict()) == cfg


def test_instruct_and_thinking_ids_leave_one_model_config():
    """Configs differing only in generation ids give one ModelConfig: one compile serves both."""
    instruct = ModelConfig.from_hf(DENSE)
    thinking = ModelConfig.from_hf({**DENSE, "eos_token_id": [151645, 151643], "bos_token_id": None,
                                    "pad_token_id": 151643})
    assert instruct == thinking and hash(instruct) == hash(thinking)
    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def step(cfg, x):
        traces.append(cfg)
        return x + cfg.num_layers

    step(instruct, jnp.zeros(2))
    step(thinking, jnp.zeros(2))
    assert len(traces) == 1


def _model_dir(path, config=None, generation=None):
    path.mkdir()
    for name, raw in (("config.json", config), ("generation_config.json", generation)):
        if raw is not None:
            (path / name).write_text(json.dumps(raw))
    return path


def test_generation_ids_from_config_and_generation_config(tmp_path):
    # config.json alone (the toy pair)
    only = _model_dir(tmp_path / "a", {**DENSE, "pad_token_id": 3})
    assert GenerationIds.from_hf(only) == GenerationIds(eos=(151645,), bos=151643, pad=3)
    # Qwen3-2507: generation_config.json adds <|endoftext|> to the EOS ids; it wins where it sets an id
    both = _model_dir(tmp_path / "b", {**DENSE, "pad_token_id": 3},
                      {"eos_token_id": [151645, 151643], "pad_token_id": 151643, "bos_token_id": None})
    assert GenerationIds.from_hf(both) == GenerationIds(eos=(151645, 151643), bos=151643, pad=151643)
    # ids it leaves out or null come from config.json
    unset = _model_dir(tmp_path / "c", DENSE, {"eos_token_id": None, "do_sample": True})
    assert GenerationIds.from_hf(unset) == GenerationIds(eos=(151645,), bos=151643)
    assert GenerationIds.from_hf(_model_dir(tmp_path / "d", generation={"eos_token_id": 2})) == GenerationIds((2,))
    assert GenerationIds.from_hf(_model_dir(tmp_path / "e")) == GenerationIds()
    assert GenerationIds().hf_fields() == {"bos_token_id": None, "pad_token_id": None, "eos_token_id": None}


@pytest.mark.parametrize("generation, match", [
    ({"eos_token_id": "151645"}, r"generation_config\.json: eos_token_id must be a non-negative token id"),
    ({"eos_token_id": [151645, 1.5]}, r"generation_config\.json: eos_token_id .* got 1\.5"),
    ({"pad_token_id": -1}, r"generation_config\.json: pad_token_id .* got -1"),
    ({"bos_token_id": True}, r"bos_token_id .* got True"),
])
def test_bad_generation_ids_are_refused(tmp_path, generation, match):
    with pytest.raises(ConfigError, match=match):
        GenerationIds.from_hf(_model_dir(tmp_path / "m", DENSE, generation))


def test_generation_ids_need_a_model_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DENSE))
    with pytest.raises(ConfigError, match="config.json: not a model directory"):
        GenerationIds.from_hf(tmp_path / "config.json")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        GenerationIds.from_hf(tmp_path / "m")


# ---------------------------------------------------------------------------
# YAML helpers


@dataclasses.dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    steps: int = 10
    layers: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "run"
    seed: int = 0
    tag: str | None = None
    train: Inner = Inner()


def test_from_dict_builds_nested():
    cfg = from_dict(Outer, {"name": "x", "train": {"lr": 1, "layers": [1, 2]}})
    assert cfg == Outer(name="x", train=Inner(lr=1.0, layers=(1, 2)))
    assert isinstance(cfg.train.lr, float)


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(ConfigError, match=r"unknown key.*'nme'"):
        from_dict(Outer, {"nme": "x"})
    with pytest.raises(ConfigError, match=r"train.*unknown key.*'learning_rate'"):
        from_dict(Outer, {"train": {"learning_rate": 0.1}})


def test_from_dict_refuses_wrong_types():
    with pytest.raises(ConfigError, match=r"seed.*expected int"):
        from_dict(Outer, {"seed": "zero"})
    with pytest.raises(ConfigError, match=r"train.*expected a mapping"):
        from_dict(Outer, {"train": 3})


def test_apply_overrides():
    data = {"name": "x", "train": {"steps": 5}}
    out = apply_overrides(data, ["train.lr=0.5", "train.layers=[3, 4]", "seed=7", "tag=null"])
    assert out == {"name": "x", "seed": 7, "tag": None, "train": {"steps": 5, "lr": 0.5, "layers": [3, 4]}}
    assert data == {"name": "x", "train": {"steps": 5}}  # input untouched
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_load_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: base\ntrain:\n  steps: 20\n")
    cfg = load_yaml(Outer, path, ["train.lr=0.25", "seed=3"])
    assert cfg == Outer(name="base", seed=3, train=Inner(lr=0.25, steps=20))
    assert load_yaml(Outer, None) == Outer()
    # Unknown keys, in the file or in an override, name the key and the file.
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: base\ntrian:\n  steps: 20\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key.*'trian'"):
        load_yaml(Outer, bad)
    with pytest.raises(ConfigError, match=r"unknown key.*'stepz'"):
        load_yaml(Outer, path, ["train.stepz=3"])
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_yaml(Outer, top)
