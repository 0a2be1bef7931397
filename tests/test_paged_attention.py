"""Paged attention against dense float64 attention; the KV write; the Pallas kernels in interpret mode."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dami_jax.engine.pages import PageAllocator
from dami_jax.engine.paged_attention import paged_attention, write_kv

KV_HEADS, GROUPS, HEAD = 2, 3, 8


def _dense_reference(q_thd, keys, values, cu_q_lens, kv_lens):
    """float64: row r's queries against its keys/values (kv_len, K, H), causal within the row."""
    q = np.asarray(q_thd, np.float64)
    out = np.zeros_like(q)
    for r, kv_len in enumerate(kv_lens):
        lo, hi = cu_q_lens[r], cu_q_lens[r + 1]
        if kv_len == 0:
            continue
        k = np.repeat(np.asarray(keys[r], np.float64), GROUPS, axis=1)  # (S, Hq, H)
        v = np.repeat(np.asarray(values[r], np.float64), GROUPS, axis=1)
        s = np.einsum("thd,shd->hts", q[lo:hi], k) / np.sqrt(HEAD)
        q_pos = kv_len - (hi - lo) + np.arange(hi - lo)
        s = np.where(np.arange(kv_len)[None, None, :] <= q_pos[None, :, None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[lo:hi] = np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), v)
    return out


class _Scene:
    """An allocator, pools, and each sequence's true keys/values, written step by step via write_kv."""

    def __init__(self, rng, num_pages=40, page_size=4, max_pages=12):
        self.rng = rng
        self.alloc = PageAllocator(num_pages, page_size, max_pages)
        shape = (KV_HEADS, num_pages, page_size, HEAD)
        # Large garbage everywhere: a slot read or weighted that a row does not hold shows.
        fill = rng.normal(size=shape) * 1e3
        self.k_pool = jnp.asarray(fill, jnp.float32)
        self.v_pool = jnp.asarray(fill[::-1].copy(), jnp.float32)
        self.keys, self.values = {}, {}

    def append(self, seq, n):
        if seq not in self.alloc:
            self.alloc.admit(seq)
            self.keys[seq], self.values[seq] = np.zeros((0, KV_HEADS, HEAD)), np.zeros((0, KV_HEADS, HEAD))
        k = self.rng.normal(size=(n, KV_HEADS, HEAD))
        v = self.rng.normal(size=(n, KV_HEADS, HEAD))
        self.keys[seq] = np.concatenate([self.keys[seq], k])
        self.values[seq] = np.concatenate([self.values[seq], v])
        return k, v

    def step(self, rows, num_rows, num_tokens, **kw):
        """Append rows' new tokens (seq, q_len), write them, attend; returns (paged, reference, the
        arguments of paged_attention)."""
        new = [self.append(seq, q) for seq, q in rows]
        for seq, q in rows:
            self.alloc.extend(seq, q)
        batch = self.alloc.ragged_batch(rows, num_rows, num_tokens)
        pad = num_tokens - sum(q for _, q in rows)
        k_new = np.concatenate([k for k, _ in new] + [self.rng.normal(size=(pad, KV_HEADS, HEAD))])
        v_new = np.concatenate([v for _, v in new] + [self.rng.normal(size=(pad, KV_HEADS, HEAD))])
        self.k_pool, self.v_pool = jax.jit(write_kv, donate_argnums=(0, 1))(
            self.k_pool, self.v_pool, jnp.asarray(k_new, jnp.float32), jnp.asarray(v_new, jnp.float32),
            jnp.asarray(batch.slot_ids))
        q = self.rng.normal(size=(num_tokens, KV_HEADS * GROUPS, HEAD))
        args = (jnp.asarray(q, jnp.float32), self.k_pool, self.v_pool, jnp.asarray(batch.cu_q_lens),
                jnp.asarray(batch.kv_lens), jnp.asarray(batch.page_table))
        got = jax.jit(paged_attention, static_argnames=(
            "impl", "q_block", "pages_per_block", "items_per_chunk", "interpret"))(*args, **kw)
        want = _dense_reference(q, [self.keys[s] for s, _ in rows], [self.values[s] for s, _ in rows],
                                batch.cu_q_lens, batch.kv_lens[: len(rows)])
        return np.asarray(got), want, args


@pytest.mark.parametrize("kw", [
    dict(q_block=1, pages_per_block=1, items_per_chunk=1),
    dict(q_block=1, pages_per_block=2, items_per_chunk=3),
    dict(q_block=4, pages_per_block=3, items_per_chunk=5),
    dict(q_block=16, pages_per_block=16, items_per_chunk=16),
])
def test_mixed_prefill_and_decode_equal_dense_attention(kw):
    scene = _Scene(np.random.default_rng(1))
    # Prompts of ragged lengths, one split into chunks; then decode steps mixed with a new prefill.
    got, want, _ = scene.step([("a", 13), ("b", 1), ("c", 6)], num_rows=4, num_tokens=24, **kw)
    np.testing.assert_allclose(got[:20], want[:20], atol=1e-5, rtol=0)
    assert np.all(got[20:] == 0), "padding tokens must give zeros"
    for _ in range(3):
        got, want, _ = scene.step([("a", 1), ("b", 1), ("c", 5), ("d", 9)], num_rows=5, num_tokens=20, **kw)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert scene.alloc.length("a") == 16 and scene.alloc.length("d") == 27


def test_reused_pages_with_stale_data_are_masked():
    scene = _Scene(np.random.default_rng(2), num_pages=6, page_size=4, max_pages=5)
    scene.step([("old", 18)], num_rows=1, num_tokens=18)  # all 5 usable pages, now full of its K/V
    scene.alloc.free("old")
    # New sequences take the same pages; their partly filled last pages hold "old"'s keys.
    got, want, _ = scene.step([("x", 6), ("y", 3)], num_rows=3, num_tokens=12)
    assert set(scene.alloc.pages("x") + scene.alloc.pages("y")) <= {1, 2, 3, 4, 5}
    np.testing.assert_allclose(got[:9], want[:9], atol=1e-5, rtol=0)
    for _ in range(2):
        got, want, _ = scene.step([("x", 1), ("y", 1)], num_rows=2, num_tokens=2)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_empty_rows_give_zeros_not_nan():
    scene = _Scene(np.random.default_rng(3))
    got, want, _ = scene.step([("a", 5), ("empty", 0), ("b", 1)], num_rows=6, num_tokens=8)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[:6], want[:6], atol=1e-5, rtol=0)
    assert np.all(got[6:] == 0)


def test_bfloat16_pools():
    scene = _Scene(np.random.default_rng(6))
    _, _, args = scene.step([("a", 9), ("b", 1)], num_rows=2, num_tokens=10)
    q, k_pool, v_pool, *meta = args
    got = paged_attention(q.astype(jnp.bfloat16), k_pool.astype(jnp.bfloat16), v_pool.astype(jnp.bfloat16), *meta)
    want = paged_attention(q, k_pool, v_pool, *meta)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2, rtol=0)


def test_write_kv_drops_padding_and_writes_only_its_slots():
    k_pool = jnp.arange(2 * 3 * 2 * 4, dtype=jnp.float32).reshape(2, 3, 2, 4)
    v_pool = -k_pool
    k_new = jnp.full((3, 2, 4), 100.0).at[1].set(200.0)
    slot_ids = jnp.asarray([3, 4, 6], jnp.int32)  # page 1 offset 1, page 2 offset 0, past the end
    k_out, v_out = write_kv(k_pool, v_pool, k_new, -k_new, slot_ids)
    want = np.asarray(k_pool).copy()
    want[:, 1, 1], want[:, 2, 0] = 100.0, 200.0
    np.testing.assert_array_equal(k_out, want)
    np.testing.assert_array_equal(v_out, -want)


def test_bad_shapes_and_impls_are_refused():
    q = jnp.zeros((4, 6, HEAD))
    pool = jnp.zeros((KV_HEADS, 5, 4, HEAD))
    meta = (jnp.arange(5, dtype=jnp.int32), jnp.ones(4, jnp.int32), jnp.ones((4, 2), jnp.int32))
    with pytest.raises(ValueError, match="impl must be one of"):
        paged_attention(q, pool, pool, *meta, impl="cuda")
    with pytest.raises(ValueError, match=r"Hq a multiple of K"):
        paged_attention(jnp.zeros((4, 5, HEAD)), pool, pool, *meta)
    with pytest.raises(ValueError, match="decode-only: one query per row, but got 8 tokens for 4 rows"):
        paged_attention(jnp.zeros((8, 6, HEAD)), pool, pool, *meta, impl="pallas_gpu")


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_pallas_decode_kernels_in_interpret_mode_equal_xla(impl):
    scene = _Scene(np.random.default_rng(4), num_pages=24, page_size=4, max_pages=8)
    scene.step([("a", 17), ("b", 3), ("c", 30)], num_rows=3, num_tokens=50)
    xla, want, args = scene.step([("a", 1), ("b", 1), ("c", 1), ("none", 0)], num_rows=4, num_tokens=4,
                                 pages_per_block=2)
    np.testing.assert_allclose(xla[:3], want[:3], atol=1e-5, rtol=0)
    # The decode-only XLA program (no prefill pass) gives the same numbers.
    np.testing.assert_array_equal(np.asarray(paged_attention(*args, pages_per_block=2, decode_only=True)), xla)
    got = np.asarray(paged_attention(*args, impl=impl, pages_per_block=2, interpret=True))
    assert np.isfinite(got).all() and np.all(got[3] == 0)
    if impl == "pallas_tpu":
        # jax's TPU kernel reads the pages as bfloat16 (its dequantize step casts them), on a TPU
        # as in the interpreter: compare with the XLA path over the same rounded pools.
        q, k_pool, v_pool, *meta = args
        bf16 = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
        assert np.abs(got - xla).max() > 1e-4  # the rounding is real, so the comparison below means something
        xla = paged_attention(q, bf16(k_pool), bf16(v_pool), *meta, pages_per_block=2)
    np.testing.assert_allclose(got, xla, atol=1e-5, rtol=0)


@pytest.mark.parametrize("t, r", [(6, 3), (1, 1)])  # a lone decoding row: one new token
def test_write_then_attend_updates_the_donated_pools_in_place(t, r):
    """The compiled step holds no copy or transpose of a whole pool (a scatter that XLA cannot do
    in place would copy the cache of every layer at every step)."""
    kh, num_pages, page = 4, 300, 8  # more pages than one loop step gathers (64)
    pool = jax.ShapeDtypeStruct((kh, num_pages, page, HEAD), jnp.float32)
    spec = lambda *s, dtype=jnp.float32: jax.ShapeDtypeStruct(s, dtype)  # noqa: E731

    def step(k_pool, v_pool, q, k_new, v_new, slot_ids, cu_q_lens, kv_lens, page_table):
        k_pool, v_pool = write_kv(k_pool, v_pool, k_new, v_new, slot_ids)
        return paged_attention(q, k_pool, v_pool, cu_q_lens, kv_lens, page_table), k_pool, v_pool

    i32 = jnp.int32
    text = jax.jit(step, donate_argnums=(0, 1)).lower(
        pool, pool, spec(t, 2 * kh, HEAD), spec(t, kh, HEAD), spec(t, kh, HEAD), spec(t, dtype=i32),
        spec(r + 1, dtype=i32), spec(r, dtype=i32), spec(r, 16, dtype=i32)).compile().as_text()
    pool_elems = kh * num_pages * page * HEAD
    sizes = [np.prod([int(d) for d in m.group(1).split(",")])
             for m in re.finditer(r"= f32\[([\d,]+)\]\S* (?:copy|transpose)\(", text)]
    assert sizes, "expected the small copies of the loop state in the HLO (is the pattern still right?)"
    assert max(sizes) < pool_elems, f"a pool-sized copy in the compiled step: {max(sizes)} elements"
    assert "input_output_alias" in text  # the donated pools are the outputs' buffers
