"""Output-control baseline `budget:<n>`: the Thinking model, thinking cut at n tokens.

Per row: the first n tokens are generated as usual. A row that ends (EOS) or
closes its thinking (`</think>`) within them simply goes on; a row still
thinking after n tokens gets `</think>` (plus the separator the template puts
after it) forced, then generates its answer. The output never passes
max_new_tokens (forced tokens count). The Thinking model is the pair at λ = 1,
as the server decodes it (the engine's `ThinkingBudget` applies the same rule),
so served greedy tokens equal `generate_budget`'s.
"""

from __future__ import annotations

import numpy as np

from dami_jax.errors import InputError
from dami_jax.generate.decode import GenerateOutput
from dami_jax.generate.sampling import Greedy
from dami_jax.pair import generate_pair
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

    def __call__(self, prompts, pair) -> PolicyResult:
        b = len(prompts)
        return PolicyResult(np.ones(b, np.float32), {"budget": np.full(b, self.thinking_budget)})


def think_end_ids(tokenizer) -> tuple[int, list[int]]:
    """(id of `</think>`, ids forced at the cut: `</think>` and the blank line after it)."""
    ids = tokenizer.encode(THINK_END, add_special_tokens=False)
    if len(ids) != 1:
        raise InputError(f"the tokenizer splits {THINK_END!r} into {len(ids)} tokens; expected one")
    return ids[0], tokenizer.encode(THINK_END + "\n\n", add_special_tokens=False)


def generate_budget(pair, prompts: list[list[int]], budget: int, max_new_tokens: int, *,
                    sampling=Greedy(), seed: int = 0, stop_tokens=None, mode: str = "delta") -> GenerateOutput:
    """Thinking-model (λ = 1) generation with thinking cut at `budget` tokens (max_new_tokens in all).

    Two calls: the first `budget` tokens (stopping at EOS or `</think>`), then the rest of every
    row that has not ended, each row cut at its own max_new_tokens (rows do not affect each other).
    """
    if pair.tokenizer is None:
        raise InputError("budget generation needs the pair's tokenizer (to find </think>)")
    end_id, forced = think_end_ids(pair.tokenizer)
    stops = list(pair.stop_tokens if stop_tokens is None else stop_tokens)
    kw = dict(sampling=sampling, mode=mode)
    first = generate_pair(pair, prompts, 1.0, min(budget, max_new_tokens), seed=seed,
                          stop_tokens=stops + [end_id], **kw)
    rows, reasons, pending = first.token_lists(), list(first.finish_reasons), []
    for i, head in enumerate(rows):
        if head and head[-1] in stops:
            continue  # answered (EOS) within the budget
        if not (head and head[-1] == end_id):
            rows[i] = (head + forced)[:max_new_tokens]  # cut: close the thinking ourselves
        if len(rows[i]) < max_new_tokens:
            pending.append(i)
        else:
            reasons[i] = "length"
    if pending:
        room = max_new_tokens - min(len(rows[i]) for i in pending)
        second = generate_pair(pair, [prompts[i] + rows[i] for i in pending], 1.0, room, seed=seed + 1,
                               stop_tokens=stops, **kw)
        for i, tail, reason in zip(pending, second.token_lists(), second.finish_reasons):
            left = max_new_tokens - len(rows[i])
            rows[i] += tail[:left]
            reasons[i] = reason if len(tail) <= left and reason == "stop" else "length"
    width = max(1, max(len(r) for r in rows))
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return GenerateOutput(tokens, np.array([len(r) for r in rows], np.int32), reasons)


register_policy("budget", BudgetPolicy, lambda args: {"tokens": int(args[0])})
