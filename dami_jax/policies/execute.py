"""Answer prompts with a policy: λ per prompt, then generation (what eval and serve run)."""

from __future__ import annotations

from dami_jax.generate.decode import GenerateOutput
from dami_jax.generate.sampling import Greedy
from dami_jax.pair import generate_pair
from dami_jax.policies.base import Policy, PolicyResult


def answer(pair, policy: Policy, prompts: list[list[int]], max_new_tokens: int, *,
           sampling=Greedy(), seed: int = 0, mode: str = "delta",
           max_rows: int | None = None, kv_bytes: int | None = None) -> tuple[GenerateOutput, PolicyResult]:
    """Run `policy` on the prompts and generate each at its λ (or with its thinking budget) on
    the engine (max_rows, kv_bytes: its size, `engine.offline.sized_engine`)."""
    chosen = policy(prompts, pair)
    budget = getattr(policy, "thinking_budget", None)
    kw = dict(mode=mode, sampling=sampling, seed=seed, max_rows=max_rows, kv_bytes=kv_bytes)
    if budget is not None:
        from dami_jax.policies.budget import generate_budget

        out = generate_budget(pair, prompts, budget, max_new_tokens, **kw)
    else:
        out = generate_pair(pair, prompts, chosen.lam, max_new_tokens, **kw)
    return out, chosen
