"""Answer prompts with a policy: λ per prompt, then generation (what eval and serve run)."""

from __future__ import annotations

import numpy as np

from dami_jax.generate.decode import GenerateOutput
from dami_jax.generate.sampling import Greedy
from dami_jax.pair import generate_pair, scatter_rows
from dami_jax.policies.base import Policy, PolicyResult


def answer(pair, policy: Policy, prompts: list[list[int]], max_new_tokens: int, *,
           sampling=Greedy(), seed: int = 0, mode: str = "delta",
           max_rows: int | None = None, kv_bytes: int | None = None) -> tuple[GenerateOutput, PolicyResult]:
    """Run `policy` on the prompts and generate each at its λ (or with its thinking budget) on
    the engine (max_rows, kv_bytes: its size, `engine.offline.sized_engine`).

    Greedy rows at λ = 0 whose answer the policy already generated (`instruct_answers`: Conf's
    probe ran to a stop id) take it as it is: no token is generated twice."""
    chosen = policy(prompts, pair)
    budget = getattr(policy, "thinking_budget", None)
    kw = dict(mode=mode, sampling=sampling, seed=seed, max_rows=max_rows, kv_bytes=kv_bytes)
    if budget is not None:
        from dami_jax.policies.budget import generate_budget

        return generate_budget(pair, prompts, budget, max_new_tokens, **kw), chosen
    known = reusable_answers(chosen, sampling, max_new_tokens)
    reused = [i for i, ids in enumerate(known) if ids is not None]
    todo = [i for i, ids in enumerate(known) if ids is None]
    if not reused:
        return generate_pair(pair, prompts, chosen.lam, max_new_tokens, **kw), chosen
    tokens = np.zeros((len(reused), max_new_tokens), np.int32)
    for j, i in enumerate(reused):
        tokens[j, : len(known[i])] = known[i]
    groups = [(GenerateOutput(tokens, np.array([len(known[i]) for i in reused], np.int32), ["stop"] * len(reused)),
               reused)]
    if todo:
        groups.append((generate_pair(pair, [prompts[i] for i in todo], chosen.lam[todo], max_new_tokens, **kw), todo))
    return scatter_rows([o for o, _ in groups], [r for _, r in groups], len(prompts), max_new_tokens), chosen


def reusable_answers(chosen: PolicyResult, sampling, max_new_tokens: int) -> list:
    """Per row, the answer generation would repeat (greedy, λ = 0, already generated in full within
    max_new_tokens), else None."""
    answers = chosen.instruct_answers
    if answers is None or not isinstance(sampling, Greedy):
        return [None] * len(chosen.lam)
    return [ids if lam == 0.0 and ids is not None and len(ids) <= max_new_tokens else None
            for lam, ids in zip(chosen.lam, answers)]
