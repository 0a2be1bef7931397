"""Continuous batching on the host: which rows run the next step, and with how many tokens.

A `Request` carries its settings and its progress: the tokens it has so far (prompt, then
what it generated) and how many of them hold K/V in its pages (`computed`). A row whose
tokens are all computed but the last is decoding (1 token a step); one with more pending
is prefilling, in chunks.

Each step (`Scheduler.plan`):
1. running rows, decode rows first, then prefill chunks, oldest first, under a token budget;
2. then waiting requests enter (FIFO) while rows, budget and pages allow.
Out of pages, the youngest running row is preempted by recompute: its pages are freed and
it goes back to the front of the queue with its generated tokens kept, to be prefilled
again as prompt + generated; its sampling keys follow (seed, row id, step = tokens
generated), so it continues with the same tokens. With `reserve=True` every request holds
pages for prompt + max_new_tokens from admission on, and nothing is ever preempted.

`Scheduler.commit` takes each row's sampled token after the step: a row that reached the
end of its tokens appends it and may finish (a stop id, max_new_tokens, or the context);
a finished row frees its pages at once, so waiting work enters on the next plan.
"""

from __future__ import annotations

import collections
import dataclasses

from dami_jax.engine.pages import OutOfPages, PageAllocator
from dami_jax.errors import InputError


class RequestRefused(InputError):
    """A request this engine can never serve (its prompt or its pages do not fit)."""


@dataclasses.dataclass(eq=False)
class Request:
    rid: int  # the engine's id, also the allocator's sequence id
    prompt: list[int]
    max_new_tokens: int
    lam: float  # ignored by plain (non-delta) params
    temperature: float  # <= 0: greedy
    top_k: int  # 0: off
    top_p_cut: float  # sampling.top_p_cut(top_p); 0: off
    stop_ids: frozenset
    seed: int
    row_id: int  # seeds this request's sampling keys with `seed`, as generate's row ids
    generated: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # leading tokens whose K/V are in this request's pages
    finish_reason: str | None = None  # "stop" or "length" once finished
    context_full: bool = False  # ended by the context, not by max_new_tokens or a stop id
    preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def pending(self) -> int:
        """Tokens still to feed through the model before the next token can be sampled."""
        return len(self.prompt) + len(self.generated) - self.computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    def __init__(self, alloc: PageAllocator, *, max_rows: int, max_tokens: int, context: int,
                 reserve: bool = False):
        if max_rows < 1 or max_tokens < 1:
            raise InputError(f"max_rows and max_tokens_per_step must be >= 1, got {max_rows} and {max_tokens}")
        self.alloc, self.max_rows, self.max_tokens = alloc, max_rows, max_tokens
        self.context, self.reserve = context, reserve
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # in admission order: the last is the youngest
        self.preemptions = 0

    # -- requests ---------------------------------------------------------------

    def check(self, req: Request) -> None:
        """Refuse a request no state of this engine could serve, naming the numbers."""
        n = len(req.prompt)
        if n >= self.context:
            raise RequestRefused(
                f"request {req.rid}: prompt of {n} tokens does not fit the context of {self.context} "
                f"tokens with room to generate")
        total = self.total_tokens(req)
        need = self.alloc.pages_needed(total)
        if need > self.alloc.num_usable:
            raise RequestRefused(
                f"request {req.rid}: {n} prompt + up to {total - n} new tokens need {need} pages of "
                f"{self.alloc.page_size} tokens, more than the pool's {self.alloc.num_usable} usable pages")

    def total_tokens(self, req: Request) -> int:
        """The most tokens req can ever hold: prompt + max_new_tokens, within the context."""
        return min(len(req.prompt) + req.max_new_tokens, self.context)

    def add(self, req: Request) -> None:
        self.check(req)
        self.waiting.append(req)

    def cancel(self, req: Request) -> None:
        if req in self.running:
            self.alloc.free(req.rid)
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.running)

    # -- one step ---------------------------------------------------------------

    def plan(self) -> list[tuple[Request, int]]:
        """The rows of the next step, (request, new tokens), with their pages extended."""
        plan: list[tuple[Request, int]] = []
        for req in sorted(self.running, key=lambda r: r.pending > 1):  # stable: decode rows first
            budget = self.max_tokens - sum(q for _, q in plan)
            if budget == 0:
                break
            if req in self.running and self._grow(req, min(req.pending, budget), plan):
                plan.append((req, min(req.pending, budget)))
        while self.waiting and len(self.running) < self.max_rows:
            budget = self.max_tokens - sum(q for _, q in plan)
            req = self.waiting[0]
            q = min(req.pending, budget)
            if q == 0 or not self._admit(req, q):
                break
            self.waiting.popleft()
            self.running.append(req)
            plan.append((req, q))
        return plan

    def commit(self, plan: list[tuple[Request, int]], next_tokens) -> list[Request]:
        """Record a step: next_tokens[i] is row i's sampled token. Returns the requests it finished."""
        done = []
        for (req, q), token in zip(plan, next_tokens):
            req.computed += q
            if req.pending:  # a prefill chunk short of the end: its token is not a next token
                continue
            req.generated.append(int(token))
            if int(token) in req.stop_ids:
                req.finish_reason = "stop"
            elif len(req.generated) >= req.max_new_tokens:
                req.finish_reason = "length"
            elif len(req.prompt) + len(req.generated) >= self.context:  # no position left to feed it
                req.finish_reason, req.context_full = "length", True
            if req.finished:
                self.alloc.free(req.rid)
                self.running.remove(req)
                done.append(req)
        return done

    # -- internals ----------------------------------------------------------------

    def _admit(self, req: Request, q: int) -> bool:
        """Admit req with its first q tokens if pages allow (in recompute mode leaving a page of
        headroom per decode row, so admission does not force the next step to preempt)."""
        if self.reserve:
            if not self.alloc.can_fit(self.total_tokens(req)):
                return False
            self.alloc.admit(req.rid, reserve_tokens=self.total_tokens(req))
        else:
            headroom = sum(r.pending == 1 for r in self.running)
            if not self.alloc.can_fit(q) or self.alloc.extra_pages(req.rid, q) + headroom > self.alloc.num_free:
                return False
            self.alloc.admit(req.rid)
        self.alloc.extend(req.rid, q)
        return True

    def _grow(self, req: Request, q: int, plan: list) -> bool:
        """Extend req's pages by q tokens, preempting the youngest running rows as needed;
        False if req itself was preempted."""
        while True:
            try:
                self.alloc.extend(req.rid, q)
                return True
            except OutOfPages:
                if self.reserve:  # admission reserved every page this request can use
                    raise
                victim = self.running[-1]
                self._preempt(victim, plan)
                if victim is req:
                    return False

    def _preempt(self, req: Request, plan: list) -> None:
        self.alloc.preempt(req.rid)
        req.computed = 0
        req.preemptions += 1
        self.preemptions += 1
        self.running.remove(req)
        plan[:] = [(r, q) for r, q in plan if r is not req]
        self.waiting.appendleft(req)
