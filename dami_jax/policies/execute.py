"""Answer prompts with a policy: λ per prompt, then generation (what eval and serve run)."""

from __future__ import annotations

from dami_jax.generate.decode import GenerateOutput
from dami_jax.generate.sampling import Greedy
from dami_jax.pair import generate_pair
from dami_jax.policies.base import Policy, PolicyResult


def answer(pair, policy: Policy, prompts: list[list[int]], max_new_tokens: int, *,
           sampling=Greedy(), seed: int = 0, mode: str = "delta") -> tuple[GenerateOutput, PolicyResult]:
    """Run `policy` on the prompts and generate each at its λ (or with its thinking budget)."""
    chosen = policy(prompts, pair)
    budget = getattr(policy, "thinking_budget", None)
    if budget is not None:
        from dami_jax.policies.budget import generate_budget

        out = generate_budget(pair, prompts, budget, max_new_tokens, sampling=sampling, seed=seed, mode=mode)
    else:
        out = generate_pair(pair, prompts, chosen.lam, max_new_tokens, mode=mode, sampling=sampling, seed=seed)
    return out, chosen
