"""Output-control baseline `budget:<n>`: the Thinking model, thinking cut at n tokens.

Phase 1 generates up to n tokens, stopping at EOS or `</think>`. Rows that hit
the budget still thinking get `</think>` (plus the separator the template puts
after it) forced; then phase 2 generates the answer. Rows that closed their
thinking within the budget simply continue, and rows that ended at EOS are done.
"""

from __future__ import annotations

import numpy as np

from dami_jax.generate.decode import GenerateOutput, generate
from dami_jax.generate.sampling import Greedy
from dami_jax.policies.base import Policy, PolicyResult, register_policy
from dami_jax.thinking import THINK_END


class BudgetPolicy(Policy):
    """λ = 1 for every prompt, with a thinking budget that generation honours."""

    def __init__(self, pair=None, tokens: int = 512):
        del pair
        if int(tokens) < 1:
            raise ValueError(f"budget must be >= 1 token, got {tokens}")
        self.thinking_budget = int(tokens)
        self.spec = f"budget:{self.thinking_budget}"

    def __call__(self, prompts, pair) -> PolicyResult:
        b = len(prompts)
        return PolicyResult(np.ones(b, np.float32), {"budget": np.full(b, self.thinking_budget)})


def think_end_ids(tokenizer) -> tuple[int, list[int]]:
    """(id of `</think>`, ids forced at the cut: `</think>` and the blank line after it)."""
    ids = tokenizer.encode(THINK_END, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the tokenizer splits {THINK_END!r} into {len(ids)} tokens; expected one")
    return ids[0], tokenizer.encode(THINK_END + "\n\n", add_special_tokens=False)


def generate_budget(pair, prompts: list[list[int]], budget: int, max_new_tokens: int, *,
                    sampling=Greedy(), seed: int = 0, stop_tokens=None) -> GenerateOutput:
    """Thinking-model generation with thinking cut at `budget` tokens (max_new_tokens in all)."""
    if pair.tokenizer is None:
        raise ValueError("budget generation needs the pair's tokenizer (to find </think>)")
    end_id, forced = think_end_ids(pair.tokenizer)
    stops = list(pair.stop_tokens if stop_tokens is None else stop_tokens)
    budget = min(budget, max_new_tokens)
    first = generate(pair.cfg, pair.thinking, prompts, budget, sampling=sampling, seed=seed,
                     stop_tokens=stops + [end_id])
    heads = first.token_lists()
    pending = []
    for i, head in enumerate(heads):
        if head and head[-1] in stops:
            continue  # answered (EOS) within the budget
        if not (head and head[-1] == end_id):
            heads[i] = head + forced  # cut: close the thinking ourselves
        pending.append(i)
    room = max_new_tokens - max([len(heads[i]) for i in pending], default=0)
    tails, reasons = {}, {i: first.finish_reasons[i] for i in range(len(prompts))}
    if pending and room > 0:
        second = generate(pair.cfg, pair.thinking, [prompts[i] + heads[i] for i in pending], room,
                          sampling=sampling, seed=seed + 1, stop_tokens=stops)
        for j, i in enumerate(pending):
            tails[i] = second.token_lists()[j]
            reasons[i] = second.finish_reasons[j]
    else:
        reasons.update({i: "length" for i in pending})
    rows = [heads[i] + tails.get(i, []) for i in range(len(prompts))]
    width = max(1, max(len(r) for r in rows))
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return GenerateOutput(tokens, np.array([len(r) for r in rows], np.int32),
                          [reasons[i] for i in range(len(rows))])


register_policy("budget", BudgetPolicy, lambda args: {"tokens": int(args[0])})
