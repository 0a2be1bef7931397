"""The server's engine: a thread that feeds the workers (serve/worker.py) and hands out their tokens.

Requests wait in a bounded FIFO on process 0. Each tick the thread:
- cancels the choices whose client is gone, timed out or hit a stop string;
- deals the waiting requests that fit, in order, to the process with the most free rows (one
  process: all to its own worker); a request's n choices stay on one process;
- has every worker apply its share and step its engine once (a step or a burst);
- hands each choice the tokens it gained, and the ends.
Each of a request's n choices is one engine request in delta mode (its own λ) with row id
row_base + choice, so its samples follow `generate`'s (seed, row, step) keys. A request
under a thinking budget (`budget:<n>`) carries the engine's `ThinkingBudget`, the rule of
`generate_budget`; one under early exit (`deer`) its policy's `EarlyExit`, the rule of
`generate_deer`. A choice gets the tokens no probe can take back (`Request.settled`: a
trigger is held until its probe has decided).

Several processes (`dami serve` under jax.distributed): every process holds its own copy of
the pair on its own chips; process 0 alone serves HTTP and runs this thread; the others run
`follow`, which applies the ticks process 0 broadcasts and sends back their reports (JSON
through JAX's collectives). A tick that admits requests with images sends their pixel arrays
after the JSON, in one `distributed.broadcast_arrays` (to every process: JAX's collectives
have no point-to-point); one process hands its worker the arrays as they are. While idle,
process 0 sends an empty tick every `HEARTBEAT_S`, so no process waits in a collective for long.

Pages: a row holds pages for the tokens it has, not for all of its max_tokens, so more rows
fit a KV budget (`kv_gb`); a row that finds the pool full goes back to its engine's queue and
is recomputed with its tokens kept (greedy tokens unchanged up to the rounding of a
recomputed prefill against decode). Offline runs (engine/offline.py) reserve pages up front
instead, so that a row's numbers never depend on what else is running.

Tokens go to each request's asyncio queue as lists of events:
("token", index, id), ("finish", index, reason), ("error", message), where
index = row_base + choice is the choice's index in the response.
A choice ends on a stop id ("stop"), at max_tokens or the context ("length"), or
when its request is cancelled (client gone, timeout, stop string hit).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time

from dami_jax import distributed
from dami_jax.config import ConfigError
from dami_jax.serve.request import GenRequest, QueueFull, push_all
from dami_jax.serve.worker import Worker, spec_of

HEARTBEAT_S = 10.0


@dataclasses.dataclass(eq=False)
class _Dealt:
    """A request in some worker's engine."""

    req: GenRequest
    process: int
    running: set  # its choices not ended nor cancelled


class Engine:
    """The serving loop over one Worker per process (the worker's arguments: `Worker`)."""

    def __init__(self, pair, max_queue: int, metrics=None, policies=(), **engine_kwargs):
        self.max_queue, self.metrics = max_queue, metrics
        self.worker = Worker(pair, policies, **engine_kwargs)
        sched = self.worker.engine.sched
        self.max_rows, self.context = sched.max_rows, sched.context
        alloc = sched.alloc
        if alloc.pages_needed(self.context) > alloc.num_usable:
            raise ConfigError(
                f"a KV pool of {alloc.num_usable} usable pages of {alloc.page_size} tokens "
                f"({self.worker.engine.pool_bytes / 1e9:.3g} GB) cannot hold one sequence of max_seq_len = "
                f"{self.context} tokens ({alloc.pages_needed(self.context)} pages): raise kv_gb or lower max_seq_len")
        self.processes = distributed.process_count()
        self.stats = [{"free_rows": self.max_rows, "active": 0, "pages_free": alloc.num_free}] * self.processes
        self.dealt: dict[int, _Dealt] = {}  # request key -> where it runs
        self.requests_per_process = [0] * self.processes  # requests dealt so far
        self.keys = itertools.count()
        self.pending: collections.deque[GenRequest] = collections.deque()
        self.cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

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
        """Choices in the engines (running, or waiting there after a preemption)."""
        return sum(s["active"] for s in self.stats)

    def pages_free(self) -> int:
        return sum(s["pages_free"] for s in self.stats)

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
        self.worker.engine.warmup()

    # -- processes other than 0 -------------------------------------------------
    def follow(self) -> None:
        """Apply process 0's ticks until it stops (every process but 0 runs this instead of HTTP)."""
        me = distributed.process_index()
        while True:
            tick = distributed.broadcast_json(None)
            if tick is None:
                return
            if any(spec["pixels"] for work in tick for spec in work["admit"]):
                tick = with_pixels(tick, distributed.broadcast_arrays(None))
            distributed.all_gather_json(self.worker.apply(tick[me]))

    # -- engine thread (process 0) ----------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cv:
                while not self._stop and not self.pending and not self.dealt:
                    if not self.cv.wait(HEARTBEAT_S if self.processes > 1 else None):
                        break  # idle too long: a tick with no work, so the others are not left waiting
                if self._stop:
                    break
            self._deliver(self._exchange(self._plan()))
        self._exchange(None)  # the others stop following
        self._fail_all("server shutting down")

    def _exchange(self, tick: list[dict] | None) -> list[dict]:
        """Every process's report on its share of `tick` (None: stop the others)."""
        if self.processes > 1:
            plain, arrays = without_pixels(tick)
            distributed.broadcast_json(plain)
            if arrays:
                distributed.broadcast_arrays(arrays)
        if tick is None:
            return []
        return distributed.all_gather_json(self.worker.apply(tick[0]))

    def _plan(self) -> list[dict]:
        """Each process's work this tick: cancellations, then the waiting requests that fit, in order."""
        tick = [{"cancel": [], "admit": []} for _ in range(self.processes)]
        free = [s["free_rows"] for s in self.stats]
        for key, d in list(self.dealt.items()):
            gone = d.running if d.req.cancelled else d.running & d.req.done_choices
            for choice in sorted(gone):
                tick[d.process]["cancel"].append([key, choice])
                d.running.discard(choice)
                free[d.process] += 1
            if not d.running:
                del self.dealt[key]
        with self.cv:
            while self.pending:
                r = self.pending[0]
                p = max(range(self.processes), key=lambda i: free[i])  # ties: the lowest id
                if not r.cancelled and r.n > free[p]:
                    break
                self.pending.popleft()
                if r.cancelled:
                    continue
                key = next(self.keys)
                tick[p]["admit"].append(spec_of(key, r))
                self.dealt[key] = _Dealt(r, p, set(range(r.n)))
                self.requests_per_process[p] += 1
                free[p] -= r.n
        self._gauge()
        return tick

    def _deliver(self, reports: list[dict]) -> None:
        """Hand out every report's tokens and ends, λ and refusals; update the gauges."""
        now, delivered, batches = time.perf_counter(), 0, {}
        for p, report in enumerate(reports):
            self.stats[p] = report["stats"]
            if report["failed"]:
                self._fail_all(report["failed"], process=p)
            for key, message in report["refused"].items():
                d = self.dealt.pop(int(key), None)
                if d is not None:
                    d.req.push([("error", message)])
            for key, lam in report["lam"].items():
                d = self.dealt.get(int(key))
                if d is not None:
                    d.req.lam_used = lam
                    if self.metrics is not None:
                        self.metrics.admitted(d.req, lam)
            for key, choice, tokens, finish in report["events"]:
                d = self.dealt.get(key)
                if d is None or choice not in d.running:  # cancelled meanwhile: nobody reads it
                    continue
                events = batches.setdefault(id(d.req), (d.req, []))[1]
                idx = d.req.row_base + choice  # the choice's index in the response
                events += [("token", idx, t) for t in tokens]
                delivered += len(tokens)
                if d.req.t_first is None and tokens:
                    d.req.t_first = now
                    if self.metrics is not None:
                        self.metrics.first_token(d.req)
                if finish is not None:
                    events.append(("finish", idx, finish))
                    d.running.discard(choice)
                    if not d.running:
                        del self.dealt[key]
        push_all(list(batches.values()))
        if self.metrics is not None:
            stats = [r["stats"] for r in reports]
            self.metrics.step(sum(s["rows"] for s in stats), self.max_rows * self.processes,
                              max(s["steps"] for s in stats))
            self.metrics.tokens(delivered)
            self.metrics.pages(sum(s["pages_free"] for s in stats), sum(s["pages_used"] for s in stats),
                               sum(s["preemptions"] for s in stats))

    def _fail_all(self, message: str, process: int | None = None) -> None:
        """Send an error to every dealt request (of one process, or all) and forget them."""
        gone = {k: d for k, d in self.dealt.items() if process is None or d.process == process}
        push_all([(d.req, [("error", message)]) for d in gone.values()])
        for key in gone:
            del self.dealt[key]

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue(len(self.pending))


def without_pixels(tick: list[dict] | None) -> tuple[list[dict] | None, dict]:
    """(the tick as JSON, each spec's `pixels` reduced to the names of its arrays; those arrays
    by "<key>.<name>"): what travels to the other processes (`with_pixels` undoes it)."""
    if tick is None:
        return None, {}
    arrays, plain = {}, []
    for work in tick:
        specs = []
        for spec in work["admit"]:
            pixels = spec["pixels"] or {}
            arrays.update((f"{spec['key']}.{name}", value) for name, value in pixels.items())
            specs.append({**spec, "pixels": sorted(pixels) or None})
        plain.append({**work, "admit": specs})
    return plain, arrays


def with_pixels(tick: list[dict], arrays: dict) -> list[dict]:
    """A tick from `without_pixels`, each spec's pixel inputs back from `arrays`."""
    return [{**work, "admit": [{**spec, "pixels": spec["pixels"] and {
        name: arrays[f"{spec['key']}.{name}"] for name in spec["pixels"]}} for spec in work["admit"]]}
            for work in tick]
