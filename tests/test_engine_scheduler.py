"""The scheduler alone (no model): random requests through a small pool, tokens made up.

Every plan respects the rows, the token budget and decode-first order; every request
finishes with its own number of tokens; no page leaks; reserve mode never preempts.
"""

from __future__ import annotations

import numpy as np
import pytest

from dami_jax.engine.pages import PageAllocator
from dami_jax.engine.scheduler import Request, RequestRefused, Scheduler, ThinkingBudget
from dami_jax.errors import InputError

STOP = 7  # the made-up model emits it now and then


def _request(rid, rng, context):
    n = int(rng.integers(1, context // 2))
    return Request(rid=rid, prompt=rng.integers(8, 100, n).tolist(), max_new_tokens=int(rng.integers(1, 24)),
                   lam=0.0, temperature=0.0, top_k=0, top_p_cut=0.0, stop_ids=frozenset({STOP}), seed=0,
                   row_id=rid)


@pytest.mark.parametrize("reserve", [False, True])
def test_random_requests_all_finish_within_the_limits(reserve):
    rng = np.random.default_rng(1)
    context, max_rows, max_tokens = 48, 5, 12
    alloc = PageAllocator(num_pages=20, page_size=4, max_pages_per_seq=12)
    sched = Scheduler(alloc, max_rows=max_rows, max_tokens=max_tokens, context=context, reserve=reserve)
    reqs = [_request(i, rng, context) for i in range(120)]
    for req in reqs[:60]:
        sched.add(req)
    finished, steps = [], 0
    while not sched.idle or len(finished) < len(reqs):
        if steps == 20:  # more work arrives while rows run
            for req in reqs[60:]:
                sched.add(req)
        before = list(sched.running)
        plan = sched.plan()
        assert plan, "nothing planned while work is waiting"
        q_lens = [q for _, q in plan]
        assert len(plan) <= max_rows and sum(q_lens) <= max_tokens
        # Rows that were running come first, their decode rows before their prefill chunks.
        was_running = [req in before for req, _ in plan]
        assert was_running == sorted(was_running, reverse=True)
        decode = [req.pending == 1 for req, _ in plan if req in before]
        assert decode == sorted(decode, reverse=True)
        for req, q in plan:
            assert alloc.length(req.rid) == req.computed + q  # pages hold the tokens being fed
        tokens = [STOP if rng.random() < 0.05 else int(rng.integers(8, 100)) for _ in plan]
        finished += sched.commit(plan, tokens)
        steps += 1
        assert steps < 10_000
    assert sorted(r.rid for r in finished) == list(range(len(reqs)))
    for req in reqs:
        n = len(req.generated)
        if req.finish_reason == "stop":
            assert req.generated[-1] == STOP and n <= req.max_new_tokens
        else:
            assert n == req.max_new_tokens or len(req.prompt) + n == context
    assert alloc.num_free == alloc.num_usable and not alloc.sequences()
    assert (sched.preemptions == 0) if reserve else (sched.preemptions > 0)


def test_refusals_name_the_numbers():
    sched = Scheduler(PageAllocator(num_pages=5, page_size=4, max_pages_per_seq=8), max_rows=2, max_tokens=8,
                      context=32)
    rng = np.random.default_rng(0)
    req = _request(3, rng, 32)
    req.prompt = [9] * 32
    with pytest.raises(RequestRefused, match="request 3: prompt of 32 tokens does not fit the context of 32"):
        sched.add(req)
    req.prompt, req.max_new_tokens = [9] * 10, 10
    with pytest.raises(RequestRefused, match=r"request 3: 10 prompt \+ up to 10 new tokens need 5 pages of 4 "
                                             r"tokens, more than the pool's 4 usable pages"):
        sched.add(req)
    assert sched.idle


def _decode(sched, req, tokens):
    """Feed made-up sampled tokens one step at a time (prefill chunks take their step too)."""
    for token in tokens:
        plan = sched.plan()
        assert [r for r, _ in plan] == [req]
        sched.commit(plan, [token])
        if req.finished:
            break


@pytest.mark.parametrize("sampled, want", [
    # no </think> in the first 3 tokens: </think> (5) and the separator (6) are forced after them
    ([20, 21, 22, 30, 31, 32], [20, 21, 22, 5, 6, 30, 31, 32]),
    # </think> sampled within the budget: nothing is forced
    ([20, 5, 22, 30, 31, 32, 33, 34], [20, 5, 22, 30, 31, 32, 33, 34]),
])
def test_thinking_budget_forces_the_end_of_thinking(sampled, want):
    sched = Scheduler(PageAllocator(num_pages=20, page_size=4, max_pages_per_seq=8), max_rows=2, max_tokens=8,
                      context=32)
    rng = np.random.default_rng(0)
    req = _request(0, rng, 32)
    req.prompt, req.max_new_tokens, req.stop_ids = [9] * 4, 8, frozenset()
    req.budget = ThinkingBudget(3, end_id=5, forced=(5, 6))
    sched.add(req)
    _decode(sched, req, sampled)
    assert req.generated == want and req.finish_reason == "length" and req.thinking_closed


def test_thinking_budget_forced_tokens_stop_at_max_new_tokens():
    sched = Scheduler(PageAllocator(num_pages=20, page_size=4, max_pages_per_seq=8), max_rows=2, max_tokens=8,
                      context=32)
    req = _request(0, np.random.default_rng(0), 32)
    req.prompt, req.max_new_tokens, req.stop_ids = [9] * 4, 4, frozenset()
    req.budget = ThinkingBudget(3, end_id=5, forced=(5, 6))
    sched.add(req)
    _decode(sched, req, [20, 21, 22])
    assert req.generated == [20, 21, 22, 5] and req.finish_reason == "length"
    assert sched.decode_steps(req, 8) <= 0 and sched.idle
    with pytest.raises(InputError, match="must contain the end id 5"):
        ThinkingBudget(3, end_id=5, forced=(6,))
