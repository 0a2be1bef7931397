"""The generation engine's paged KV cache (DESIGN 2.2b).

- pages.py: the host allocator. Page ids, one page table and one length per sequence,
  and the int32 metadata of one step (`RaggedBatch`).
- paged_attention.py: the device side. The pools (K, P, page, H) of one layer,
  `write_kv` and `paged_attention` over a flat ragged batch.
- scheduler.py: continuous batching on the host: requests, the rows and tokens of each
  step (decode first, chunked prefill, admission by pages), preemption or reservation.
- engine.py: `Engine` (dj.Engine): the pools, the jitted step (models/qwen3.paged_step and
  per-row sampling) over a small ladder of shapes, decode bursts, and submit / step / poll /
  generate.
- offline.py: an engine sized for one batch (what generate_pair, sweep and the thinking
  budget run).

One step, as a scheduler drives it:
    alloc.extend(seq, q_len) for each row        # pages as needed; OutOfPages -> preempt, retry
    batch = alloc.ragged_batch(rows, R, T)       # padded to a compiled shape (R rows, T tokens)
    per layer, inside the jitted model step (pools donated):
        k_pool, v_pool = write_kv(k_pool, v_pool, k_new, v_new, batch.slot_ids)
        out = paged_attention(q, k_pool, v_pool, batch.cu_q_lens, batch.kv_lens, batch.page_table)
RoPE takes batch.positions; per-row λ and sampling take batch.token_rows, and each row's
last token is flat token cu_q_lens[r + 1] - 1.
"""
