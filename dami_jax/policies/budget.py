"""Output-control baseline `budget:<n>`: the Thinking model, thinking cut at n tokens.

Per row: the first n tokens are generated as usual. A row that ends (EOS) or
closes its thinking (`</think>`) within them simply goes on; a row still
thinking after n tokens gets `</think>` (plus the separator the template puts
after it) forced, then generates its answer. The output never passes
max_new_tokens (forced tokens count). The Thinking model is the pair at λ = 1;
the cut is the engine scheduler's rule, so the server and `generate_budget`
cut alike.
"""

from __future__ import annotations

import numpy as np

from dami_jax.engine.engine import outputs
from dami_jax.engine.offline import sized_engine
from dami_jax.engine.scheduler import ThinkingBudget
from dami_jax.errors import InputError
from dami_jax.generate.decode import GenerateOutput
from dami_jax.generate.sampling import Greedy
from dami_jax.policies.base import Policy, PolicyResult, register_policy
from dami_jax.thinking import THINK_END


class BudgetPolicy(Policy):
    """λ = 1 for every prompt, with a thinking budget that generation honours."""

    def __init__(self, pair=None, tokens: int = 512):
        if int(tokens) < 1:
            raise InputError(f"budget must be >= 1 token, got {tokens}")
        if pair is not None and pair.tokenizer is not None:
            think_end_ids(pair.tokenizer)  # a tokenizer without one `</think>` token fails here, not later
        self.thinking_budget = int(tokens)
        self.spec = f"budget:{self.thinking_budget}"

    def __call__(self, prompts, pair, **pixel_inputs) -> PolicyResult:  # λ does not read the prompts
        b = len(prompts)
        return PolicyResult(np.ones(b, np.float32), {"budget": np.full(b, self.thinking_budget)})


def think_end_ids(tokenizer) -> tuple[int, list[int]]:
    """(id of `</think>`, ids forced at the cut: `</think>` and the blank line after it)."""
    ids = tokenizer.encode(THINK_END, add_special_tokens=False)
    if len(ids) != 1:
        raise InputError(f"the tokenizer splits {THINK_END!r} into {len(ids)} tokens; expected one")
    return ids[0], tokenizer.encode(THINK_END + "\n\n", add_special_tokens=False)


def generate_budget(pair, prompts: list[list[int]], budget: int, max_new_tokens: int, *,
                    sampling=Greedy(), seed: int = 0, stop_tokens=None, mode: str = "delta",
                    max_rows: int | None = None, kv_bytes: int | None = None, **pixel_inputs) -> GenerateOutput:
    """Thinking-model (λ = 1) generation with thinking cut at `budget` tokens (max_new_tokens in
    all), in one engine run: the cut is a scheduler rule (`engine.scheduler.ThinkingBudget`).
    pixel_inputs: Qwen3-VL images / video of the batch, as `generate_pair` takes them."""
    if pair.tokenizer is None:
        raise InputError("budget generation needs the pair's tokenizer (to find </think>)")
    end_id, forced = think_end_ids(pair.tokenizer)
    cut = ThinkingBudget(int(budget), end_id, tuple(forced))
    stops = pair.stop_tokens if stop_tokens is None else stop_tokens
    size = dict(max_rows=max_rows, kv_bytes=kv_bytes)
    if mode == "delta":
        engine, lam = sized_engine(pair, None, prompts, max_new_tokens, **size), 1.0
    elif mode == "merged":
        engine, lam = sized_engine(pair.cfg, pair.merged(1.0), prompts, max_new_tokens, **size), None
    else:
        raise InputError(f"mode must be 'delta' or 'merged', got {mode!r}")
    return outputs(engine.run_batch(prompts, max_new_tokens, lam=lam, sampling=sampling, seed=seed,
                                    stop_tokens=stops, budget=cut, pixel_inputs=pixel_inputs))


register_policy("budget", BudgetPolicy, lambda args: {"tokens": int(args[0])})
