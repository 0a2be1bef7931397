"""Host-side page allocator for the paged KV cache.

Every layer holds one pool of `num_pages` pages of `page_size` token slots, and a
sequence owns the same page ids in every layer, so one allocator serves them all.
Page 0 is the null page: never handed out; padding rows and unused page-table
entries point at it, so a gather through any table entry stays in bounds (what
it reads there is masked, never trusted).

Pure bookkeeping over NumPy; the device only sees the int32 arrays built by
`ragged_batch`. Sequence ids are any hashable the caller picks.

Forks share pages. `fork(parent, child, n)` gives the child the parent's pages that its
first n tokens fill completely, and nothing else: the child starts on a fresh page, onto
which its caller recomputes the tail (fewer than page_size tokens) before its own tokens.
So a page is written only by its one owner: full shared pages are never written again
(a sequence writes at its length and beyond, past every page it shares), and no device
copy is needed (the simplest correct scheme; copy-on-write of the last page would save
recomputing the tail, at most page_size - 1 tokens). Each page counts its owners; it
goes back to the free list when the last one frees it.

Two kinds of "no":
- `PageRequestError` (a ValueError): the request can never be served by this pool
  (larger than the pool or than a page table). Refuse it.
- `OutOfPages` (a RuntimeError): not now; free, preempt or wait, then retry.
Both are all-or-nothing: a refused call changes nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

NULL_PAGE = 0


class PageRequestError(ValueError):
    """A request that no state of this pool could ever hold."""


class OutOfPages(RuntimeError):
    """Not enough free pages at the moment."""


@dataclasses.dataclass
class _Sequence:
    pages: list[int]  # in order: page i holds token slots [i·page_size, (i+1)·page_size)
    length: int  # tokens whose K/V are (or are being) written


@dataclasses.dataclass(frozen=True)
class RaggedBatch:
    """int32 metadata of one step over a flat token batch (host arrays; the device sees these).

    Row r's new tokens are flat tokens cu_q_lens[r]:cu_q_lens[r+1], the last q_len of its
    kv_lens[r] tokens (so a decode row has q_len 1; a prefill chunk q_len > 1, causal).
    Padding rows have q_len = kv_len = 0 and null page tables; padding tokens write to
    slot `num_pages · page_size`, past the end of the pool, so the write drops them.
    """

    cu_q_lens: np.ndarray  # (R + 1,) start of each row's tokens in the flat batch
    kv_lens: np.ndarray  # (R,) tokens each row attends over, its new tokens included
    page_table: np.ndarray  # (R, max_pages) page ids, NULL_PAGE past a row's pages
    slot_ids: np.ndarray  # (T,) flat slot page·page_size + offset of each new token
    positions: np.ndarray  # (T,) each token's position in its sequence (RoPE); 0 for padding
    token_rows: np.ndarray  # (T,) each token's row (per-row λ, sampling); R for padding
    decode_only: bool = False  # static: every row has one query (lets attention skip the prefill pass)


# A pytree, so a step's metadata enters the jitted model step as one argument (as device arrays);
# decode_only is part of the structure, so it selects a program rather than being traced.
jax.tree_util.register_dataclass(
    RaggedBatch, data_fields=["cu_q_lens", "kv_lens", "page_table", "slot_ids", "positions", "token_rows"],
    meta_fields=["decode_only"])


class PageAllocator:
    """Free list of page ids plus a page list and a length per sequence."""

    def __init__(self, num_pages: int, page_size: int, max_pages_per_seq: int):
        if page_size < 1:
            raise PageRequestError(f"page_size must be >= 1 token, got {page_size}")
        if num_pages < 2:
            raise PageRequestError(
                f"a pool of {num_pages} page(s) has no usable page: page {NULL_PAGE} is the reserved "
                f"null page, so num_pages must be >= 2")
        if max_pages_per_seq < 1:
            raise PageRequestError(f"max_pages_per_seq must be >= 1, got {max_pages_per_seq}")
        self.num_pages, self.page_size, self.max_pages_per_seq = num_pages, page_size, max_pages_per_seq
        # A stack: pop from the end. Low ids come out first, which keeps tests readable.
        self._free = np.arange(num_pages - 1, NULL_PAGE, -1, dtype=np.int32)
        self._num_free = num_pages - 1
        self._owners = np.zeros(num_pages, np.int32)  # sequences holding each page (forks share)
        self._seqs: dict[object, _Sequence] = {}

    # -- queries -----------------------------------------------------------

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def max_tokens_per_seq(self) -> int:
        return self.max_pages_per_seq * self.page_size

    @property
    def out_of_range_slot(self) -> int:
        """A slot past the end of the pool: writes to it are dropped."""
        return self.num_pages * self.page_size

    def pages_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    def __contains__(self, seq) -> bool:
        return seq in self._seqs

    def length(self, seq) -> int:
        return self._get(seq).length

    def pages(self, seq) -> tuple[int, ...]:
        return tuple(self._get(seq).pages)

    def sequences(self) -> tuple:
        return tuple(self._seqs)

    def free_pages(self) -> np.ndarray:
        return self._free[: self._num_free].copy()

    def owners(self, page: int) -> int:
        """How many sequences hold `page` (0: free)."""
        return int(self._owners[page])

    def extra_pages(self, seq, n_tokens: int) -> int:
        """Pages `seq` (or a new sequence, if not admitted) must gain to hold n_tokens more tokens."""
        s = self._seqs.get(seq)
        have, length = (len(s.pages), s.length) if s else (0, 0)
        return max(0, self.pages_needed(length + n_tokens) - have)

    def can_fit(self, n_tokens: int, seq=None) -> bool:
        """Whether n_tokens more tokens (for `seq`, or a new sequence) fit now, without raising."""
        total = n_tokens + (self._seqs[seq].length if seq in self._seqs else 0)
        if self.pages_needed(total) > min(self.num_usable, self.max_pages_per_seq):
            return False
        return self.extra_pages(seq, n_tokens) <= self._num_free

    # -- operations ----------------------------------------------------------

    def admit(self, seq, reserve_tokens: int = 0) -> None:
        """Start a sequence of length 0 holding pages for `reserve_tokens` tokens up front."""
        if seq in self._seqs:
            raise ValueError(f"sequence {seq!r} is already admitted")
        self._check_never_fits(reserve_tokens)
        self._seqs[seq] = _Sequence(pages=self._pop(self.pages_needed(reserve_tokens)), length=0)

    def extend(self, seq, n_tokens: int) -> np.ndarray:
        """Append n_tokens to `seq` (pages as needed); returns their (n_tokens,) int32 slot ids."""
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        s = self._get(seq)
        self._check_never_fits(s.length + n_tokens)
        first = s.length // self.page_size
        if n_tokens and first < len(s.pages) and self._owners[s.pages[first]] > 1:
            raise RuntimeError(f"sequence {seq!r} would write into page {s.pages[first]}, which a fork shares")
        s.pages += self._pop(self.extra_pages(seq, n_tokens))
        start, s.length = s.length, s.length + n_tokens
        return self.slots(seq, start, n_tokens)

    def fork(self, parent, child, n_tokens: int, reserve_tokens: int = 0) -> int:
        """Start `child` on the parent's pages that its first n_tokens fill (shared, not copied),
        holding pages for `reserve_tokens` tokens in all up front. Returns the child's length:
        the shared tokens, n_tokens rounded down to a page (the caller feeds the rest)."""
        if child in self._seqs:
            raise ValueError(f"sequence {child!r} is already admitted")
        p = self._get(parent)
        if not 0 <= n_tokens <= p.length:
            raise ValueError(f"a fork of {n_tokens} tokens outside [0, length {p.length}] of {parent!r}")
        self._check_never_fits(reserve_tokens)
        shared = p.pages[: n_tokens // self.page_size]
        fresh = self._pop(max(0, self.pages_needed(reserve_tokens) - len(shared)))
        self._owners[shared] += 1
        self._seqs[child] = _Sequence(pages=shared + fresh, length=len(shared) * self.page_size)
        return len(shared) * self.page_size

    def truncate(self, seq, n_tokens: int) -> None:
        """Forget `seq`'s tokens from n_tokens on (their K/V will be rewritten); its pages stay held."""
        s = self._get(seq)
        if not 0 <= n_tokens <= s.length:
            raise ValueError(f"cannot truncate {seq!r} of length {s.length} to {n_tokens} tokens")
        s.length = n_tokens

    def free(self, seq) -> None:
        """Finish or cancel `seq`: its pages go back to the pool (a page a fork still holds stays held)."""
        self._push(self._get(seq).pages)
        del self._seqs[seq]

    def preempt(self, seq) -> int:
        """Drop `seq`'s pages to make room; returns how many tokens must be recomputed to resume it."""
        length = self._get(seq).length
        self.free(seq)
        return length

    # -- device metadata ------------------------------------------------------

    def slots(self, seq, start: int, n_tokens: int) -> np.ndarray:
        """(n_tokens,) int32 flat slots of seq's tokens start..start+n_tokens-1 (already held)."""
        s = self._get(seq)
        pos = np.arange(start, start + n_tokens)
        if n_tokens and pos[-1] >= len(s.pages) * self.page_size:
            raise ValueError(f"sequence {seq!r} holds {len(s.pages)} pages, not token {pos[-1]}")
        pages = np.asarray(s.pages, np.int64)[pos // self.page_size]
        return (pages * self.page_size + pos % self.page_size).astype(np.int32)

    def ragged_batch(self, rows: list[tuple[object, int]], num_rows: int, num_tokens: int) -> RaggedBatch:
        """Metadata for one step: rows (seq, q_len) whose last q_len tokens are new this step,
        padded to num_rows rows and num_tokens flat tokens (the compiled shape)."""
        q_lens = [q for _, q in rows]
        if len(rows) > num_rows or sum(q_lens) > num_tokens:
            raise ValueError(f"{len(rows)} rows of {sum(q_lens)} tokens do not fit a batch of "
                             f"{num_rows} rows and {num_tokens} tokens")
        cu_q_lens = np.zeros(num_rows + 1, np.int32)
        cu_q_lens[1: len(rows) + 1] = np.cumsum(q_lens, dtype=np.int32)
        cu_q_lens[len(rows) + 1:] = cu_q_lens[len(rows)]
        kv_lens = np.zeros(num_rows, np.int32)
        page_table = np.full((num_rows, self.max_pages_per_seq), NULL_PAGE, np.int32)
        slot_ids = np.full(num_tokens, self.out_of_range_slot, np.int32)
        positions = np.zeros(num_tokens, np.int32)
        token_rows = np.full(num_tokens, num_rows, np.int32)
        for r, (seq, q_len) in enumerate(rows):
            s = self._get(seq)
            if not 0 <= q_len <= s.length:
                raise ValueError(f"row {r}: q_len {q_len} outside [0, length {s.length}] of {seq!r}")
            kv_lens[r] = s.length
            page_table[r, : len(s.pages)] = s.pages
            new = slice(cu_q_lens[r], cu_q_lens[r + 1])
            slot_ids[new] = self.slots(seq, s.length - q_len, q_len)
            positions[new] = np.arange(s.length - q_len, s.length)
            token_rows[new] = r
        return RaggedBatch(cu_q_lens, kv_lens, page_table, slot_ids, positions, token_rows)

    # -- internals -------------------------------------------------------------

    def _get(self, seq) -> _Sequence:
        try:
            return self._seqs[seq]
        except KeyError:
            raise KeyError(f"sequence {seq!r} is not admitted") from None

    def _check_never_fits(self, n_tokens: int) -> None:
        if n_tokens < 0:
            raise ValueError(f"token count must be >= 0, got {n_tokens}")
        need = self.pages_needed(n_tokens)
        if need > self.max_pages_per_seq:
            raise PageRequestError(
                f"{n_tokens} tokens need {need} pages of {self.page_size}, more than a page table of "
                f"{self.max_pages_per_seq} pages ({self.max_tokens_per_seq} tokens) holds")
        if need > self.num_usable:
            raise PageRequestError(
                f"{n_tokens} tokens need {need} pages of {self.page_size}, more than the pool's "
                f"{self.num_usable} usable pages ({self.num_pages} minus the null page)")

    def _pop(self, n: int) -> list[int]:
        if n > self._num_free:
            raise OutOfPages(f"need {n} free pages, {self._num_free} of {self.num_usable} are free")
        self._num_free -= n
        pages = self._free[self._num_free: self._num_free + n][::-1].tolist()
        self._owners[pages] = 1
        return pages

    def _push(self, pages: list[int]) -> None:
        """Drop one owner of each page; those left without one return to the free list."""
        self._owners[pages] -= 1
        last = [p for p in pages if self._owners[p] == 0]
        n = len(last)
        self._free[self._num_free: self._num_free + n] = last[::-1]
        self._num_free += n
