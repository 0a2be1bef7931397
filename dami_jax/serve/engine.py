"""Continuous batching: prefill per request, insert into a decode slot, step all slots together.

A background thread owns every device call. Requests wait in a bounded FIFO;
when enough slots are free, the waiting requests that fit are admitted as one
group: their λ is resolved (explicit, or one policy call per policy for the
group), their prompts are prefilled `prefill_rows` at a time per bucket width
(padded as `generate` pads them, in a batch of fixed size so that a row's
numbers never depend on its neighbours), and each is copied into n slots, one
per choice, whose first token is sampled at once. Then one jitted call
advances every slot by `steps_per_call` tokens, whatever their λ, lengths or
sampling settings (slots.py). A request under a thinking budget (`budget:<n>`)
has its thinking cut inside the step, as `generate_budget` cuts it.

Tokens go to each request's asyncio queue as lists of events:
("token", index, id), ("finish", index, reason), ("error", message), where
index = row_base + choice is the choice's index in the response.
A choice ends on a stop id ("stop"), at max_tokens or a full slot ("length"),
or when its request is cancelled (client gone, timeout, stop string hit).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time

import jax
import numpy as np

from dami_jax.generate.decode import MIN_BUCKET, bucket_length, left_pad
from dami_jax.generate.sampling import top_p_cut
from dami_jax.serve import slots as SL
from dami_jax.serve.request import GenRequest, QueueFull, push_all, resolve_lambdas

log = logging.getLogger("dami_jax.serve")


@dataclasses.dataclass
class _Seq:
    req: GenRequest
    choice: int
    emitted: int  # tokens delivered
    index: int  # slot cache positions used


class Engine:
    def __init__(self, pair, slots: int, size: int, max_queue: int, metrics=None, steps_per_call: int = 1,
                 prefill_rows: int = 1):
        self.pair, self.cfg, self.params = pair, pair.cfg, pair.delta
        self.slots, self.size, self.max_queue = slots, size, max_queue
        self.prefill_rows = min(prefill_rows, slots)
        self.metrics = metrics
        dtype = jax.tree.leaves(self.params)[0].dtype
        self.state = SL.init_state(self.cfg, slots, size, dtype)
        self._prefill, self._insert, self._step = SL.compiled(self.cfg, steps_per_call)
        self.seqs: list[_Seq | None] = [None] * slots
        self.lam = np.zeros(slots, np.float32)
        self.temp = np.zeros(slots, np.float32)
        self.top_k = np.zeros(slots, np.int32)
        self.top_p_cut = np.zeros(slots, np.float32)
        self.budget = np.zeros(slots, np.int32)  # thinking budget per slot (0: none)
        self.forced = self._forced_tokens(pair.tokenizer)
        self.pending: collections.deque[GenRequest] = collections.deque()
        self.cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    @staticmethod
    def _forced_tokens(tokenizer) -> np.ndarray | None:
        """The tokens a thinking budget forces (`</think>` first), None when the tokenizer has none."""
        from dami_jax.policies.budget import think_end_ids

        try:
            end_id, forced = think_end_ids(tokenizer)
        except (AttributeError, ValueError):  # no tokenizer, or `</think>` is not one token
            return None
        if not forced or forced[0] != end_id:
            return None
        return np.asarray(forced, np.int32)

    # -- client side (any thread) -------------------------------------------
    def submit(self, reqs: list[GenRequest]) -> None:
        """Queue requests (all or none); QueueFull when the queue would pass its limit."""
        with self.cv:
            if len(self.pending) + len(reqs) > self.max_queue:  # drop the abandoned ones first
                self.pending = collections.deque(r for r in self.pending if not r.cancelled)
            if len(self.pending) + len(reqs) > self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests are waiting (limit {self.max_queue})")
            for r in reqs:
                r.t_submit = time.perf_counter()
                self.pending.append(r)
            self.cv.notify()
        self._gauge()

    def queue_depth(self) -> int:
        return len(self.pending)

    def active(self) -> int:
        return sum(s is not None for s in self.seqs)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dami-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def warmup(self, buckets: int = 1) -> None:
        """Compile step, and prefill + insert for the `buckets` smallest prompt buckets (16, 32, ...)."""
        metrics, self.metrics = self.metrics, None
        try:
            for i in range(buckets):
                length = min(MIN_BUCKET << i, self.size - 2)
                req = GenRequest(prompt=[0] * length, max_tokens=2, lam_used=0.5)
                width = bucket_length(length, self.size - 2)
                self._first_tokens(self._prefill_insert(width, [(req, [0])]), [req])
                if i == 0:
                    self._decode()
        finally:
            self._release(0)
            self.metrics = metrics

    # -- engine thread ----------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cv:
                while not self._stop and not self.pending and not self.active():
                    self.cv.wait()
                if self._stop:
                    break
            try:
                self._admit()
                if self.active():
                    self._decode()
            except Exception as e:  # a bug must not kill the server: fail the requests involved
                log.exception("engine step failed")
                for i, s in enumerate(self.seqs):
                    if s is not None:
                        s.req.push([("error", f"engine error: {e}")])
                        self._release(i)
        for s in self.seqs:
            if s is not None:
                s.req.push([("error", "server shutting down")])

    def _admit(self) -> None:
        free = [i for i, s in enumerate(self.seqs) if s is None]
        group = []
        with self.cv:
            while self.pending and (self.pending[0].cancelled or self.pending[0].n <= len(free) - sum(
                    r.n for r in group)):
                r = self.pending.popleft()
                if not r.cancelled:
                    group.append(r)
        self._gauge()
        if not group:
            return
        by_width: dict[int, list] = {}
        for r, lam in zip(group, resolve_lambdas(group, self.pair)):
            if r.thinking_budget is not None and self.forced is None:
                r.push([("error", "a thinking budget needs a tokenizer with a single `</think>` token")])
                continue
            if lam is not None and not r.cancelled:
                r.lam_used = lam
                n = len(r.prompt)  # padded as `generate` pads: never into the room max_tokens needs
                width = bucket_length(n, max(n, self.size - r.room))
                by_width.setdefault(width, []).append((r, free[: r.n]))
                free = free[r.n:]
        firsts, admitted = {}, []
        for width, items in by_width.items():
            for i in range(0, len(items), self.prefill_rows):
                chunk = items[i: i + self.prefill_rows]
                try:
                    firsts.update(self._prefill_insert(width, chunk))
                    admitted += [r for r, _ in chunk]
                except Exception as e:  # fail these requests only
                    log.exception("admission failed")
                    for r, take in chunk:
                        r.push([("error", f"prefill failed: {e}")])
                        for slot in take:
                            self._release(slot)
        self._first_tokens(firsts, admitted)

    def _first_tokens(self, firsts: dict, admitted: list[GenRequest]) -> None:
        """Deliver the first token of every admitted choice (one device sync for the group)."""
        firsts = {slot: [int(t)] for slot, t in zip(firsts, jax.device_get(list(firsts.values())))}
        now = time.perf_counter()
        for r in admitted:
            r.t_first = now
            if self.metrics is not None:
                self.metrics.admitted(r, r.lam_used)
        self._deliver(firsts, advance=False)

    def _prefill_insert(self, width: int, chunk: list) -> dict:
        """Prefill up to `prefill_rows` requests of one bucket width in one call (a fixed batch:
        missing rows are padding), copy each into its slots; {slot: first token (on device)}."""
        prompts = [r.prompt for r, _ in chunk]
        tokens, mask = left_pad(prompts + [[]] * (self.prefill_rows - len(chunk)), width)
        lam = np.asarray([r.lam_used for r, _ in chunk] + [0.0] * (self.prefill_rows - len(chunk)), np.float32)
        logits, pcache = self._prefill(self.params, tokens, mask, lam)
        firsts = {}
        think_end = np.int32(-1 if self.forced is None else self.forced[0])
        for row, (r, take) in enumerate(chunk):
            cut = top_p_cut(r.top_p) if r.temperature > 0 else np.float32(0.0)
            budget = np.int32(r.thinking_budget or 0)
            for j, slot in enumerate(take):
                key = SL.row_key(np.uint32(r.seed), np.int32(r.row_base + j))
                self.state, firsts[slot] = self._insert(self.state, pcache, logits, np.int32(row), np.int32(slot),
                                                        key, np.float32(r.temperature), np.int32(r.top_k), cut,
                                                        budget, think_end)
                self.seqs[slot] = _Seq(r, j, 0, width)
                self.lam[slot], self.temp[slot] = r.lam_used, r.temperature
                self.top_k[slot], self.top_p_cut[slot], self.budget[slot] = r.top_k, cut, budget
        return firsts

    def _decode(self) -> None:
        # Copies: on CPU a numpy argument may be aliased, and these arrays change under a running step.
        rows = (self.lam.copy(), self.temp.copy(), self.top_k.copy(), self.top_p_cut.copy(), self.budget.copy())
        forced = np.full(1, -1, np.int32) if self.forced is None else self.forced
        self.state, tokens = self._step(self.params, self.state, *rows, forced)
        tokens = np.asarray(tokens)  # (steps, B)
        busy = [i for i, s in enumerate(self.seqs) if s is not None]
        if self.metrics is not None:
            self.metrics.step(len(busy), self.slots, tokens.shape[0])
        self._deliver({i: tokens[:, i].tolist() for i in busy}, advance=True)

    def _deliver(self, tokens: dict[int, list[int]], advance: bool) -> None:
        """Emit each slot's tokens in order; end the choices that stop, fill their slot or were
        cancelled (a choice's tokens after its end are dropped). `advance`: each token came from
        a decode step, which wrote one more position of the slot cache."""
        batches: dict[int, tuple[GenRequest, list]] = {}
        delivered = 0
        for slot, toks in tokens.items():
            s = self.seqs[slot]
            if s.req.cancelled or s.choice in s.req.done_choices:
                self._release(slot)
                continue
            events = batches.setdefault(id(s.req), (s.req, []))[1]
            idx = s.req.row_base + s.choice  # the choice's index in the response
            for tok in toks:
                s.index += advance
                s.emitted += 1
                delivered += 1
                events.append(("token", idx, tok))
                reason = ("stop" if tok in s.req.stop_ids else
                          "length" if s.emitted >= s.req.max_tokens or s.index >= self.size else None)
                if reason:
                    events.append(("finish", idx, reason))
                    self._release(slot)
                    break
        push_all([b for b in batches.values() if b[1]])
        if self.metrics is not None:
            self.metrics.tokens(delivered)

    def _release(self, slot: int) -> None:
        self.seqs[slot] = None
        self.temp[slot] = 0.0
        self.top_p_cut[slot] = 0.0
        self.top_k[slot] = 0
        self.budget[slot] = 0

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue(len(self.pending))
