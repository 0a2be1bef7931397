"""dami_jax: DAMI (Dynamic Model Interpolation) for Qwen3 in JAX/Flax.

Public surface (DESIGN 2.1); see README.md.
"""

from dami_jax.config import ConfigError, GenerationIds, ModelConfig
from dami_jax.checkpoint.hf import load_hf, save_hf
from dami_jax.checkpoint.safetensors_io import CheckpointError
from dami_jax.engine.engine import Engine
from dami_jax.engine.offline import generate
from dami_jax.errors import InputError
from dami_jax.generate import GenerateOutput, Greedy, Sample, chat_prompt, split_thinking
from dami_jax.interpolate import delta_params, interpolate
from dami_jax.models.qwen3 import init_params
from dami_jax.models.qwen3_vl import forward
from dami_jax.pair import ModelPair, PairMismatchError, generate_pair, load_pair, sweep
from dami_jax.schedule import Schedule
from dami_jax.models.sharding import ShardingConfig, make_mesh

__all__ = [
    "CheckpointError", "ConfigError", "Engine", "GenerateOutput", "GenerationIds", "Greedy", "InputError", "ModelConfig",
    "ModelPair", "PairMismatchError", "Sample", "Schedule", "ShardingConfig", "chat_prompt", "delta_params",
    "forward", "generate", "generate_pair", "init_params", "interpolate", "load_hf", "load_pair",
    "make_mesh", "save_hf", "split_thinking", "sweep",
]
