"""The server's engine: one `dj.Engine` (paged KV cache, continuous batching), driven by a thread.

A background thread owns the dj.Engine and so every device call. Requests wait in a
bounded FIFO; whenever rows are free, the waiting requests that fit move into the engine
as one group: their λ is resolved (explicit, or one policy call per policy for the
group), and each of a request's n choices becomes one engine request in delta mode (its
own λ) with row id row_base + choice, so its samples follow `generate`'s (seed, row,
step) keys. A request under a thinking budget (`budget:<n>`) carries the engine's
`ThinkingBudget`, the rule of `generate_budget`; one under early exit (`deer`) its
`EarlyExit`, the rule of `generate_deer`. The thread steps the engine while it
has work and after each step hands every choice the tokens it gained that no probe can
take back (`Request.settled`: a trigger is held until its probe has decided).

Pages: the server lets the engine preempt by recompute (reserve=False). A row holds pages
for the tokens it has, not for all of its max_tokens, so more rows fit a KV budget (`kv_gb`),
and a row that finds the pool full goes back to the queue and is recomputed with its tokens
kept (greedy tokens unchanged up to the rounding of a recomputed prefill against decode).
An online server wants that capacity. Offline runs (engine/offline.py) reserve pages up
front instead, so that a row's numbers never depend on what else is running.

Tokens go to each request's asyncio queue as lists of events:
("token", index, id), ("finish", index, reason), ("error", message), where
index = row_base + choice is the choice's index in the response.
A choice ends on a stop id ("stop"), at max_tokens or the context ("length"), or
when its request is cancelled (client gone, timeout, stop string hit).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time

from dami_jax.config import ConfigError
from dami_jax.engine.engine import Engine as PagedEngine
from dami_jax.engine.scheduler import ThinkingBudget
from dami_jax.generate.sampling import Greedy, Sample
from dami_jax.serve.request import GenRequest, QueueFull, push_all, resolve_lambdas

log = logging.getLogger("dami_jax.serve")


@dataclasses.dataclass
class _Choice:
    req: GenRequest
    choice: int
    emitted: int = 0  # tokens delivered


class Engine:
    """The serving loop over dj.Engine(pair, **engine_kwargs) (ServeConfig.engine_kwargs)."""

    def __init__(self, pair, max_queue: int, metrics=None, **engine_kwargs):
        self.pair, self.max_queue, self.metrics = pair, max_queue, metrics
        self.engine_kwargs = engine_kwargs
        self.engine = self._new_engine()
        self.max_rows, self.context = self.engine.sched.max_rows, self.engine.sched.context
        alloc = self.engine.sched.alloc
        if alloc.pages_needed(self.context) > alloc.num_usable:
            raise ConfigError(
                f"a KV pool of {alloc.num_usable} usable pages of {alloc.page_size} tokens "
                f"({self.engine.pool_bytes / 1e9:.3g} GB) cannot hold one sequence of max_seq_len = {self.context} "
                f"tokens ({alloc.pages_needed(self.context)} pages): raise kv_gb or lower max_seq_len")
        self.choices: dict[int, _Choice] = {}  # engine request id -> the choice it generates
        self.pending: collections.deque[GenRequest] = collections.deque()
        self.cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def _new_engine(self) -> PagedEngine:
        return PagedEngine(self.pair, reserve=False, **self.engine_kwargs)

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
        """Choices in the engine (running, or waiting there after a preemption)."""
        return len(self.choices)

    def pages_free(self) -> int:
        return self.engine.sched.alloc.num_free

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dami-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def warmup(self) -> None:
        """Compile every shape of the engine's ladder, so the first requests do not wait for it."""
        self.engine.warmup()

    # -- engine thread ----------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cv:
                while not self._stop and not self.pending and not self.choices:
                    self.cv.wait()
                if self._stop:
                    break
            try:
                self._drop_cancelled()
                self._admit()
                if self.choices:
                    self._step()
            except Exception as e:  # a bug must not kill the server: fail the requests involved
                log.exception("engine step failed")
                self._fail_all(f"engine error: {e}")
                self.engine = self._new_engine()  # its pools may have been donated to the failed call
        self._fail_all("server shutting down")

    def _fail_all(self, message: str) -> None:
        reqs = {id(c.req): c.req for c in self.choices.values()}
        push_all([(r, [("error", message)]) for r in reqs.values()])
        for rid in self.choices:
            self.engine.cancel(rid)
        self.choices.clear()

    def _drop_cancelled(self) -> None:
        """Cancel in the engine the choices whose client is gone, timed out or hit a stop string."""
        for rid, c in list(self.choices.items()):
            if c.req.cancelled or c.choice in c.req.done_choices:
                self.engine.cancel(rid)
                del self.choices[rid]

    def _admit(self) -> None:
        """Move the waiting requests whose choices fit the free rows into the engine."""
        sched = self.engine.sched
        free = self.max_rows - len(sched.running) - len(sched.waiting)
        group = []
        with self.cv:
            while self.pending and (self.pending[0].cancelled or self.pending[0].n <= free):
                r = self.pending.popleft()
                if not r.cancelled:
                    group.append(r)
                    free -= r.n
        self._gauge()
        if not group:
            return
        for r, lam in zip(group, resolve_lambdas(group, self.pair)):
            if lam is None or r.cancelled:  # the policy failed (the request has its error), or gone
                continue
            r.lam_used = lam
            rids = []
            try:
                budget = None if r.thinking_budget is None else self._budget(r.thinking_budget)
                sampling = Greedy() if r.temperature <= 0 else Sample(r.temperature, r.top_k, r.top_p)
                for j in range(r.n):
                    rids.append(self.engine.submit(r.prompt, r.max_tokens, lam=lam, sampling=sampling, seed=r.seed,
                                                   stop_tokens=r.stop_ids, row_id=r.row_base + j, budget=budget,
                                                   early_exit=r.early_exit))
            except Exception as e:  # refused (e.g. a budget without `</think>`): this request only
                for rid in rids:
                    self.engine.cancel(rid)
                r.push([("error", f"request refused: {e}")])
                continue
            self.choices.update((rid, _Choice(r, j)) for j, rid in enumerate(rids))
            if self.metrics is not None:
                self.metrics.admitted(r, lam)

    def _budget(self, tokens: int) -> ThinkingBudget:
        from dami_jax.policies.budget import think_end_ids

        end_id, forced = think_end_ids(self.pair.tokenizer)
        return ThinkingBudget(tokens, end_id, tuple(forced))

    def _step(self) -> None:
        """One engine step (or burst); deliver every choice's new tokens, and the ends."""
        sched = self.engine.sched
        steps, preemptions = self.engine.stats["steps"], sched.preemptions
        ended = {}
        for req in self.engine.step():
            self.engine.poll(req.rid)  # the engine keeps finished requests for `poll`: take them
            ended[req.rid] = req
        live = {req.rid: req for req in sched.running}
        now, delivered, batches = time.perf_counter(), 0, {}
        for rid, c in list(self.choices.items()):
            req = ended.get(rid) or live.get(rid)  # neither: waiting after a preemption
            settled = 0 if req is None else req.settled
            if req is None or (settled <= c.emitted and rid not in ended):
                continue
            events = batches.setdefault(id(c.req), (c.req, []))[1]
            idx = c.req.row_base + c.choice  # the choice's index in the response
            events += [("token", idx, t) for t in req.generated[c.emitted: settled]]
            delivered += max(0, settled - c.emitted)
            c.emitted = max(c.emitted, settled)
            if c.req.t_first is None:
                c.req.t_first = now
                if self.metrics is not None:
                    self.metrics.first_token(c.req)
            if rid in ended:
                events.append(("finish", idx, req.finish_reason))
                del self.choices[rid]
        push_all(list(batches.values()))
        if self.metrics is not None:
            self.metrics.step(len(live) + len(ended), self.max_rows, self.engine.stats["steps"] - steps)
            self.metrics.tokens(delivered)
            self.metrics.pages(sched.alloc.num_free, sched.alloc.num_usable - sched.alloc.num_free,
                               sched.preemptions - preemptions)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue(len(self.pending))
