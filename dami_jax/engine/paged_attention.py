"""Paged attention over a flat ragged token batch.

KV pool, per layer: `k_pool`, `v_pool` of shape (K, P, page, H): kv heads, pages,
slots in a page, head dim. It is the layout of both of jax's Pallas decode kernels
(TPU `paged_attention`, GPU `paged_attention`), so the kernel paths read the same
pool with no copy; the XLA path gathers whole pages (K slices of page·H contiguous
values each) and its dots contract H, the minor axis, for the scores.

A step's batch is flat: T tokens (decode rows and prefill chunks mixed), described
by `RaggedBatch`-style int32 arrays (see pages.py):
    cu_q_lens (R + 1,), kv_lens (R,), page_table (R, max_pages), slot_ids (T,).
Row r's queries are flat tokens cu_q_lens[r]:cu_q_lens[r+1], the last q_len of its
kv_lens[r] tokens, causal among themselves. Rows with no keys give zeros, not NaN.

The XLA path (`impl="xla"`, the reference and the CPU default) cuts the work into
items (a decode row's query, or a block of up to `q_block` queries of a prefill row)
x (a block of `pages_per_block` of that row's pages), only as many as the row's keys
need (causal), and runs them
`items_per_chunk` at a time in a loop whose trip count follows the batch's real
work. Each chunk gathers its pages, computes a partial softmax per item, and folds
it into per-token running (max, sum, output) by scatter (online softmax), so the
cost follows the tokens the rows hold, not the longest row times the rows.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

IMPLS = ("xla", "pallas_tpu", "pallas_gpu")


def write_kv(k_pool: jax.Array, v_pool: jax.Array, k_tkh: jax.Array, v_tkh: jax.Array,
             slot_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter the new tokens' keys/values (T, K, H) into their flat slots page·page_size + offset.

    Padding tokens carry a slot past the end of the pool (pages.PageAllocator.out_of_range_slot)
    and are dropped, so they never touch a live page. Donate the pools to the enclosing jit
    for an in-place update (tests/test_paged_attention.py checks the compiled HLO).
    """
    if slot_ids.shape[0] == 1:
        # XLA rewrites a one-index scatter as a dynamic-update-slice, and with the attention
        # reading the result it then copied each whole pool twice per layer (a lone decoding
        # row: 4x the step's attention time). A second, dropped index keeps it a scatter.
        slot_ids = jnp.concatenate([slot_ids, jnp.full(1, k_pool.shape[1] * k_pool.shape[2], slot_ids.dtype)])
        k_tkh, v_tkh = jnp.concatenate([k_tkh, k_tkh]), jnp.concatenate([v_tkh, v_tkh])

    def write(pool, new_tkh):
        kh, p, page, h = pool.shape
        flat = pool.reshape(kh, p * page, h)  # merging (P, page) is a bitcast, not a copy
        flat = flat.at[:, slot_ids].set(new_tkh.swapaxes(0, 1).astype(pool.dtype), mode="drop")
        return flat.reshape(pool.shape)

    return write(k_pool, k_tkh), write(v_pool, v_tkh)


def paged_attention(q_thd: jax.Array, k_pool: jax.Array, v_pool: jax.Array, cu_q_lens: jax.Array,
                    kv_lens: jax.Array, page_table: jax.Array, *, impl: str = "xla", decode_only: bool = False,
                    q_block: int = 32,
                    pages_per_block: int = 8, items_per_chunk: int = 8, interpret: bool = False) -> jax.Array:
    """(T, Hq, H) attention output of the flat queries q_thd (T, Hq, H), Hq = G·K, scaled by H^-1/2.

    impl: "xla" (any batch), or a decode-only Pallas kernel: "pallas_tpu" or "pallas_gpu"
    (T == R: row r's one query is flat token r; rows without a token, if any, come last and
    hold no keys). No fallback between them.
    q_block, pages_per_block, items_per_chunk: the XLA path's block sizes: queries per item of
    a prefill row (decode rows always take items of one query), pages per item, items per loop
    step. The defaults were among the fastest tried on CPU (decode: benchmarks/paged_attention.py;
    a 512-token prefill chunk beside 7 decode rows: q_block 16-32 took 0.07-0.15 s, 1 took 1.0 s).
    decode_only: the caller promises every row has at most one query: the XLA path then
    compiles only its decode pass.
    interpret: run a Pallas kernel in Pallas's interpreter (CPU tests); the XLA path ignores it.
    jax's TPU kernel reads pages as bfloat16 (it casts them after loading), so it matches the
    XLA path over bf16-rounded pools, not float32 ones.
    """
    kh, _, page, h = k_pool.shape
    t, hq, hd = q_thd.shape
    r = kv_lens.shape[0]
    if k_pool.shape != v_pool.shape or hd != h or hq % kh:
        raise ValueError(f"queries (T, Hq, H) = {q_thd.shape} need pools (K, P, page, H) with Hq a "
                         f"multiple of K and the same H; got k_pool {k_pool.shape}, v_pool {v_pool.shape}")
    if cu_q_lens.shape != (r + 1,) or page_table.shape[0] != r:
        raise ValueError(f"cu_q_lens {cu_q_lens.shape} and page_table {page_table.shape} must have "
                         f"R + 1 and R rows for kv_lens {kv_lens.shape}")
    q_thd = q_thd * jnp.asarray(h ** -0.5, q_thd.dtype)  # the kernels take no scale: pre-scale q
    if impl == "xla":
        return _xla(q_thd, k_pool, v_pool, cu_q_lens, kv_lens, page_table, decode_only=decode_only,
                    q_block=q_block, pages_per_block=pages_per_block, items_per_chunk=items_per_chunk)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if t != r:
        raise ValueError(f"impl={impl!r} is decode-only: one query per row, but got {t} tokens "
                         f"for {r} rows; use impl='xla' for prefill chunks")
    kernel = _pallas_tpu if impl == "pallas_tpu" else _pallas_gpu
    out = kernel(q_thd, k_pool, v_pool, kv_lens, page_table, pages_per_block=pages_per_block,
                 interpret=interpret)
    return jnp.where((kv_lens > 0)[:, None, None], out, 0).astype(q_thd.dtype)


# ---------------------------------------------------------------------------
# XLA path


def _xla(q_thd, k_pool, v_pool, cu_q_lens, kv_lens, page_table, *, decode_only, q_block, pages_per_block,
         items_per_chunk):
    kh, _, _, h = k_pool.shape
    t, hq, _ = q_thd.shape
    g, r = hq // kh, kv_lens.shape[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    # Running softmax of every (kv head, token, group): max, sum of exp, output.
    acc = (jnp.full((kh, t, g), jnp.finfo(jnp.float32).min), jnp.zeros((kh, t, g), jnp.float32),
           jnp.zeros((kh, t, g, h), jnp.float32))
    # Decode rows in blocks of one query, prefill rows in blocks of q_block: a decode row in a
    # wide block would pay for q_block queries (3x slower at 32, decode on CPU). The passes
    # touch disjoint tokens; a pass with no rows runs no loop step.
    # The decode pass takes at most r items a loop step: with fewer rows than items_per_chunk,
    # short rows would leave most of a chunk's gathered blocks dead (a lone row of a few dozen
    # tokens decoded 1.3x slower than lock step with 8).
    passes = ((q_lens == 1, 1, min(t, r), min(items_per_chunk, r)),
              (q_lens > 1, q_block, min(t, t // q_block + r), items_per_chunk))
    passes = passes[:1] if decode_only else passes
    for rows, bq, num_qb, c in passes:  # num_qb: a static bound, as every block holds >= 1 token
        acc = _fold_items(acc, q_thd.reshape(t, kh, g, h).swapaxes(0, 1), k_pool, v_pool, cu_q_lens,
                          jnp.where(rows, q_lens, 0), q_lens, kv_lens, page_table, bq=bq, num_qb=num_qb,
                          pages_per_block=min(pages_per_block, page_table.shape[1]), c=c)
    _, l_run, o_run = acc
    out = jnp.where(l_run[..., None] > 0, o_run / jnp.where(l_run > 0, l_run, 1.0)[..., None], 0.0)
    return out.swapaxes(0, 1).reshape(t, hq, h).astype(q_thd.dtype)


def _fold_items(acc, q_ktgh, k_pool, v_pool, cu_q_lens, pass_q_lens, q_lens, kv_lens, page_table, *,
                bq, num_qb, pages_per_block, c):
    """Fold into acc the attention of the queries counted in pass_q_lens (a subset of the rows)."""
    kh, num_pages, page, h = k_pool.shape
    _, t, g, _ = q_ktgh.shape
    r, max_pages = page_table.shape
    ppb = pages_per_block
    block_len = ppb * page  # keys per item

    # Query blocks: row r's queries split into ceil(q_len / bq) blocks of consecutive tokens.
    cu_qb = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(-(-pass_q_lens // bq))])
    qb = jnp.arange(num_qb)
    qb_row = jnp.minimum(jnp.searchsorted(cu_qb[1:], qb, side="right"), r - 1)
    qb_first = (qb - cu_qb[qb_row]) * bq  # index of the block's first query within its row
    qb_len = jnp.where(qb < cu_qb[-1], jnp.minimum(bq, q_lens[qb_row] - qb_first), 0)
    qb_tok = cu_q_lens[qb_row] + qb_first  # flat token of the block's first query
    qb_pos = kv_lens[qb_row] - q_lens[qb_row] + qb_first  # its position in the sequence
    # Items: each query block against the key blocks up to its last query (causal).
    qb_items = jnp.where(qb_len > 0, -(-(qb_pos + qb_len) // block_len), 0)
    cu_items = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(qb_items)]).astype(jnp.int32)

    # In the loop, arrays are kv head first, then item (the pool's axis order): both dots batch
    # over (K, C) and take their operands as laid out. Item first ran 1.2-1.4x slower on CPU.
    def chunk(i, acc):
        m_run, l_run, o_run = acc
        item = i * c + jnp.arange(c)
        b = jnp.minimum(jnp.searchsorted(cu_items[1:], item, side="right"), num_qb - 1)
        kv_block = item - cu_items[b]
        live_q = (jnp.arange(bq) < qb_len[b][:, None]) & (item < cu_items[-1])[:, None]  # (C, bq)
        tok = jnp.where(live_q, qb_tok[b][:, None] + jnp.arange(bq), t)  # t: dropped by the scatters
        q_pos = qb_pos[b][:, None] + jnp.arange(bq)
        page_idx = jnp.minimum(kv_block[:, None] * ppb + jnp.arange(ppb), max_pages - 1)
        pages = page_table[qb_row[b][:, None], page_idx]  # (C, ppb)
        # Rows of the pools seen as (K·P, page, H) (a bitcast): indexing it with (K, C, pages)
        # gives the gather its natural output order, kv head first, with no transpose after.
        rows = (jnp.arange(kh) * num_pages)[:, None, None] + pages
        k_kclh = k_pool.reshape(kh * num_pages, page, h)[rows].reshape(kh, c, block_len, h)
        v_kclh = v_pool.reshape(kh * num_pages, page, h)[rows].reshape(kh, c, block_len, h)
        q_kcxh = q_ktgh[:, jnp.minimum(tok, t - 1)].reshape(kh, c, bq * g, h)
        s = jnp.einsum("kcxh,kclh->kcxl", q_kcxh, k_kclh, preferred_element_type=jnp.float32)
        s = s.reshape(kh, c, bq, g, block_len)
        k_pos = kv_block[:, None] * block_len + jnp.arange(block_len)  # (C, L)
        allowed = ((k_pos[:, None, :] <= q_pos[:, :, None]) & live_q[:, :, None]
                   & (k_pos < kv_lens[qb_row[b]][:, None])[:, None, :])[None, :, :, None, :]
        m = jnp.max(jnp.where(allowed, s, jnp.finfo(jnp.float32).min), axis=-1)  # (K, C, bq, G)
        p = jnp.where(allowed, jnp.exp(s - m[..., None]), 0.0)
        o = jnp.einsum("kcxl,kclh->kcxh", p.reshape(kh, c, bq * g, block_len).astype(v_pool.dtype), v_kclh,
                       preferred_element_type=jnp.float32).reshape(kh, c, bq, g, h)
        # Fold the items into the running softmax of their tokens (several items may share one).
        m_new = m_run.at[:, tok].max(m, mode="drop")
        alpha = jnp.exp(m_run - m_new)
        beta = jnp.exp(m - m_new[:, jnp.minimum(tok, t - 1)])
        l_run = (l_run * alpha).at[:, tok].add(p.sum(-1) * beta, mode="drop")
        o_run = (o_run * alpha[..., None]).at[:, tok].add(o * beta[..., None], mode="drop")
        return m_new, l_run, o_run

    return jax.lax.fori_loop(0, -(-cu_items[-1] // c), chunk, acc)


# ---------------------------------------------------------------------------
# Pallas kernels (decode only; both take pools (K, P, page, H) as they are)


def _pallas_tpu(q_rqh, k_pool, v_pool, kv_lens, page_table, *, pages_per_block, interpret):
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as kernel

    with pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext():
        return kernel(q_rqh, k_pool, v_pool, kv_lens, page_table,
                      pages_per_compute_block=_divisor(page_table.shape[1], pages_per_block))


def _pallas_gpu(q_rqh, k_pool, v_pool, kv_lens, page_table, *, pages_per_block, interpret):
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as kernel

    max_pages = page_table.shape[1]
    block = _divisor(max_pages, pages_per_block)
    return kernel(q_rqh, k_pool, v_pool, page_table, kv_lens, pages_per_compute_block=block,
                  k_splits=max_pages // block, interpret=interpret)


def _divisor(n: int, at_most: int) -> int:
    """The largest divisor of n not above at_most (the kernels need blocks that tile the table)."""
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)
