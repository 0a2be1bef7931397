"""Trains the toy Instruct/Thinking pair and ships it as two HF Qwen3 checkpoints.

Schedule, all determined by one seed:
1. base: from random init, on a mix of direct answers and thinking traces where
   the share of traces rises with difficulty (P(think|k) linear from think_min at
   k=1 to think_max at k=MAX_OPS). The base thus already "decides" to think on
   hard problems, which is what makes the interpolated models switch thinking
   on hardest-first.
2. instruct = base fine-tuned on direct answers only; thinking = base fine-tuned
   on traces only. Both start from the same base: the prototype found that two
   separately trained models do not interpolate; one shared base is essential.

`world` picks the toy world (language.World). v2 (docs/toyworld_v2.md) adds the
`work` style (a trace without its re-check): the base thinks with a re-check with
P(recheck | think, k) linear from recheck_min to recheck_max (v1: always), and
the Instruct fine-tune carries a share of work traces whose opening token has no
loss (it never chooses to think, but stops after the work if made to think).

The loss covers the assistant part only. Each base batch holds a fixed number of
direct and of thinking examples (k drawn from P(k | kind)), each kind padded to
its own length: the same data distribution as a mixed batch, without padding
four-token answers to trace length, and with fixed shapes (one compile).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from dami_jax.config import GenerationIds, ModelConfig
from dami_jax.models.qwen3 import apply, init_params
from dami_jax.toyworld import language as L
from dami_jax.toyworld.tokenizer import MODEL_MAX_LENGTH, save_tokenizer

PROMPT_LEN = len(L.prompt_tokens(L.Problem((0, 0), ("+",))))
_LONGEST = L.Problem((0,) * (L.MAX_OPS + 1), ("+",) * L.MAX_OPS)
# Each style's examples are padded to its longest completion (k = MAX_OPS).
STYLE_LEN = {style: PROMPT_LEN + len(L.answer_tokens(_LONGEST, style)) for style in L.STYLES}


@dataclasses.dataclass(frozen=True)
class ToyTrainConfig:
    """The shipped recipe (defaults); configs/toyworld.yaml restates it."""

    seed: int = 0
    world: str = "v1"  # language.WORLDS: the traces' re-check (v2: its slip on easy problems)
    # Model: a ~0.8M-parameter Qwen3 with tied embeddings.
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    rope_theta: float = 10000.0
    # Data: P(think | k) rises linearly from think_min (k=1) to think_max (k=MAX_OPS).
    think_min: float = 0.1
    think_max: float = 0.9
    # A base thinking example re-checks with P(recheck | think, k) linear from recheck_min to recheck_max,
    # else it is a work trace (v2); and this share of the Instruct fine-tune is work traces, opening unsupervised.
    recheck_min: float = 1.0
    recheck_max: float = 1.0
    instruct_work_share: float = 0.0
    # The Thinking fine-tune's k: drawn as its style is in the base (v1), or uniform (v2: it re-checks,
    # and slips, on easy problems too, so they must be in its data).
    thinking_uniform_k: bool = False
    batch_size: int = 64
    # Optimisation (AdamW, warmup then cosine decay to 10%, gradient clipping).
    # Sized to ~960 CPU-seconds in all (user+sys; under 10 minutes on 2 idle cores).
    # A thinking example is ~4x the tokens of a direct one: fewer thinking fine-tune steps.
    base_steps: int = 600
    base_lr: float = 1e-3
    instruct_steps: int = 250
    thinking_steps: int = 150
    finetune_lr: float = 5e-4
    warmup_steps: int = 40
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # Check after training: greedy decoding of eval_per_k problems per k on a λ grid.
    eval_per_k: int = 20
    eval_lams: tuple[float, ...] = (0.0, 0.4, 0.5, 0.6, 0.75, 1.0)


def model_config(cfg: ToyTrainConfig) -> ModelConfig:
    return ModelConfig(
        vocab_size=len(L.VOCAB), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, max_position_embeddings=MODEL_MAX_LENGTH,
        tie_word_embeddings=True,
    )


# The toy checkpoints' config.json ids: both models end an answer with <|im_end|>.
GENERATION_IDS = GenerationIds(eos=(L.EOS_ID,), pad=L.PAD_ID)


# ---------------------------------------------------------------------------
# Data

def style_probs(cfg: ToyTrainConfig) -> dict[str, np.ndarray]:
    """The base's P(style | k) for k = 1..MAX_OPS."""
    think = np.linspace(cfg.think_min, cfg.think_max, L.MAX_OPS)
    recheck = np.linspace(cfg.recheck_min, cfg.recheck_max, L.MAX_OPS)
    return {"direct": 1 - think, "work": think * (1 - recheck), "recheck": think * recheck,
            "uniform": np.ones(L.MAX_OPS)}


@dataclasses.dataclass(frozen=True)
class Kind:
    """n examples of one answer style per batch, k drawn ∝ the base's P(style | k) (or ∝ the
    style_probs entry k_from names); open_loss=False leaves the opening token (the choice between
    thinking and answering) out of the loss."""

    style: str
    n: int
    open_loss: bool = True
    k_from: str | None = None


def encode(problems: list[L.Problem], style: str, world: L.World = L.V1,
           open_loss: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (n, T), loss mask on targets (n, T-1)): the assistant part, EOS included."""
    length = STYLE_LEN[style]
    tokens = np.full((len(problems), length), L.PAD_ID, np.int32)
    for row, p in enumerate(problems):
        ids = L.to_ids(L.prompt_tokens(p) + L.answer_tokens(p, style, world))
        tokens[row, : len(ids)] = ids
    targets = tokens[:, 1:]
    first = PROMPT_LEN - 1 if open_loss else PROMPT_LEN  # target index of the opening token: PROMPT_LEN - 1
    mask = (np.arange(length - 1) >= first)[None, :] & (targets != L.PAD_ID)
    return tokens, mask


def sample_batch(rng: np.random.Generator, kinds: list[Kind], probs: dict[str, np.ndarray],
                 world: L.World = L.V1):
    """Buckets [(tokens, weights)], one per kind with examples, k drawn from P(k | style) ∝ probs[style];
    weights sum to 1 over the batch, each kind weighing by its share of examples (token mean within a
    kind), so four-token direct answers are not drowned by traces twenty times longer."""
    total, buckets = sum(kind.n for kind in kinds), []
    for kind in kinds:
        if kind.n == 0:
            continue
        w = probs[kind.k_from or kind.style]
        ks = rng.choice(np.arange(1, L.MAX_OPS + 1), size=kind.n, p=w / w.sum())
        tokens, mask = encode([L.sample_problem(rng, int(k)) for k in ks], kind.style, world, kind.open_loss)
        buckets.append((tokens, (mask * (kind.n / total / mask.sum())).astype(np.float32)))
    return buckets


# ---------------------------------------------------------------------------
# Optimisation

def loss_fn(mcfg: ModelConfig, params, buckets) -> jax.Array:
    loss = 0.0
    for tokens, weights in buckets:
        inputs = tokens[:, :-1]
        logits, _ = apply(mcfg, params, inputs, inputs != L.PAD_ID)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        loss = loss + jnp.sum(ce * weights)
    return loss


@dataclasses.dataclass(frozen=True)
class OptSpec:
    """Hashable optimiser settings: a static argument of the jitted update, so a
    stage with the same settings and shapes reuses the compiled step."""

    lr: float
    steps: int
    warmup: int
    weight_decay: float
    grad_clip: float

    def optimizer(self) -> optax.GradientTransformation:
        total = max(self.steps, self.warmup + 1)
        schedule = optax.warmup_cosine_decay_schedule(0.0, self.lr, self.warmup, total, self.lr * 0.1)
        decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)  # not norm scales
        return optax.chain(
            optax.clip_by_global_norm(self.grad_clip),
            optax.adamw(schedule, b2=0.98, weight_decay=self.weight_decay, mask=decay_mask),
        )


def opt_spec(cfg: ToyTrainConfig, lr: float, steps: int) -> OptSpec:
    return OptSpec(float(lr), int(steps), min(cfg.warmup_steps, max(steps // 10, 1)),
                   cfg.weight_decay, cfg.grad_clip)


@functools.partial(jax.jit, static_argnums=(0, 1))
def update(mcfg: ModelConfig, spec: OptSpec, params, opt_state, buckets):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(mcfg, p, buckets))(params)
    updates, opt_state = spec.optimizer().update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_stage(cfg, mcfg, params, *, steps, lr, mix, seed, desc, progress=True):
    """`steps` AdamW steps from `params` on batches of `mix` (a list of Kind).
    Returns (params, per-step losses)."""
    spec = opt_spec(cfg, lr, steps)
    rng = np.random.default_rng(seed)
    probs, world = style_probs(cfg), L.get_world(cfg.world)
    opt_state, losses = spec.optimizer().init(params), []
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = sample_batch(rng, mix, probs, world)
        params, opt_state, loss = update(mcfg, spec, params, opt_state, batch)
        losses.append(float(loss))  # waits for the step: keeps the bar's rate honest
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
    return params, losses


def stage_mixes(cfg: ToyTrainConfig) -> dict[str, list[Kind]]:
    """The kinds of example in each stage's batches."""
    probs, size = style_probs(cfg), cfg.batch_size
    n = {style: int(round(size * float(np.mean(probs[style])))) for style in ("work", "recheck")}
    n_instruct_work = int(round(size * cfg.instruct_work_share))
    return {"base": [Kind("direct", size - n["work"] - n["recheck"]), Kind("work", n["work"]),
                     Kind("recheck", n["recheck"])],
            "instruct": [Kind("direct", size - n_instruct_work), Kind("work", n_instruct_work, open_loss=False)],
            "thinking": [Kind("recheck", size, k_from="uniform" if cfg.thinking_uniform_k else None)]}


def train_params(cfg: ToyTrainConfig, progress: bool = True):
    """(instruct, thinking, losses by stage): the whole schedule, in memory."""
    mcfg, mixes = model_config(cfg), stage_mixes(cfg)
    params = init_params(mcfg, cfg.seed)
    base, base_losses = train_stage(cfg, mcfg, params, steps=cfg.base_steps, lr=cfg.base_lr,
                                    mix=mixes["base"], seed=[cfg.seed, 0], desc="toy base", progress=progress)
    out, losses = {}, {"base": base_losses}
    steps = {"instruct": cfg.instruct_steps, "thinking": cfg.thinking_steps}
    for i, name in enumerate(("instruct", "thinking"), start=1):
        out[name], losses[name] = train_stage(
            cfg, mcfg, base, steps=steps[name], lr=cfg.finetune_lr, mix=mixes[name],
            seed=[cfg.seed, i], desc=f"toy {name}", progress=progress)
    return out["instruct"], out["thinking"], losses


# ---------------------------------------------------------------------------
# The shipped pair

def _final(losses: list[float], window: int = 20) -> float:
    return float(np.mean(losses[-window:])) if losses else float("nan")


def _evaluate(mcfg, instruct, thinking, cfg: ToyTrainConfig) -> dict:
    """What the pair does on fresh problems: per-λ accuracy/tokens/think share and the oracle."""
    from dami_jax.pair import ModelPair
    from dami_jax.toyworld.demo import evaluate_pair, held_out_problems

    pair = ModelPair(cfg=mcfg, instruct=instruct, thinking=thinking, generation_ids=GENERATION_IDS)
    summaries, orc = evaluate_pair(pair, held_out_problems(cfg.eval_per_k, cfg.seed + 10_000), cfg.eval_lams)
    return {"summary": orc, "by_lambda": summaries}


def train_pair(out_dir: str | os.PathLike, cfg: ToyTrainConfig = ToyTrainConfig(), *,
               progress: bool = True, command: str | None = None) -> dict:
    """Train and write out_dir/{instruct,thinking}/ (HF checkpoints with tokenizer)
    and out_dir/provenance.json. Returns the provenance dict."""
    from dami_jax.checkpoint.hf import save_hf  # import late: only this step needs it

    start, cpu0 = time.time(), sum(os.times()[:2])
    mcfg = model_config(cfg)
    instruct, thinking, losses = train_params(cfg, progress)
    train_s = time.time() - start
    report = _evaluate(mcfg, instruct, thinking, cfg)
    out_dir = os.fspath(out_dir)
    with tempfile.TemporaryDirectory() as tok_dir:
        files = save_tokenizer(tok_dir)
        for name, params in (("instruct", instruct), ("thinking", thinking)):
            save_hf(mcfg, params, os.path.join(out_dir, name), extra_files=files, progress=False,
                    generation_ids=GENERATION_IDS)
    provenance = {
        "seed": cfg.seed,
        "config": dataclasses.asdict(cfg),
        "model_config": mcfg.to_hf_dict(generation_ids=GENERATION_IDS),
        "command": command if command is not None else " ".join([sys.executable, *sys.argv]),
        "steps": {k: len(v) for k, v in losses.items()},
        "final_losses": {k: _final(v) for k, v in losses.items()},
        "loss_curves_every_50": {k: v[::50] for k, v in losses.items()},
        "train_wall_s": round(train_s, 1),
        "total_wall_s": round(time.time() - start, 1),
        # CPU seconds of this process: comparable across runs on a shared machine.
        "total_cpu_s": round(sum(os.times()[:2]) - cpu0, 1),
        "eval": report,
        "versions": _versions(),
        "sha256": {name: _sha256(os.path.join(out_dir, name, "model.safetensors"))
                   for name in ("instruct", "thinking")},
    }
    with open(os.path.join(out_dir, "provenance.json"), "w") as f:
        json.dump(provenance, f, indent=2)
    return provenance


def _sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    names = ("jax", "jaxlib", "flax", "optax", "numpy", "transformers", "tokenizers")
    out = {"python": platform.python_version(), "jax_backend": jax.default_backend()}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def main(argv: list[str] | None = None) -> None:
    """python -m dami_jax.toyworld.train --out DIR [--config configs/toyworld.yaml] [key=value ...]"""
    import argparse

    from dami_jax.config import load_yaml

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", required=True, help="output directory (instruct/, thinking/, provenance.json)")
    ap.add_argument("--config", default=None, help="YAML recipe (default: the dataclass defaults)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. base_steps=100")
    args = ap.parse_args(argv)
    cfg = load_yaml(ToyTrainConfig, args.config, args.overrides)
    argv = sys.argv[1:] if argv is None else argv
    prov = train_pair(args.out, cfg, command=" ".join(["python -m dami_jax.toyworld.train", *argv]))
    print(json.dumps({"final_losses": prov["final_losses"], "train_wall_s": prov["train_wall_s"],
                      "summary": prov["eval"]["summary"]}, indent=2))


if __name__ == "__main__":
    main()
