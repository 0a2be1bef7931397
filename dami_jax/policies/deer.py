"""`deer` / `deer:<threshold>`: dynamic early exit (DEER, arXiv 2504.15895), a baseline.

The model at λ (the Thinking model by default) thinks in chunks that end at a transition
string (`Wait`). At each, a trial answer is probed: the answer inducer is appended and up
to 20 tokens are generated; if their confidence (geometric mean of the tokens' max
probabilities, by default) reaches the threshold, the thinking is closed and the answer
generated, else the probe is dropped and the thinking goes on from `Wait`. The rule is the
engine scheduler's (engine/early_exit.py): a probe forks from its row and shares its KV
pages, so the server and `generate_deer` exit alike.

As in the reference script (iie-ycx/DEER, `vllm-deer-qwen3.py`): the trigger is dropped on
exit and `\\n</think>\\n\\n` written instead; thinking is cut at think_ratio of the token
budget; a trial answer counts only if it ends with `</think>` (`answer_end`; the toy's is
`}`), else its confidence is 0. Unlike it: the trial answer is greedy; its confidence counts
all of its tokens (the reference skips the first, the `{` after its `\\boxed`; the toy's
inducer ends in `\\boxed{`, so its first token is the answer); there is no cap on the number
of probes.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np

from dami_jax.engine.early_exit import EarlyExit, Probe
from dami_jax.engine.engine import outputs
from dami_jax.engine.offline import sized_engine
from dami_jax.errors import InputError
from dami_jax.generate.decode import GenerateOutput
from dami_jax.generate.sampling import Greedy
from dami_jax.policies.base import Policy, PolicyResult, register_policy
from dami_jax.policies.budget import think_end_ids
from dami_jax.policies.deer_config import DeerConfig, parse_deer_arg


def encode_exactly(tokenizer, text: str, field: str) -> tuple[int, ...]:
    """The ids of `text`, refused when the tokenizer cannot encode it (unknown tokens, or ids that
    do not decode back to it)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    decoded = tokenizer.decode(ids) if ids else ""
    if not ids or (unk is not None and unk in ids) or decoded != text:
        raise InputError(f"deer: the tokenizer cannot encode the {field} {text!r}: it gives ids {ids}, which decode "
                         f"to {decoded!r}; set deer.{field} to a string in its vocabulary")
    return tuple(ids)


def deer_rule(tokenizer, settings: DeerConfig) -> EarlyExit:
    """The engine's early-exit rule for `settings`, in this tokenizer's ids. The trigger matches
    as written and, where the tokenizer encodes that differently, after a space (`Wait`, ` Wait`)."""
    if tokenizer is None:
        raise InputError("deer needs the pair's tokenizer (to encode its trigger and inducer)")
    end_id, _ = think_end_ids(tokenizer)
    triggers = [encode_exactly(tokenizer, settings.trigger, "trigger")]
    spaced = " " + settings.trigger
    spaced_ids = tuple(tokenizer.encode(spaced, add_special_tokens=False))
    if spaced_ids not in triggers and tokenizer.decode(list(spaced_ids)) == spaced:
        triggers.append(spaced_ids)
    answer_end = encode_exactly(tokenizer, settings.answer_end, "answer_end")
    if len(answer_end) != 1:
        raise InputError(f"deer: answer_end {settings.answer_end!r} is {len(answer_end)} tokens {answer_end}; "
                         f"expected one")
    return EarlyExit(triggers=tuple(triggers), inducer=encode_exactly(tokenizer, settings.inducer, "inducer"),
                     close=encode_exactly(tokenizer, settings.close, "close"), end_id=end_id, answer_end=answer_end[0],
                     threshold=settings.threshold, confidence=settings.confidence,
                     probe_tokens=settings.probe_tokens, think_ratio=settings.think_ratio)


class DeerPolicy(Policy):
    """λ = settings.lam for every prompt, with the early-exit rule that generation honours."""

    def __init__(self, settings: DeerConfig = DeerConfig(), pair=None):
        self.settings = settings
        # Built with the pair: a trigger its tokenizer cannot encode fails here, not mid-run.
        self.early_exit = None if pair is None or pair.tokenizer is None else deer_rule(pair.tokenizer, settings)
        self.spec = f"deer:{settings.threshold:g}"  # the other settings come from the pair config (`deer:`)

    def __call__(self, prompts, pair, **pixel_inputs) -> PolicyResult:  # λ does not read the prompts
        return PolicyResult(np.full(len(prompts), self.settings.lam, np.float32), {})

    def __repr__(self) -> str:
        return f"DeerPolicy({self.settings})"


def make_deer(pair=None, **options) -> DeerPolicy:
    return DeerPolicy(DeerConfig(**options), pair)


# Its options are DeerConfig's fields (build_policy checks a dict's keys against this signature).
make_deer.__signature__ = inspect.Signature(
    [inspect.Parameter("pair", inspect.Parameter.KEYWORD_ONLY, default=None)]
    + [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
       for f in dataclasses.fields(DeerConfig)])


def generate_deer(pair, prompts: list[list[int]], max_new_tokens: int, rule: EarlyExit, *, lam: float = 1.0,
                  sampling=Greedy(), seed: int = 0, stop_tokens=None, mode: str = "delta",
                  max_rows: int | None = None, kv_bytes: int | None = None, **pixel_inputs
                  ) -> tuple[GenerateOutput, list[list[Probe]]]:
    """Generation at λ under early exit, in one engine run: the outputs (probe tokens never in
    them) and each row's probes. The engine holds, per row, pages for one probe besides the row.
    pixel_inputs: Qwen3-VL images / video of the batch, as `generate_pair` takes them (a probe
    sees its row's images)."""
    stops = pair.stop_tokens if stop_tokens is None else stop_tokens
    probe = len(rule.inducer) + rule.probe_tokens
    size = dict(max_rows=max_rows, kv_bytes=kv_bytes, probe_tokens=probe)
    if mode == "delta":
        engine, lam_run = sized_engine(pair, None, prompts, max_new_tokens, **size), lam
    elif mode == "merged":
        engine, lam_run = sized_engine(pair.cfg, pair.merged(lam), prompts, max_new_tokens, **size), None
    else:
        raise InputError(f"mode must be 'delta' or 'merged', got {mode!r}")
    reqs = engine.run_batch(prompts, max_new_tokens, lam=lam_run, sampling=sampling, seed=seed, stop_tokens=stops,
                            early_exit=rule, pixel_inputs=pixel_inputs)
    return outputs(reqs), [req.probes for req in reqs]


register_policy("deer", make_deer, parse_deer_arg)
