"""The engine's paged model step (qwen3.paged_step) against the dense model (qwen3.forward).

Ragged prompts are prefilled in one step and in chunks beside decode rows, then decoded;
at every step each row's last-token logits must equal the full forward pass over its
sequence (float32, 1e-5). Delta mode with a different λ per row, dense and MoE pairs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_prompts
from dami_jax.engine.pages import PageAllocator
from dami_jax.models import qwen3
from dami_jax.pair import load_pair

PAGE, NUM_PAGES, MAX_PAGES = 4, 48, 8
LAMS = {"a": 0.0, "b": 0.3, "c": 1.0, "d": 0.7, "e": 0.55}
WIDTH = 32  # the reference forward pass: rows left-padded to one width (one compile)
_step = jax.jit(qwen3.paged_step, static_argnums=0, donate_argnums=2)


@pytest.fixture(scope="module", params=["dense_gqa", "moe_norm"])
def pair(request, tiny_hf):
    return load_pair(tiny_hf(request.param, 0).path, tiny_hf(request.param, 1).path, tokenizer="none")


class _Driver:
    """Sequences (known tokens: prompt, then greedy continuations) run through paged steps."""

    def __init__(self, cfg, params, delta: bool, prompts: dict):
        self.cfg, self.params, self.delta = cfg, params, delta
        self.alloc = PageAllocator(NUM_PAGES, PAGE, MAX_PAGES)
        self.known = {s: list(p) for s, p in prompts.items()}
        dtype = jax.tree.leaves(params)[0].dtype
        k, v = qwen3.init_pools(cfg, NUM_PAGES, PAGE, dtype)
        # Garbage in every slot: a read of a slot a row does not hold would show.
        garbage = lambda x: jnp.asarray(np.random.default_rng(0).normal(size=x.shape) * 1e2, x.dtype)
        self.pools = (jax.tree.map(garbage, k), jax.tree.map(garbage, v))

    def step(self, plan, num_rows=6, num_tokens=24):
        """plan: [(seq, q_len)]; feeds each row's next q_len known tokens, checks its logits."""
        tokens = np.zeros(num_tokens, np.int32)
        lam_t = np.zeros(num_tokens, np.float32)
        pos = 0
        for seq, q in plan:
            if seq not in self.alloc:
                self.alloc.admit(seq)
            start = self.alloc.length(seq)
            tokens[pos: pos + q] = self.known[seq][start: start + q]
            lam_t[pos: pos + q] = LAMS[seq]
            self.alloc.extend(seq, q)
            pos += q
        batch = self.alloc.ragged_batch(plan, num_rows, num_tokens)
        logits, self.pools = _step(self.cfg, self.params, self.pools, jnp.asarray(tokens),
                                   jax.tree.map(jnp.asarray, batch),
                                   jnp.asarray(lam_t) if self.delta else None)
        logits = np.asarray(logits)
        assert logits.shape == (num_rows, self.cfg.vocab_size)
        ref_tokens, mask = np.zeros((num_rows, WIDTH), np.int32), np.zeros((num_rows, WIDTH), np.int32)
        for r, (seq, _) in enumerate(plan):
            n = self.alloc.length(seq)
            ref_tokens[r, WIDTH - n:], mask[r, WIDTH - n:] = self.known[seq][:n], 1
        mask[len(plan):, -1] = 1
        lam = np.array([LAMS[s] for s, _ in plan] + [0.0] * (num_rows - len(plan)), np.float32)
        want = np.asarray(qwen3.forward(self.cfg, self.params, ref_tokens, mask, lam=lam if self.delta else None))
        for r, (seq, _) in enumerate(plan):
            n = self.alloc.length(seq)
            np.testing.assert_allclose(logits[r], want[r, -1], atol=1e-5, rtol=0, err_msg=f"{seq} at {n} tokens")
            if n == len(self.known[seq]):  # caught up: the greedy token is the next known one
                self.known[seq].append(int(logits[r].argmax()))


def _prompts(vocab):
    return dict(zip("abcd", random_prompts(vocab, [5, 12, 3, 9], seed=3)))


def test_prefill_in_one_step_then_decode(pair):
    d = _Driver(pair.cfg, pair.delta, True, _prompts(pair.cfg.vocab_size))
    d.step([("a", 5), ("b", 12), ("c", 3)], num_tokens=24)
    for _ in range(3):
        d.step([("a", 1), ("b", 1), ("c", 1)])


def test_chunked_prefill_beside_decode_rows(pair):
    d = _Driver(pair.cfg, pair.delta, True, _prompts(pair.cfg.vocab_size))
    d.step([("a", 5), ("b", 5)])
    d.step([("a", 1), ("b", 5), ("c", 3), ("d", 4)])
    d.step([("b", 2), ("c", 1), ("a", 1), ("d", 5)])
    for _ in range(2):
        d.step([("d", 1), ("c", 1), ("b", 1), ("a", 1)])
    # A finished row's pages go back and are reused by a new sequence (stale data masked).
    d.alloc.free("a")
    d.known["e"] = d.known["c"][:4] + [1, 2, 3]
    d.step([("e", 7), ("b", 1)], num_tokens=8)
    d.step([("e", 1), ("b", 1)], num_tokens=8)


def test_plain_params_and_stacked_layers(tiny_hf):
    ckpt = tiny_hf("dense_gqa", 0)
    prompts = _prompts(ckpt.cfg.vocab_size)
    d = _Driver(ckpt.cfg, ckpt.params(), False, prompts)
    d.step([("a", 5), ("b", 12), ("c", 3)])
    d.step([("a", 1), ("b", 1), ("c", 1), ("d", 9)])
    cfg = dataclasses.replace(ckpt.cfg, scan_layers=True)
    d = _Driver(cfg, qwen3.stack_layers(ckpt.params()), False, prompts)
    d.step([("a", 5), ("b", 12), ("c", 3)])
    d.step([("a", 1), ("b", 1), ("c", 1), ("d", 9)])


def test_the_step_updates_the_donated_pools_in_place(tiny_hf):
    """The compiled model step (layers unrolled) holds no copy or transpose of a layer's pool."""
    import re

    cfg = tiny_hf("dense_gqa", 0).cfg
    params = qwen3.abstract_params(cfg)
    num_pages, t, r = 300, 8, 4
    pools = jax.eval_shape(lambda: qwen3.init_pools(cfg, num_pages, PAGE, jnp.float32))
    batch = PageAllocator(num_pages, PAGE, MAX_PAGES).ragged_batch([], r, t)
    text = _step.lower(cfg, params, pools, jax.ShapeDtypeStruct((t,), jnp.int32),
                       jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)).compile().as_text()
    pool_elems = cfg.num_kv_heads * num_pages * PAGE * cfg.head_dim
    sizes = [np.prod([int(d) for d in m.group(1).split(",")])
             for m in re.finditer(r"= f32\[([\d,]+)\]\S* (?:copy|transpose)\(", text)]
    assert max(sizes, default=0) < pool_elems, f"a pool-sized copy in the compiled step: {max(sizes)} elements"
    assert "input_output_alias" in text
