"""Continuous batching: prefill per request, insert into a decode slot, step all slots together.

A background thread owns every device call. Requests wait in a bounded FIFO;
when enough slots are free, the waiting requests that fit are admitted as one
group: their λ is computed (explicit, or by their policy, one policy call per
policy for the whole group), each prompt is prefilled alone at its bucket
width (as `generate` pads it) and copied into n slots, one per choice, whose
first token is sampled at once. Then one jitted `step` advances every slot by
a token, whatever their λ, lengths or sampling settings (see slots.py).

Tokens go to each request's asyncio queue as lists of events:
("token", index, id), ("finish", index, reason), ("error", message), where
index = row_base + choice is the choice's index in the response.
A choice ends on a stop id ("stop"), at max_tokens or a full slot ("length"),
or when its request is cancelled (client gone, timeout, stop string hit).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from dami_jax.generate.decode import bucket_length, left_pad
from dami_jax.serve import slots as SL

log = logging.getLogger("dami_jax.serve")


class QueueFull(RuntimeError):
    """The waiting queue is at its limit: the client should retry later."""


@dataclasses.dataclass(eq=False)
class GenRequest:
    prompt: list[int]
    max_tokens: int
    n: int = 1
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    row_base: int = 0  # row id (sampling key) of choice 0; choice j uses row_base + j
    lam: float | None = None  # explicit λ, else the policy's
    policy: object = None
    stop_ids: tuple[int, ...] = ()
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False
    lam_used: float | None = None
    t_submit: float = 0.0
    t_first: float | None = None

    done_choices: set = dataclasses.field(default_factory=set)  # choices ended by the client side

    def cancel(self, index: int | None = None) -> None:
        """Stop every choice (client gone, timeout) or the one at response `index` (a stop string)."""
        if index is None:
            self.cancelled = True
        else:
            self.done_choices.add(index - self.row_base)

    def push(self, events: list) -> None:
        if self.loop is None or self.events is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, events)
        except RuntimeError:  # the client's loop is gone
            self.cancelled = True


@dataclasses.dataclass
class _Seq:
    req: GenRequest
    choice: int
    emitted: int  # tokens delivered
    index: int  # slot cache positions used


class Engine:
    def __init__(self, pair, slots: int, size: int, max_queue: int, metrics=None):
        self.pair, self.cfg, self.params = pair, pair.cfg, pair.delta
        self.slots, self.size, self.max_queue = slots, size, max_queue
        self.metrics = metrics
        dtype = jax.tree.leaves(self.params)[0].dtype
        self.state = SL.init_state(self.cfg, slots, size, dtype)
        self._prefill, self._insert, self._step = SL.compiled(self.cfg)
        self.seqs: list[_Seq | None] = [None] * slots
        self.lam = np.zeros(slots, np.float32)
        self.temp = np.zeros(slots, np.float32)
        self.top_k = np.zeros(slots, np.int32)
        self.top_p_cut = np.zeros(slots, np.float32)
        self.pending: collections.deque[GenRequest] = collections.deque()
        self.cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # -- client side (any thread) -------------------------------------------
    def submit(self, reqs: list[GenRequest]) -> None:
        """Queue requests (all or none); QueueFull when the queue would pass its limit."""
        with self.cv:
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

    def warmup(self, prompt_len: int = 8) -> None:
        """Compile prefill (the smallest bucket), insert and step before serving."""
        req = GenRequest(prompt=[0] * prompt_len, max_tokens=2, lam=0.5)
        self._admit_one(req, req.lam, free=[0])
        self._decode()
        self._release(0)

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
        lams = self._lambdas(group)
        for r, lam in zip(group, lams):
            if lam is None or r.cancelled:
                continue
            take, free = free[: r.n], free[r.n:]
            self._admit_one(r, lam, take)

    def _lambdas(self, group: list[GenRequest]) -> list[float | None]:
        """Explicit λ, else one policy call per distinct policy over its requests' prompts."""
        out: list[float | None] = [r.lam for r in group]
        by_policy: dict[int, list[int]] = {}
        for i, r in enumerate(group):
            if r.lam is None:
                by_policy.setdefault(id(r.policy), []).append(i)
        for idx in by_policy.values():
            policy = group[idx[0]].policy
            try:
                lam = policy([group[i].prompt for i in idx], self.pair).lam
            except Exception as e:
                log.exception("policy %r failed", getattr(policy, "spec", policy))
                for i in idx:
                    group[i].push([("error", f"policy {getattr(policy, 'spec', '?')} failed: {e}")])
                continue
            for i, v in zip(idx, lam):
                out[i] = float(v)
        return out

    def _admit_one(self, r: GenRequest, lam: float, free: list[int]) -> None:
        r.lam_used = lam
        width = bucket_length(len(r.prompt), self.size - 1)
        tokens, mask = left_pad([r.prompt], width)
        logits, pcache = self._prefill(self.params, jnp.asarray(tokens), jnp.asarray(mask),
                                       jnp.asarray([lam], jnp.float32))
        cut = np.float32(1.0 - r.top_p) if r.temperature > 0 else np.float32(0.0)
        firsts = []
        for j, slot in enumerate(free):
            key = SL.row_key(r.seed, r.row_base + j)
            self.state, first = self._insert(self.state, pcache, logits, jnp.int32(slot), key,
                                             np.float32(r.temperature), np.int32(r.top_k), cut)
            self.seqs[slot] = _Seq(r, j, 0, width)
            self.lam[slot], self.temp[slot], self.top_k[slot], self.top_p_cut[slot] = lam, r.temperature, r.top_k, cut
            firsts.append(first)
        firsts = {slot: int(t) for slot, t in zip(free, jax.device_get(firsts))}
        r.t_first = time.perf_counter()
        if self.metrics is not None:
            self.metrics.admitted(r, lam)
        self._deliver(firsts)

    def _decode(self) -> None:
        self.state, token = self._step(self.params, self.state, jnp.asarray(self.lam), jnp.asarray(self.temp),
                                       jnp.asarray(self.top_k), jnp.asarray(self.top_p_cut))
        token = np.asarray(token)
        self.steps += 1
        busy = [i for i, s in enumerate(self.seqs) if s is not None]
        if self.metrics is not None:
            self.metrics.step(len(busy), self.slots)
        for i in busy:
            self.seqs[i].index += 1
        self._deliver({i: int(token[i]) for i in busy})

    def _deliver(self, tokens: dict[int, int]) -> None:
        """Emit one token per slot; end the choices that stop, fill their slot or were cancelled."""
        batches: dict[int, tuple[GenRequest, list]] = {}
        delivered = 0
        for slot, tok in tokens.items():
            s = self.seqs[slot]
            if s.req.cancelled or s.choice in s.req.done_choices:
                self._release(slot)
                continue
            s.emitted += 1
            delivered += 1
            events = batches.setdefault(id(s.req), (s.req, []))[1]
            idx = s.req.row_base + s.choice  # the choice's index in the response
            events.append(("token", idx, tok))
            reason = ("stop" if tok in s.req.stop_ids else
                      "length" if s.emitted >= s.req.max_tokens or s.index >= self.size else None)
            if reason:
                events.append(("finish", idx, reason))
                self._release(slot)
        for req, events in batches.values():
            req.push(events)
        if self.metrics is not None:
            self.metrics.tokens(delivered)

    def _release(self, slot: int) -> None:
        self.seqs[slot] = None
        self.temp[slot] = 0.0
        self.top_p_cut[slot] = 0.0
        self.top_k[slot] = 0

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue(len(self.pending))
