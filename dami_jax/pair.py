"""An Instruct/Thinking pair and generation at per-query λ (DESIGN 2.2).

`generate_pair` runs a batch mixing any λ values in one of two modes that give
the same tokens: `delta` (params (Θ_I, Δ), every row its own λ, 2× weight
bytes per step), on the paged engine (continuous batching: a row costs the
tokens it generates, not the batch's longest); or `merged` (Θ(λ) materialized; K
distinct λ become a vmapped stack of K models, rows grouped by λ, in lock step
over a dense cache: the simple reference). `sweep` runs a λ grid on one batch of
prompts as rows of one engine, each with its λ.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from dami_jax.checkpoint.hf import load_hf, resolve_model_dir
from dami_jax.engine.engine import outputs
from dami_jax.engine.offline import sized_engine
from dami_jax.config import GenerationIds, ModelConfig
from dami_jax.errors import InputError
from dami_jax.generate.decode import GenerateOutput, generate_lockstep, generate_stacked
from dami_jax.generate.sampling import Greedy
from dami_jax.interpolate import check_lam, delta_params, interpolate
from dami_jax.models.qwen3_vl import select_rows
from dami_jax.schedule import Schedule


class PairMismatchError(InputError):
    """The two checkpoints are not the same architecture."""


class TokenizerMismatchWarning(UserWarning):
    """The two checkpoints' tokenizers give some special-token ids different strings."""


@dataclasses.dataclass
class ModelPair:
    cfg: ModelConfig
    instruct: dict
    thinking: dict
    tokenizer: object = None
    schedule: Schedule | None = None
    generation_ids: GenerationIds = GenerationIds()
    _delta: dict | None = dataclasses.field(default=None, repr=False)

    @property
    def delta(self) -> dict:
        """(Θ_I, Δ) stacked params for delta mode, built once. A Qwen3-VL vision tower equal in
        both checkpoints stays plain, so it runs once for all rows (models/qwen3_vl.apply)."""
        if self._delta is None:
            self._delta = delta_params(self.instruct, self.thinking, schedule=self.schedule)
            if "visual" in self.instruct and trees_equal(self.instruct["visual"], self.thinking["visual"]):
                self._delta = {**self._delta, "visual": self.instruct["visual"]}
        return self._delta

    def merged(self, lam):
        return interpolate(self.instruct, self.thinking, lam, schedule=self.schedule)

    @property
    def stop_tokens(self) -> list[int]:
        """The checkpoint's EOS ids, then the tokenizer's EOS if it is not among them."""
        ids = list(self.generation_ids.eos)
        tok = self.tokenizer
        if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in ids:
            ids.append(tok.eos_token_id)
        return ids


_WHY = {
    "family": "DAMI interpolates two checkpoints of one model family",
    "vocab_size": "the vocabularies must be the same size: embedding and lm_head rows are interpolated one to one",
}


def trees_equal(a, b) -> bool:
    """Whether two params trees hold equal arrays (compared, not assumed from their source)."""
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.shape == y.shape and bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def check_same_architecture(a: ModelConfig, b: ModelConfig, names=("instruct", "thinking")) -> None:
    fa, fb = dataclasses.asdict(a), dataclasses.asdict(b)
    keys = [k for k in fa if k in a.architecture_fields() or k in b.architecture_fields()]
    keys.sort(key=lambda k: list(_WHY).index(k) if k in _WHY else len(_WHY))  # the likeliest causes first
    for key in keys:
        if fa[key] != fb[key]:
            raise PairMismatchError(
                f"{names[0]} and {names[1]} differ in {key}: {fa[key]!r} vs {fb[key]!r}; "
                + _WHY.get(key, "DAMI interpolates two checkpoints of one architecture")
            )


def added_tokens(model_dir: str) -> dict[int, str]:
    """The added (special and template) tokens of a model directory's tokenizer, id -> string, from
    tokenizer_config.json's `added_tokens_decoder` or else tokenizer.json's `added_tokens`; {} when
    the directory has neither."""
    config, full = os.path.join(model_dir, "tokenizer_config.json"), os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(config):
        with open(config) as f:
            decoder = json.load(f).get("added_tokens_decoder") or {}
        if decoder:
            return {int(i): tok["content"] for i, tok in decoder.items()}
    if os.path.isfile(full):
        with open(full) as f:
            return {tok["id"]: tok["content"] for tok in json.load(f).get("added_tokens") or ()}
    return {}


def warn_added_tokens_differ(dirs: dict[str, str], used: str) -> list[int]:
    """Warn, naming the ids, where the two tokenizers map an added token id to different strings
    (R1-Distill models reuse their base's special ids for their own template tokens). Returns
    those ids; none when either directory has no tokenizer files."""
    a, b = added_tokens(dirs["instruct"]), added_tokens(dirs["thinking"])
    if not a or not b:
        return []
    ids = sorted(i for i in a.keys() | b.keys() if a.get(i) != b.get(i))
    if ids:
        shown = ", ".join(f"{i}: {a.get(i)!r} vs {b.get(i)!r}" for i in ids[:8])
        more = f" and {len(ids) - 8} more" if len(ids) > 8 else ""
        warnings.warn(
            f"the instruct and thinking tokenizers map {len(ids)} special token id(s) differently "
            f"(instruct vs thinking): {shown}{more}. The pair tokenizes with one of them "
            f"(tokenizer={used!r}), so the other model reads these ids as its own tokens.",
            TokenizerMismatchWarning, stacklevel=3)
    return ids


def load_pair(instruct: str | os.PathLike, thinking: str | os.PathLike, dtype="float32", mesh=None,
              tokenizer: str = "thinking", schedule: Schedule | None = None) -> ModelPair:
    """Load both checkpoints (HF or converted), refusing mismatched architectures (two families,
    vocabularies of two sizes, ...) and warning where the two tokenizers' special tokens differ.

    tokenizer: "thinking" (default: its tokenizer and chat template), "instruct",
    a path, or "none".
    """
    dirs = {"instruct": resolve_model_dir(instruct), "thinking": resolve_model_dir(thinking)}
    cfg_i, cfg_t = ModelConfig.from_hf(dirs["instruct"]), ModelConfig.from_hf(dirs["thinking"])
    check_same_architecture(cfg_i, cfg_t)
    warn_added_tokens_differ(dirs, tokenizer)
    params_i = load_hf(dirs["instruct"], dtype=dtype, mesh=mesh, cfg=cfg_i)
    params_t = load_hf(dirs["thinking"], dtype=dtype, mesh=mesh, cfg=cfg_t)
    tok = None
    if tokenizer != "none":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(dirs.get(tokenizer, tokenizer))
    # The context length and the generation ids (EOS) follow the model whose template we use.
    source = "instruct" if tokenizer == "instruct" else "thinking"
    cfg = cfg_i if source == "instruct" else cfg_t
    return ModelPair(cfg, params_i, params_t, tok, schedule, GenerationIds.from_hf(dirs[source]))


def generate_pair(pair: ModelPair, prompts: list[list[int]], lam, max_new_tokens: int, *,
                  mode: str = "delta", sampling=Greedy(), seed: int = 0, stop_tokens=None,
                  max_cache: int | None = None, max_rows: int | None = None,
                  kv_bytes: int | None = None, **pixel_inputs) -> GenerateOutput:
    """Generate each prompt at its own λ (lam: a scalar or one value per prompt).

    max_cache: tokens one sequence may hold, prompt included (default: the model's context);
    a row that reaches it ends with "length" and sets `cache_full`. In delta mode it is a
    capacity, not a cost. max_rows, kv_bytes: the engine's rows at once and KV pool (delta
    mode; `engine.offline.sized_engine`).
    pixel_inputs: Qwen3-VL images / video of the batch as transformers takes them
    (pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw); merged mode then runs
    one lock-step batch per distinct λ, each with its rows' images.
    """
    b = len(prompts)
    lam = np.broadcast_to(check_lam(lam), (b,)) if np.ndim(lam) == 0 else check_lam(lam)
    if lam.shape != (b,):
        raise ValueError(f"lam has {lam.shape[0]} values for {b} prompts")
    stops = pair.stop_tokens if stop_tokens is None else stop_tokens
    if mode == "delta":
        if not prompts:
            raise InputError("prompts is empty")
        engine = sized_engine(pair, None, prompts, max_new_tokens, max_cache=max_cache, max_rows=max_rows,
                              kv_bytes=kv_bytes)
        return engine.generate(prompts, max_new_tokens, lam=lam, sampling=sampling, seed=seed, stop_tokens=stops,
                               **pixel_inputs)
    if mode != "merged":
        raise ValueError(f"mode must be 'delta' or 'merged', got {mode!r}")
    kw = dict(sampling=sampling, seed=seed, stop_tokens=stops, max_cache=max_cache)
    if any(v is not None for v in pixel_inputs.values()):
        return _merged_with_pixels(pair, prompts, lam, max_new_tokens, pixel_inputs, **kw)
    values = sorted(set(lam.tolist()))
    if len(values) == 1:
        return generate_lockstep(pair.cfg, pair.merged(values[0]), prompts, max_new_tokens, **kw)
    rows = [[i for i in range(b) if lam[i] == v] for v in values]
    outs = generate_stacked(pair.cfg, pair.merged(np.asarray(values, np.float32)),
                            [[prompts[i] for i in r] for r in rows], max_new_tokens,
                            row_id_groups=rows, **kw)
    return scatter_rows(outs, rows, b, max_new_tokens)


def _merged_with_pixels(pair: ModelPair, prompts, lam, max_new_tokens: int, pixel_inputs: dict,
                        **kw) -> GenerateOutput:
    """Merged mode for prompts with images: one lock-step batch per distinct λ, with its rows' images."""
    values = sorted(set(lam.tolist()))
    rows = [[i for i in range(len(prompts)) if lam[i] == v] for v in values]
    outs = [generate_lockstep(pair.cfg, pair.merged(v), [prompts[i] for i in r], max_new_tokens, row_ids=r,
                              **kw, **select_rows(pair.cfg, prompts, pixel_inputs, r))
            for v, r in zip(values, rows)]
    return scatter_rows(outs, rows, len(prompts), max_new_tokens)


def sweep(pair: ModelPair, prompts: list[list[int]], lams, max_new_tokens: int, *,
          sampling=Greedy(), seed: int = 0, stop_tokens=None, max_cache: int | None = None,
          max_rows: int | None = None, kv_bytes: int | None = None) -> list[GenerateOutput]:
    """Every prompt at every λ of the grid: one output per λ, row i of each sampled with row id i
    (as separate `generate_pair` calls would). All (λ, prompt) rows share one engine in delta
    mode: 2x the weight bytes whatever the grid's size, not one model per λ."""
    lams = check_lam(lams, what="lam grid")
    if lams.ndim != 1 or lams.size == 0:
        raise ValueError("the λ grid must be a non-empty 1-D list")
    if not prompts:
        raise InputError("prompts is empty")
    stops = pair.stop_tokens if stop_tokens is None else stop_tokens
    b = len(prompts)
    rows = [list(p) for p in prompts] * lams.size
    engine = sized_engine(pair, None, rows, max_new_tokens, max_cache=max_cache, max_rows=max_rows,
                          kv_bytes=kv_bytes)
    reqs = engine.run_batch(rows, max_new_tokens, lam=np.repeat(lams, b), sampling=sampling, seed=seed,
                            stop_tokens=stops, row_ids=list(range(b)) * lams.size)
    return [outputs(reqs[k * b: (k + 1) * b]) for k in range(lams.size)]


def scatter_rows(outs: list[GenerateOutput], rows: list[list[int]], b: int, n: int) -> GenerateOutput:
    """One (b, n) output from outputs of row groups: outs[k]'s rows go to rows[k]."""
    tokens = np.zeros((b, n), np.int32)
    lengths = np.zeros((b,), np.int32)
    reasons = [""] * b
    for out, idx in zip(outs, rows):
        tokens[idx] = out.tokens
        lengths[idx] = out.lengths
        for j, i in enumerate(idx):
            reasons[i] = out.finish_reasons[j]
    return GenerateOutput(tokens, lengths, reasons, any(o.cache_full for o in outs))
