"""dj.Engine against the lock-step generator (`generate.decode.generate` over a dense cache,
HF-exact; `lockstep` below runs it on the pair's delta params as generate_pair once did).

Pairs of tiny random checkpoints (dense and MoE) in delta mode, a different λ per row,
prompts of different lengths, more requests than rows, prompts longer than a step's token
budget (chunked prefill), a pool small enough to force preemption, and reserve mode.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import dami_jax as dj
from helpers import random_prompts
from dami_jax.engine.scheduler import RequestRefused
from dami_jax.generate.decode import generate_lockstep as lockstep_generate

LAMS = np.array([0.0, 0.3, 0.55, 0.8, 1.0, 0.3, 0.1, 0.9], np.float32)
LENGTHS = [5, 9, 3, 12, 7, 4, 20, 2]
NEW = 10
# 3 rows and 8 tokens a step: 8 requests queue, and the 9-, 12- and 20-token prompts are chunked.
SMALL = dict(page_size=4, max_rows=3, max_tokens_per_step=8)


@pytest.fixture(scope="module", params=["dense_gqa", "moe_norm"])
def pair(request, tiny_hf):
    return dj.load_pair(tiny_hf(request.param, 0).path, tiny_hf(request.param, 1).path, tokenizer="none")


@pytest.fixture(scope="module")
def prompts(pair):
    return random_prompts(pair.cfg.vocab_size, LENGTHS, seed=1)


@pytest.fixture(scope="module")
def want(pair, prompts):
    return lockstep(pair, prompts, LAMS, NEW)


def lockstep(pair, prompts, lam, n, **kw):
    kw.setdefault("stop_tokens", pair.stop_tokens)
    return lockstep_generate(pair.cfg, pair.delta, prompts, n, lam=np.broadcast_to(lam, (len(prompts),)), **kw)


def _assert_same(got, want):
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    assert got.finish_reasons == want.finish_reasons


def test_greedy_tokens_equal_generate_pair(pair, prompts, want):
    eng = dj.Engine(pair, num_pages=64, **SMALL)
    _assert_same(eng.generate(prompts, NEW, lam=LAMS), want)
    assert eng.sched.preemptions == 0
    assert eng.idle and not eng.finished  # generate takes its results back out
    # 8 requests in 3 rows: some wait; no step ran more than 8 tokens
    assert eng.stats["padded_tokens"] <= 16 * eng.stats["steps"]
    assert eng.stats["tokens"] == sum(LENGTHS) + len(LENGTHS) * (NEW - 1)  # every token once
    assert eng.stats["calls"] < eng.stats["steps"]  # decode bursts ran several steps per call


def test_single_steps_equal_bursts(pair, prompts, want):
    eng = dj.Engine(pair, num_pages=64, decode_burst=1, **SMALL)
    _assert_same(eng.generate(prompts, NEW, lam=LAMS), want)
    assert eng.stats["calls"] == eng.stats["steps"]


def test_preemption_by_recompute_keeps_the_tokens(pair, prompts, want):
    # 9 usable pages of 4 tokens: the longest request (30 tokens, 8 pages) fits alone only.
    eng = dj.Engine(pair, num_pages=10, page_size=4, max_rows=4, max_tokens_per_step=16)
    _assert_same(eng.generate(prompts, NEW, lam=LAMS), want)
    assert eng.sched.preemptions > 0
    assert eng.stats["tokens"] > sum(LENGTHS) + len(LENGTHS) * (NEW - 1)  # recomputed tokens
    assert eng.sched.alloc.num_free == eng.sched.alloc.num_usable  # every page back


def test_reserve_mode_never_preempts(pair, prompts, want):
    eng = dj.Engine(pair, num_pages=10, page_size=4, max_rows=4, max_tokens_per_step=16, reserve=True)
    _assert_same(eng.generate(prompts, NEW, lam=LAMS), want)
    assert eng.sched.preemptions == 0
    assert eng.stats["tokens"] == sum(LENGTHS) + len(LENGTHS) * (NEW - 1)


def test_stop_tokens_per_row(pair, prompts, want):
    # Stop each row at its own 4th token (and row 1 never: an id it does not produce).
    stops = [[int(want.tokens[i, 3])] for i in range(len(prompts))]
    stops[1] = [pair.cfg.vocab_size - 1] if pair.cfg.vocab_size - 1 not in want.tokens[1] else []
    ref = lockstep(pair, prompts, LAMS, NEW, stop_tokens=stops)
    got = dj.Engine(pair, num_pages=64, **SMALL).generate(prompts, NEW, lam=LAMS, stop_tokens=stops)
    _assert_same(got, ref)
    assert got.finish_reasons[1] == "length" and got.finish_reasons.count("stop") == len(prompts) - 1


def test_sampled_tokens_reproducible_and_independent_of_the_batch(pair, prompts):
    sampling = dj.Sample(temperature=0.9, top_k=20, top_p=0.95)
    ref = lockstep(pair, prompts, LAMS, NEW, sampling=sampling, seed=7)
    eng = dj.Engine(pair, num_pages=64, **SMALL)
    got = eng.generate(prompts, NEW, lam=LAMS, sampling=sampling, seed=7)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    # Rows 6 and 2 alone, in another order and another engine shape: the same tokens.
    alone = dj.Engine(pair, num_pages=64, page_size=8, max_rows=2, max_tokens_per_step=32).generate(
        [prompts[6], prompts[2]], NEW, lam=LAMS[[6, 2]], sampling=sampling, seed=7, row_ids=[6, 2])
    np.testing.assert_array_equal(alone.tokens, ref.tokens[[6, 2]])
    other_seed = eng.generate(prompts, NEW, lam=LAMS, sampling=sampling, seed=8)
    assert (other_seed.tokens != ref.tokens).any()


def test_plain_params_equal_generate(tiny_hf):
    ckpt = tiny_hf("dense_tied", 0)
    prompts = random_prompts(ckpt.cfg.vocab_size, [6, 11, 3], seed=2)
    want = dj.generate(ckpt.cfg, ckpt.params(), prompts, 7)
    eng = dj.Engine(ckpt.cfg, ckpt.params(), num_pages=32, **SMALL)
    _assert_same(eng.generate(prompts, 7), want)
    # A limit per prompt: each row stops at its own.
    got = eng.generate(prompts, [7, 2, 5])
    assert got.lengths.tolist() == [7, 2, 5] and got.tokens.shape == (3, 7)
    for i, n in enumerate([7, 2, 5]):
        np.testing.assert_array_equal(got.tokens[i, :n], want.tokens[i, :n])
        assert not got.tokens[i, n:].any()


def test_submit_step_poll_refill_and_refusals(pair, prompts, want):
    eng = dj.Engine(pair, num_pages=10, page_size=4, max_rows=2, max_tokens_per_step=16, max_context=40)
    ids = [eng.submit(prompts[i], NEW, lam=float(LAMS[i]), row_id=i) for i in (0, 2, 5)]
    eng.step()  # two rows run, the third waits
    assert [r.rid for r in eng.sched.running] == ids[:2] and [r.rid for r in eng.sched.waiting] == ids[2:]
    with pytest.raises(RequestRefused, match="prompt of 40 tokens does not fit the context of 40 tokens"):
        eng.submit([1] * 40, 4, lam=0.5)
    with pytest.raises(RequestRefused, match=r"30 prompt \+ up to 10 new tokens need 10 pages of 4 tokens, "
                                             r"more than the pool's 9 usable pages"):
        eng.submit([1] * 30, NEW, lam=0.5)
    with pytest.raises(RequestRefused, match="delta-mode params need a λ"):
        eng.submit([1, 2], 4)
    while eng.poll(ids[0]) is None:
        assert eng.poll(ids[2]) is None
        eng.step()
    assert [r.rid for r in eng.sched.waiting] == ids[2:]
    eng.step()  # the very next step after rows left admits it
    assert [r.rid for r in eng.sched.running] == ids[2:] and not eng.sched.waiting
    eng.run()
    for i, rid in zip((2, 5), ids[1:]):
        req = eng.poll(rid)
        assert req.generated == want.tokens[i].tolist() and req.finish_reason == "length"
    assert eng.idle and eng.poll(ids[1]) is None  # polled once


def test_pool_smaller_than_one_page_is_refused(pair):
    page = 2 * pair.cfg.num_layers * pair.cfg.num_kv_heads * 4 * pair.cfg.head_dim * 4  # float32 bytes
    with pytest.raises(dj.InputError, match=rf"a KV budget of {page} bytes holds 1 page\(s\) of {page} bytes "
                                            rf".*at least {2 * page} bytes"):
        dj.Engine(pair, kv_bytes=page, page_size=4)
    with pytest.raises(dj.InputError, match="a pool of 1 page"):
        dj.Engine(pair, num_pages=1, page_size=4)
    eng = dj.Engine(pair, kv_bytes=20 * page, page_size=4)
    assert eng.sched.alloc.num_pages == 20 and eng.pool_bytes == 20 * page


def test_context_end_is_reported_as_length(pair, prompts):
    eng = dj.Engine(pair, num_pages=64, page_size=4, max_context=16)
    got = eng.generate([prompts[3]], NEW, lam=0.5)  # 12 tokens: 4 fit before the context ends
    assert got.lengths.tolist() == [4] and got.finish_reasons == ["length"] and got.cache_full
    ref = lockstep(pair, [prompts[3]], 0.5, 4)
    np.testing.assert_array_equal(got.tokens[:, :4], ref.tokens)


def test_decode_bursts_with_the_pallas_gpu_kernel_equal_generate_pair(pair, prompts, want):
    """The kernel (Pallas's interpreter on the CPU) in decode bursts, XLA in prefill steps."""
    if pair.cfg.num_experts:
        pytest.skip("one architecture is enough: the kernel sees only attention")
    kernel_pair = dataclasses.replace(pair, cfg=dataclasses.replace(pair.cfg, paged_attention="pallas_gpu"))
    eng = dj.Engine(kernel_pair, num_pages=64, **SMALL)
    _assert_same(eng.generate(prompts, NEW, lam=LAMS), want)
    assert eng.stats["calls"] < eng.stats["steps"]
