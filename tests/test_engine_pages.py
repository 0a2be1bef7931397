"""The host page allocator: invariants under random traffic, refusals, device metadata."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest

from dami_jax.engine.pages import NULL_PAGE, OutOfPages, PageAllocator, PageRequestError


def _check_invariants(alloc: PageAllocator) -> None:
    owned = [p for s in alloc.sequences() for p in alloc.pages(s)]
    free = alloc.free_pages().tolist()
    counts = collections.Counter(owned + free)
    assert NULL_PAGE not in counts, "the null page was handed out or freed"
    assert [p for p, c in counts.items() if c > 1] == [], "a page is owned twice or both owned and free"
    assert sorted(counts) == list(range(1, alloc.num_pages)), "a page leaked"
    assert alloc.num_free == len(free)
    for s in alloc.sequences():
        assert len(alloc.pages(s)) >= alloc.pages_needed(alloc.length(s))


def test_random_traffic_keeps_every_page_accounted_for():
    rng = np.random.default_rng(0)
    alloc = PageAllocator(num_pages=64, page_size=4, max_pages_per_seq=16)
    lengths: dict[int, int] = {}  # our own record of each live sequence's length
    next_id, counts = 0, collections.Counter()
    for step in range(10_000):
        op = rng.choice(["admit", "grow", "finish", "cancel", "preempt"], p=[0.25, 0.4, 0.15, 0.1, 0.1])
        live = list(lengths)
        if op == "admit":
            n = int(rng.integers(0, 80))
            if alloc.can_fit(n):
                alloc.admit(next_id, reserve_tokens=n)
                lengths[next_id] = 0
                next_id += 1
            else:  # refused: all or nothing
                before = alloc.num_free
                with pytest.raises((OutOfPages, PageRequestError)):
                    alloc.admit(next_id, reserve_tokens=n)
                assert alloc.num_free == before and next_id not in alloc
                op = "refused"
        elif not live:
            continue
        elif op == "grow":
            seq = live[rng.integers(len(live))]
            n = int(rng.integers(1, 12))
            if alloc.can_fit(n, seq):
                slots = alloc.extend(seq, n)
                assert len(set(slots.tolist())) == n
                assert set((slots // alloc.page_size).tolist()) <= set(alloc.pages(seq))
                lengths[seq] += n
            else:
                before = (alloc.num_free, alloc.pages(seq))
                with pytest.raises((OutOfPages, PageRequestError)):
                    alloc.extend(seq, n)
                assert (alloc.num_free, alloc.pages(seq)) == before
                op = "refused"
        elif op == "preempt":
            seq = live[rng.integers(len(live))]
            assert alloc.preempt(seq) == lengths.pop(seq)
        else:  # finish and cancel both hand every page back
            seq = live[rng.integers(len(live))] if op == "finish" else live[-1]
            alloc.free(seq)
            del lengths[seq]
        counts[op] += 1
        assert {s: alloc.length(s) for s in alloc.sequences()} == lengths
        _check_invariants(alloc)
    for seq in alloc.sequences():
        alloc.free(seq)
    assert alloc.num_free == alloc.num_usable
    _check_invariants(alloc)
    assert min(counts[k] for k in ("admit", "grow", "finish", "cancel", "preempt", "refused")) > 100, counts


def test_refusals_name_the_numbers():
    with pytest.raises(PageRequestError, match=r"pool of 1 page.*null page.*>= 2"):
        PageAllocator(num_pages=1, page_size=16, max_pages_per_seq=4)
    alloc = PageAllocator(num_pages=9, page_size=16, max_pages_per_seq=32)
    with pytest.raises(PageRequestError, match=r"200 tokens need 13 pages of 16.*pool's 8 usable pages"):
        alloc.admit("big", reserve_tokens=200)
    narrow = PageAllocator(num_pages=100, page_size=16, max_pages_per_seq=4)
    with pytest.raises(PageRequestError, match=r"65 tokens need 5 pages.*page table of 4 pages \(64 tokens\)"):
        narrow.admit("long", reserve_tokens=65)
    narrow.admit("grows")
    narrow.extend("grows", 64)
    with pytest.raises(PageRequestError, match="page table of 4 pages"):
        narrow.extend("grows", 1)
    assert narrow.length("grows") == 64 and not narrow.can_fit(1, "grows")
    # Not now (OutOfPages), while others keep their pages.
    alloc.admit("a", reserve_tokens=7 * 16)
    assert alloc.can_fit(16) and not alloc.can_fit(17)
    with pytest.raises(OutOfPages, match="need 2 free pages, 1 of 8 are free"):
        alloc.admit("b", reserve_tokens=17)
    assert "b" not in alloc and alloc.num_free == 1
    with pytest.raises(ValueError, match="already admitted"):
        alloc.admit("a")
    with pytest.raises(KeyError, match="'nope' is not admitted"):
        alloc.free("nope")


def test_slots_follow_pages_and_reserved_pages_are_used_first():
    alloc = PageAllocator(num_pages=8, page_size=4, max_pages_per_seq=4)
    alloc.admit("x", reserve_tokens=5)  # two pages up front
    alloc.admit("y")
    assert alloc.pages("x") == (1, 2) and alloc.pages("y") == ()
    np.testing.assert_array_equal(alloc.extend("y", 2), [12, 13])  # page 3
    np.testing.assert_array_equal(alloc.extend("x", 6), [4, 5, 6, 7, 8, 9])  # within the reservation
    np.testing.assert_array_equal(alloc.extend("x", 3), [10, 11, 16])  # a third page (4)
    assert alloc.pages("x") == (1, 2, 4) and alloc.length("x") == 9


def test_ragged_batch_metadata():
    alloc = PageAllocator(num_pages=8, page_size=4, max_pages_per_seq=3)
    alloc.admit("decode")
    alloc.extend("decode", 6)  # pages 1, 2
    alloc.admit("prefill")
    alloc.extend("prefill", 3)  # page 3
    batch = alloc.ragged_batch([("decode", 1), ("prefill", 3)], num_rows=3, num_tokens=6)
    np.testing.assert_array_equal(batch.cu_q_lens, [0, 1, 4, 4])
    np.testing.assert_array_equal(batch.kv_lens, [6, 3, 0])
    np.testing.assert_array_equal(batch.page_table, [[1, 2, 0], [3, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(batch.slot_ids, [9, 12, 13, 14, 32, 32])  # padding past the pool
    np.testing.assert_array_equal(batch.positions, [5, 0, 1, 2, 0, 0])
    np.testing.assert_array_equal(batch.token_rows, [0, 1, 1, 1, 3, 3])
    leaves = jax.tree.leaves(batch)  # the device data; decode_only is static structure
    assert len(leaves) == 6 and all(a.dtype == np.int32 for a in leaves) and batch.decode_only is False
    with pytest.raises(ValueError, match="2 rows of 4 tokens do not fit a batch of 2 rows and 3 tokens"):
        alloc.ragged_batch([("decode", 1), ("prefill", 3)], num_rows=2, num_tokens=3)
    with pytest.raises(ValueError, match=r"q_len 4 outside \[0, length 3\]"):
        alloc.ragged_batch([("prefill", 4)], num_rows=2, num_tokens=4)


def test_freed_pages_are_reused():
    alloc = PageAllocator(num_pages=4, page_size=2, max_pages_per_seq=3)
    alloc.admit("a", reserve_tokens=6)
    assert alloc.num_free == 0 and not alloc.can_fit(1)
    assert alloc.preempt("a") == 0
    alloc.admit("b")
    alloc.extend("b", 5)
    assert sorted(alloc.pages("b")) == [1, 2, 3]
