"""Which model pair a command runs: a small YAML config (configs/pair_*.yaml), or `toy` / `toy-v2`.

    instruct: Qwen/Qwen3-4B-Instruct-2507
    thinking: Qwen/Qwen3-4B-Thinking-2507
    dtype: bfloat16
    mesh: [-1, 1, 1]
    conf_calibration: runs/qwen3-4b/conf_calibration.json   # what plain `conf`/`routing` use
    pref_model: runs/qwen3-4b/pref                          # what plain `pref` uses
    thinking_budget: 4096                                   # what plain `budget` uses
    conf: {w_entropy: 0.5, w_js: 0.5}                       # what `dami calibrate conf` scores with
    deer: {threshold: 0.95, trigger: Wait}                  # what `deer` runs with (DeerConfig)

`dami eval`, `sweep`, `calibrate`, `generate`, `serve` and `train-pref` all take one.
`check_policies` turns policy specs into the pair's own and verifies them (files
included) without loading the pair, so a typo costs a second, not a model load.
"""

from __future__ import annotations

import dataclasses
import os

from dami_jax.config import ConfigError, load_yaml
from dami_jax.policies.conf_config import ConfConfig
from dami_jax.policies.deer_config import DeerConfig, parse_deer_arg

# The reward model shipped for the toy pair (written by train_pref.py on configs/pref_toy.yaml).
TOY_PREF_MODEL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "pref", "assets", "toy")
# The toy pairs by name: the toy world each is of, and its reward model (v2: configs/pref_toy_v2.yaml).
TOY_PAIRS = {"toy": "v1", "toy-v2": "v2"}
TOY_PREF_MODELS = {"v1": TOY_PREF_MODEL, "v2": os.path.join(os.path.dirname(TOY_PREF_MODEL), "toy_v2")}
# Their Conf settings: v1's (configs/policy_conf.yaml); v2 caps λ at 0.4, the ceiling chosen on its
# development seed (docs/toyworld_v2.md), so that uncertain queries think without v2's re-check.
TOY_CONF = {"v1": ConfConfig(w_entropy=1.0, w_js=0.0, rho=0.7, tau_per_iqr=0.1)}
TOY_CONF["v2"] = dataclasses.replace(TOY_CONF["v1"], lam_max=0.4)


class MissingPairFile(ConfigError):
    """A calibration or reward model the pair config names is not there."""


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
    thinking_budget: int = 4096  # plain `budget`: thinking cut at this many tokens
    mesh: tuple[int, ...] = (1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    math_instruction: bool = True  # append the boxed-answer instruction to questions
    # Sampled generation (Pref rollouts, eval samples > 1): Qwen3's recommended Thinking decoding.
    temperature: float = 0.6
    top_k: int = 20
    top_p: float = 0.95
    conf: ConfConfig = ConfConfig()  # the Conf settings `dami calibrate conf` scores with
    deer: DeerConfig = DeerConfig()  # plain `deer` (and `deer:<threshold>`): the early-exit settings

    def __post_init__(self):
        if self.thinking_budget < 1:
            raise ConfigError(f"PairConfig: thinking_budget must be >= 1, got {self.thinking_budget}")

    def engine_size(self) -> dict:
        """The engine's size as `generate_pair` takes it (max_rows, kv_bytes)."""
        return dict(max_rows=self.batch_size, kv_bytes=None if self.kv_gb is None else int(self.kv_gb * 2**30))

    def sampling(self):
        """The pair's sampler (`Sample`) for sampled generation."""
        from dami_jax.generate.sampling import Sample

        return Sample(self.temperature, self.top_k, self.top_p)


def toy_pair_config(world: str = "v1") -> PairConfig:
    """The shipped toy pair of `world` (v1, the default, or v2) with its shipped calibration and
    reward model.

    Its Conf settings are the toy's own: the ambiguity signal alone (w_D = 0; JS was weak there,
    configs/policy_conf.yaml) and the ρ, τ its shipped calibration was made with (v2: v1's, with λ_max = 0.4).
    Its DEER settings are the toy's words: a thinking chunk is a line (trigger: the line break) and the
    trial answer is what follows `\boxed{`, up to its `}`."""
    from dami_jax.toyworld import MAX_NEW_TOKENS, PAIR_DIRS, default_pair_dirs

    if world not in PAIR_DIRS:
        raise ConfigError(f"unknown toy world {world!r}; expected one of {sorted(PAIR_DIRS)}")
    instruct, thinking = default_pair_dirs(PAIR_DIRS[world])
    # T = 0.3: the toy eval decodes greedily, so sampling stays closer to greedy than Qwen's 0.6 (measured
    # for Pref rollouts: the 4 samples of a (q, λ) agree 62% of the time at T = 0.3 vs 54% at 0.6).
    return PairConfig(instruct, thinking, dtype="float32", max_new_tokens=MAX_NEW_TOKENS, batch_size=300,
                      conf_calibration=os.path.join(PAIR_DIRS[world], "conf_calibration.json"),
                      pref_model=TOY_PREF_MODELS[world], thinking_budget=48, math_instruction=False, temperature=0.3,
                      conf=TOY_CONF[world],
                      deer=DeerConfig(trigger="\n", inducer="\\boxed{", answer_end="}"))


def load_pair_config(spec: str, overrides: list[str] = ()) -> PairConfig:
    """`toy`, `toy-v2` or a YAML path, plus dotted overrides (`conf.rho=0.7`, `mesh=[1,2,4]`)."""
    if spec in TOY_PAIRS:
        if overrides:
            base = dataclasses.asdict(toy_pair_config(TOY_PAIRS[spec]))
            from dami_jax.config import apply_overrides, from_dict

            return from_dict(PairConfig, apply_overrides(base, list(overrides)), where=f"{spec} pair")
        return toy_pair_config(TOY_PAIRS[spec])
    return load_yaml(PairConfig, spec, overrides)


def expand_policy(spec: str, pair_cfg: PairConfig) -> str | dict:
    """Plain `conf`, `routing`, `pref` and `budget` use the pair config's calibration, reward model
    and thinking budget; `deer` and `deer:<threshold>` its early-exit settings (as a dict spec)."""
    if spec in ("conf", "routing") and pair_cfg.conf_calibration:
        return f"{spec}:{pair_cfg.conf_calibration}"
    if spec == "pref" and pair_cfg.pref_model:
        return f"pref:{pair_cfg.pref_model}"
    if spec == "budget":
        return f"budget:{pair_cfg.thinking_budget}"
    name, _, arg = spec.partition(":")
    if name == "deer":
        try:
            threshold = parse_deer_arg([arg]) if arg else {}
        except ValueError as e:
            raise ConfigError(f"policy spec {spec!r}: {e}") from None
        return {"name": "deer", **dataclasses.asdict(pair_cfg.deer), **threshold}
    return spec


def check_pair_files(spec: str, pair_cfg: PairConfig) -> None:
    """A plain policy whose artifact the pair config names: the file must be there."""
    field = {"conf": "conf_calibration", "routing": "conf_calibration", "pref": "pref_model"}.get(spec)
    path = field and getattr(pair_cfg, field)
    if path and not os.path.exists(path):
        make = ("`dami calibrate conf --pair PAIR --out PATH`" if field == "conf_calibration"
                else "`dami train-pref --config PREF.yaml --out DIR`")
        raise MissingPairFile(f"policy {spec!r}: the pair config's {field} {path!r} does not exist; make it with "
                          f"{make}, or point {field} at an existing one (--set {field}=PATH)")


def check_policy(spec, pair_cfg: PairConfig):
    """`spec` expanded to the pair's own and built without the pair (its files read, its options
    checked): the spec a run should build on the loaded pair. Raises ConfigError on a bad one."""
    from dami_jax.policies.base import build_policy

    if isinstance(spec, str):
        check_pair_files(spec.strip(), pair_cfg)
        spec = expand_policy(spec.strip(), pair_cfg)
    build_policy(spec)
    return spec


def check_policies(specs, pair_cfg: PairConfig) -> list:
    """`check_policy` for each spec; duplicates are refused (records are keyed by spec)."""
    specs = list(specs)
    dup = sorted({s for s in specs if specs.count(s) > 1})
    if dup:
        raise ConfigError(f"policy spec(s) {dup} given twice")
    if not specs:
        raise ConfigError("no policy given")
    return [check_policy(s, pair_cfg) for s in specs]


def open_pair(pair_cfg: PairConfig):
    import jax

    from dami_jax.models.sharding import make_mesh
    from dami_jax.pair import load_pair

    # This process's devices: under several processes each holds its own copy of the pair.
    mesh = None if tuple(pair_cfg.mesh) == (1, 1, 1) else make_mesh(*pair_cfg.mesh, devices=jax.local_devices())
    return load_pair(pair_cfg.instruct, pair_cfg.thinking, dtype=pair_cfg.dtype, mesh=mesh,
                     tokenizer=pair_cfg.tokenizer)


def add_pair_arguments(p) -> None:
    """The argparse arguments of every command that loads a pair (eval, sweep, calibrate, generate,
    serve): `--pair` and `--set`, read back by `load_pair_config(args.pair, args.set)`."""
    p.add_argument("--pair", default="toy", help="'toy', 'toy-v2' or a pair YAML (configs/pair_*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="pair config override, e.g. dtype=float32 or conf.rho=0.7 (repeatable)")
