"""Which model pair an eval or server runs: a small YAML config, or `toy`.

    instruct: Qwen/Qwen3-4B-Instruct-2507
    thinking: Qwen/Qwen3-4B-Thinking-2507
    dtype: bfloat16
    max_new_tokens: 32768
    conf_calibration: runs/qwen3-4b/conf_calibration.json   # what plain `conf`/`routing` use
    pref_model: runs/qwen3-4b/pref                          # what plain `pref` uses
"""

from __future__ import annotations

import dataclasses
import os

from dami_jax.config import load_yaml


@dataclasses.dataclass(frozen=True)
class PairConfig:
    instruct: str
    thinking: str
    dtype: str = "bfloat16"
    tokenizer: str = "thinking"
    max_new_tokens: int = 32768
    batch_size: int = 64  # engine rows at once
    kv_gb: float | None = None  # the engine's KV pool (GB); None: batch_size rows at full length, reserved
    conf_calibration: str | None = None
    pref_model: str | None = None
    mesh: tuple[int, ...] = (1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    math_instruction: bool = True  # append the boxed-answer instruction to questions

    def engine_size(self) -> dict:
        """The engine's size as `generate_pair` takes it (max_rows, kv_bytes)."""
        return dict(max_rows=self.batch_size, kv_bytes=None if self.kv_gb is None else int(self.kv_gb * 2**30))


def toy_pair_config() -> PairConfig:
    from dami_jax.toyworld import MAX_NEW_TOKENS, PAIR_DIR, default_pair_dirs

    instruct, thinking = default_pair_dirs()
    cal = os.path.join(PAIR_DIR, "conf_calibration.json")
    # Plain `pref` already loads the reward model shipped for this pair (dami_jax/pref/assets/toy).
    return PairConfig(instruct, thinking, dtype="float32", max_new_tokens=MAX_NEW_TOKENS, batch_size=300,
                      conf_calibration=cal if os.path.isfile(cal) else None, math_instruction=False)


def load_pair_config(spec: str, overrides: list[str] = ()) -> PairConfig:
    """`toy` or a YAML path, plus dotted overrides."""
    if spec == "toy":
        if overrides:
            base = dataclasses.asdict(toy_pair_config())
            from dami_jax.config import apply_overrides, from_dict

            return from_dict(PairConfig, apply_overrides(base, list(overrides)), where="toy pair")
        return toy_pair_config()
    return load_yaml(PairConfig, spec, overrides)


def expand_policy(spec: str, pair_cfg: PairConfig) -> str:
    """Plain `conf`, `routing` and `pref` use the pair config's calibration / reward model."""
    if spec in ("conf", "routing") and pair_cfg.conf_calibration:
        return f"{spec}:{pair_cfg.conf_calibration}"
    if spec == "pref" and pair_cfg.pref_model:
        return f"pref:{pair_cfg.pref_model}"
    return spec


def open_pair(pair_cfg: PairConfig):
    import jax

    from dami_jax.models.sharding import make_mesh
    from dami_jax.pair import load_pair

    # This process's devices: under several processes each holds its own copy of the pair.
    mesh = None if tuple(pair_cfg.mesh) == (1, 1, 1) else make_mesh(*pair_cfg.mesh, devices=jax.local_devices())
    return load_pair(pair_cfg.instruct, pair_cfg.thinking, dtype=pair_cfg.dtype, mesh=mesh,
                     tokenizer=pair_cfg.tokenizer)
