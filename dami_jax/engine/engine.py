"""`Engine`: paged KV pools, the jitted step, and the request API over the scheduler.

One step: the scheduler plans rows (decode rows, then prefill chunks, then admissions);
the engine pads them to a shape of its ladder, runs the model step (qwen3.paged_step, the
pools donated) and samples each row's next token on the device with the keys of
`generate` (fold_in(fold_in(key(seed), row id), step)), so a row's tokens do not depend
on which requests share its batch; the scheduler then records the tokens, and each
row's max probability (what early-exit probes are judged by).

When every planned row is decoding, the engine runs a *burst* instead (its own program,
R rows of one token each, not padded to the token ladder): up to `decode_burst` decode
steps in one device call (a loop over the same model step, positions
and slots advanced on the device), each row stopping at a stop id (or, thinking under early
exit, a trigger's last id: `Request.burst_stops`) or at the steps the host granted it (`Scheduler.decode_steps`: its max_new_tokens, the context, a thinking cut).
The host then commits the steps one by one, exactly as single steps, so the tokens are the
same; what a burst saves is a host round trip per token. Rows that stop inside a burst idle
to its end, and waiting requests enter after it: `decode_burst=1` trades that back.

The ladder: row counts (1, 4, 16, ...) and token counts (16, 64, ...) each from a short
list up to max_rows and max_tokens_per_step, so at most a dozen programs compile (and one
burst program per row count), each once (lazily, or all by `warmup`); params are an
argument, never a closure.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from dami_jax.config import ModelConfig
from dami_jax.engine.early_exit import EarlyExit
from dami_jax.engine.pages import PageAllocator, PageRequestError
from dami_jax.engine.scheduler import Request, RequestRefused, Scheduler, ThinkingBudget
from dami_jax.errors import InputError
from dami_jax.generate.decode import GenerateOutput, stop_table
from dami_jax.generate.sampling import Greedy, Sample, sample_rows
from dami_jax.interpolate import check_lam
from dami_jax.models import qwen3, qwen3_vl


def ladder(limit: int, start: int) -> tuple[int, ...]:
    """start, 4·start, 16·start, ... below limit, then limit: the padded sizes of one axis."""
    sizes = []
    size = start
    while size < limit:
        sizes.append(size)
        size *= 4
    return (*sizes, limit)


def _bucket(n: int, sizes: tuple[int, ...]) -> int:
    return next(s for s in sizes if s >= n)


def _model_step(cfg, params, pools, tokens_t, batch, lam_r, rows, step_r, delta_r=None, vision=None):
    """One model step: each row's next token and its max probability (at temperature 1), and the
    pools; rows: (temperature, top_k, top_p_cut, seed, row_id). Qwen3-VL: delta_r, each row's
    M-RoPE delta; vision, the image rows of prefill chunks."""
    lam_t = None if lam_r is None else jnp.append(lam_r, 0.0)[batch.token_rows]  # padding: row R, λ 0
    delta_t = None if delta_r is None else jnp.append(delta_r, 0)[batch.token_rows]
    logits_rv, pools = qwen3.paged_step(cfg, params, pools, tokens_t, batch, lam_t, delta_t, vision)
    temperature_r, top_k_r, top_p_cut_r, seed_r, row_id_r = rows
    keys = jax.vmap(lambda s, r, t: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), r), t))(
        seed_r, row_id_r, step_r)
    logits_rv = logits_rv.astype(jnp.float32)
    max_prob_r = jnp.exp(jnp.max(logits_rv, axis=-1) - jax.nn.logsumexp(logits_rv, axis=-1))
    return (sample_rows(logits_rv, keys, temperature_r, top_k_r, top_p_cut_r), max_prob_r), pools


_step = jax.jit(_model_step, static_argnums=0, donate_argnums=2)


def _burst_impl(cfg, params, pools, tokens_r, batch, lam_r, rows, step_r, steps_r, stops_rs, delta_r=None, *,
                length):
    """Up to `length` decode steps of R rows (one token each, row r's flat token r): row r runs
    steps_r[r] steps unless it samples a stop id first; later steps leave it (and its pages)
    alone. Returns the (length, R) tokens and their max probabilities, valid up to each row's end,
    and the pools."""
    page = pools[0][0].shape[2]
    oob = pools[0][0].shape[1] * page  # past the pool's end: dropped writes

    def cond(carry):
        i, _, done_r, _, _ = carry
        return (i < length) & ~jnp.all(done_r)

    def body(carry):
        i, last_r, done_r, (out, out_p), pools = carry
        live_r = ~done_r
        pos_r = batch.positions + i
        page_r = jnp.take_along_axis(batch.page_table, jnp.minimum(pos_r // page, batch.page_table.shape[1] - 1)[:, None],
                                     axis=1)[:, 0]
        step_batch = dataclasses.replace(
            batch, kv_lens=jnp.where(live_r, batch.kv_lens + i, batch.kv_lens), positions=pos_r,
            slot_ids=jnp.where(live_r, page_r * page + pos_r % page, oob))
        (token_r, prob_r), pools = _model_step(cfg, params, pools, last_r, step_batch, lam_r, rows, step_r + i,
                                               delta_r)
        stop_r = jnp.any(token_r[:, None] == stops_rs, axis=1)
        done_r = done_r | stop_r | (i + 1 >= steps_r)
        return i + 1, token_r, done_r, (out.at[i].set(token_r), out_p.at[i].set(prob_r)), pools

    r = tokens_r.shape[0]
    outs = (jnp.zeros((length, r), jnp.int32), jnp.zeros((length, r), jnp.float32))
    carry = (jnp.int32(0), tokens_r, steps_r <= 0, outs, pools)
    _, _, _, outs, pools = jax.lax.while_loop(cond, body, carry)
    return outs, pools


_burst = jax.jit(_burst_impl, static_argnums=0, static_argnames="length", donate_argnums=2)


class Engine:
    """Continuous batching over a paged KV cache, for one model (plain params) or a pair in
    delta mode (every request its own λ).

    Engine(pair) or Engine(cfg, params). Capacity: `num_pages` pages of `page_size` tokens
    per layer (or as many as `kv_bytes` holds for all layers' keys and values), page 0 being
    the null page; `max_rows` rows and `max_tokens_per_step` tokens per step (the chunked
    prefill budget); `max_context` tokens per sequence (default the model's context).
    `reserve`: hold pages for prompt + max_new_tokens from admission on and never preempt
    (otherwise the youngest row is preempted and recomputed when pages run out).
    `decode_burst`: the most decode steps one device call runs (see the module doc).
    """

    def __init__(self, model, params=None, *, num_pages: int | None = None, kv_bytes: int | None = None,
                 page_size: int = 16, max_rows: int = 32, max_tokens_per_step: int = 256,
                 max_context: int | None = None, reserve: bool = False, decode_burst: int = 8):
        if isinstance(model, ModelConfig):
            if params is None:
                raise InputError("Engine(cfg, params): params are missing")
            cfg, self.default_stops = model, ()
        else:  # a ModelPair: delta mode
            if params is not None:
                raise InputError("Engine(pair) takes no params: it runs the pair's delta params")
            cfg, params, self.default_stops = model.cfg, model.delta, tuple(model.stop_tokens)
        if cfg.scan_layers != qwen3.is_stacked(params):
            raise InputError(f"cfg.scan_layers={cfg.scan_layers} but params are "
                             f"{'' if qwen3.is_stacked(params) else 'not '}stacked")
        self.cfg, self.params, self.delta = cfg, params, qwen3.is_delta(params)
        dtype = jax.tree.leaves(params)[0].dtype
        context = cfg.max_position_embeddings if max_context is None else min(max_context,
                                                                               cfg.max_position_embeddings)
        if page_size < 1 or context < 1 or decode_burst < 1:
            raise InputError(f"page_size, max_context and decode_burst must be >= 1, got {page_size}, "
                             f"{context} and {decode_burst}")
        self.decode_burst = decode_burst
        page_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * jnp.dtype(dtype).itemsize
        if (num_pages is None) == (kv_bytes is None):
            raise InputError("give the pool's size as exactly one of num_pages and kv_bytes")
        if num_pages is None:
            num_pages = kv_bytes // page_bytes
            if num_pages < 2:
                raise InputError(
                    f"a KV budget of {kv_bytes} bytes holds {num_pages} page(s) of {page_bytes} bytes "
                    f"({page_size} tokens x {cfg.num_layers} layers x keys and values); the pool needs at "
                    f"least 2 (the null page and one usable page), so at least {2 * page_bytes} bytes")
        try:
            alloc = PageAllocator(num_pages, page_size, -(-context // page_size))
        except PageRequestError as e:
            raise InputError(f"KV pool: {e}") from None
        self.sched = Scheduler(alloc, max_rows=max_rows, max_tokens=max_tokens_per_step, context=context,
                               reserve=reserve)
        self.rows_ladder = ladder(max_rows, 1)  # from 1: a lone row padded to 4 decoded 1.8x slower (CPU)
        self.tokens_ladder = ladder(max(max_tokens_per_step, max_rows), 16)
        self.pools = qwen3.init_pools(cfg, num_pages, page_size, dtype)
        self.pool_bytes = num_pages * page_bytes
        self.finished: dict[int, Request] = {}
        self.stats = {"steps": 0, "calls": 0, "tokens": 0, "padded_tokens": 0}
        self._ids = itertools.count()

    # -- requests -------------------------------------------------------------------

    def request(self, prompt, max_new_tokens: int, *, lam=None, sampling=Greedy(), seed: int = 0,
                stop_tokens=None, row_id: int | None = None, budget: ThinkingBudget | None = None,
                early_exit: EarlyExit | None = None, record_probs: bool = False,
                pixel_inputs: dict | None = None) -> Request:
        """A checked Request (not queued): RequestRefused/InputError name what is wrong.
        early_exit: DEER's rule (its thinking cut included, so no budget with it); record_probs:
        keep each generated token's max probability (`Request.max_probs`); pixel_inputs: the
        prompt's Qwen3-VL images / video (transformers' keywords), run through the vision tower
        here, once."""
        rid = next(self._ids)
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise RequestRefused(f"request {rid}: the prompt is empty; it needs at least one token")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise RequestRefused(f"request {rid}: token id {bad[0]} outside the vocabulary [0, {self.cfg.vocab_size})")
        if max_new_tokens < 1:
            raise RequestRefused(f"request {rid}: max_new_tokens must be >= 1, got {max_new_tokens}")
        if self.delta and lam is None:
            raise RequestRefused(f"request {rid}: delta-mode params need a λ per request")
        if not self.delta and lam is not None:
            raise RequestRefused(f"request {rid}: lam was given but params are not in delta mode")
        if not isinstance(sampling, (Greedy, Sample)):
            raise InputError(f"sampling must be dj.Greedy() or dj.Sample(...), got {sampling!r}")
        temperature, top_k, cut = sampling.settings()
        if early_exit is not None:
            if budget is not None:
                raise InputError("a request takes a thinking budget or early exit, not both")
            budget = ThinkingBudget(early_exit.think_tokens(max_new_tokens), early_exit.end_id, early_exit.close)
        stops = self.default_stops if stop_tokens is None else stop_tokens
        req = Request(rid=rid, prompt=prompt, max_new_tokens=int(max_new_tokens),
                      lam=0.0 if lam is None else float(check_lam(lam)), temperature=temperature, top_k=top_k,
                      top_p_cut=cut, stop_ids=frozenset(int(s) for s in stops), seed=int(seed),
                      row_id=rid if row_id is None else int(row_id), budget=budget, early_exit=early_exit,
                      max_probs=[] if record_probs else None)
        self.sched.check(req)
        if pixel_inputs and any(v is not None for v in pixel_inputs.values()):
            req.vision = qwen3_vl.prompt_vision(self.cfg, self.params, prompt, pixel_inputs,
                                                req.lam if self.delta else None)
        return req

    def submit(self, prompt, max_new_tokens: int, **kw) -> int:
        """Queue one request (keywords as `request`; row_id, seeding its sampling keys, defaults to
        the returned id); returns its id. A refused request raises here and changes nothing: the
        others keep being served."""
        req = self.request(prompt, max_new_tokens, **kw)
        self.sched.add(req)
        return req.rid

    def poll(self, rid: int) -> Request | None:
        """The finished request (its `generated` tokens and `finish_reason`), once; else None."""
        return self.finished.pop(rid, None)

    def cancel(self, rid: int) -> None:
        for req in (*self.sched.running, *self.sched.waiting):
            if req.rid == rid:
                self.sched.cancel(req)

    @property
    def idle(self) -> bool:
        return self.sched.idle

    # -- steps ------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Run one step, or a burst of decode steps; returns the requests it finished (also kept
        for `poll`)."""
        plan = self.sched.plan()
        if not plan:
            if self.sched.waiting:  # nothing runs and the queue's head cannot enter: a bug
                raise RuntimeError(f"no row can run: {len(self.sched.waiting)} waiting, "
                                   f"{self.sched.alloc.num_free} free pages")
            return []
        steps = self._burst_steps(plan)
        done = self._run_burst(plan, steps) if steps else self._run_step(plan)
        self.stats["calls"] += 1
        self.finished.update((req.rid, req) for req in done)
        return done

    def _row_arrays(self, plan, num_rows: int):
        """(λ or None, sampling rows, step) of the planned rows as (num_rows,) device arrays."""
        def rows(field, dtype):
            out = np.zeros(num_rows, dtype)
            out[: len(plan)] = [field(req) for req, _ in plan]
            return jnp.asarray(out)

        lam_r = rows(lambda r: r.lam, np.float32) if self.delta else None
        sampling = (rows(lambda r: r.temperature, np.float32), rows(lambda r: r.top_k, np.int32),
                    rows(lambda r: r.top_p_cut, np.float32), rows(lambda r: r.seed, np.uint32),
                    rows(lambda r: r.row_id, np.int32))
        return lam_r, sampling, rows(lambda r: len(r.generated), np.int32)

    def _deltas(self, plan, num_rows: int) -> np.ndarray | None:
        """Each planned row's M-RoPE delta (Qwen3-VL; 0 for text rows), None for a text model."""
        if self.cfg.vl is None:
            return None
        out = np.zeros(num_rows, np.int32)
        out[: len(plan)] = [0 if req.vision is None else req.vision.delta for req, _ in plan]
        return out

    def _run_step(self, plan) -> list[Request]:
        num_rows = _bucket(len(plan), self.rows_ladder)
        num_tokens = _bucket(sum(q for _, q in plan), self.tokens_ladder)
        batch = self.sched.alloc.ragged_batch([(req.rid, q) for req, q in plan], num_rows, num_tokens)
        tokens_t = np.zeros(num_tokens, np.int32)
        for (req, q), start in zip(plan, batch.cu_q_lens):
            tokens_t[start: start + q] = req.tokens[req.computed: req.computed + q]
        delta_r, vision = self._deltas(plan, num_rows), None
        if delta_r is not None:
            chunks = [(req.vision, start, req.computed, q) for (req, q), start in zip(plan, batch.cu_q_lens)]
            vision = qwen3_vl.paged_splice(chunks, batch.positions, np.append(delta_r, 0)[batch.token_rows])
        (next_r, prob_r), self.pools = _step(self.cfg, self.params, self.pools, jnp.asarray(tokens_t),
                                             jax.tree.map(jnp.asarray, batch), *self._row_arrays(plan, num_rows),
                                             None if delta_r is None else jnp.asarray(delta_r), vision)
        self.stats["steps"] += 1
        self.stats["tokens"] += sum(q for _, q in plan)
        self.stats["padded_tokens"] += num_tokens
        return self.sched.commit(plan, np.asarray(next_r)[: len(plan)], np.asarray(prob_r)[: len(plan)])

    def _burst_steps(self, plan) -> list[int] | None:
        """Each row's steps for a burst, its pages extended to hold them; None when the plan has a
        prefill chunk (a single mixed step). Short of pages for more, every row takes one step."""
        if any(q != 1 or req.pending != 1 for req, q in plan):
            return None
        steps = [self.sched.decode_steps(req, self.decode_burst) for req, _ in plan]
        alloc = self.sched.alloc
        if sum(alloc.extra_pages(req.rid, n - 1) for (req, _), n in zip(plan, steps)) > alloc.num_free:
            return [1] * len(plan)
        return steps

    def _run_burst(self, plan, steps: list[int]) -> list[Request]:
        num_rows = _bucket(len(plan), self.rows_ladder)
        alloc = self.sched.alloc
        batch = alloc.ragged_batch([(req.rid, 1) for req, _ in plan], num_rows, num_rows)
        for (req, _), n in zip(plan, steps):  # pages for the whole burst; the first token's are held
            alloc.extend(req.rid, n - 1)
        page_table = batch.page_table.copy()
        for r, (req, _) in enumerate(plan):
            pages = alloc.pages(req.rid)
            page_table[r, : len(pages)] = pages
        batch = dataclasses.replace(batch, page_table=page_table, decode_only=True)
        tokens_r = np.zeros(num_rows, np.int32)
        tokens_r[: len(plan)] = [req.tokens[-1] for req, _ in plan]
        steps_r = np.zeros(num_rows, np.int32)
        steps_r[: len(plan)] = steps
        stops = [req.burst_stops for req, _ in plan]
        width = -(-max(map(len, stops)) // 4) * 4 or 4  # few distinct shapes
        stops_rs = np.full((num_rows, width), -1, np.int32)
        for r, ids in enumerate(stops):
            stops_rs[r, : len(ids)] = sorted(ids)
        lam_r, sampling, step_r = self._row_arrays(plan, num_rows)
        (out, out_p), self.pools = _burst(self.cfg, self.params, self.pools, jnp.asarray(tokens_r),
                                          jax.tree.map(jnp.asarray, batch), lam_r, sampling, step_r,
                                          jnp.asarray(steps_r), jnp.asarray(stops_rs), self._deltas(plan, num_rows),
                                          length=self.decode_burst)
        out, out_p = np.asarray(out), np.asarray(out_p)
        # each row's steps as the device ran them: up to its first burst stop
        ran = [next((i + 1 for i in range(n) if out[i, r] in ids), n) for r, (n, ids) in enumerate(zip(steps, stops))]
        done = []
        for i in range(max(ran)):  # commit step by step, exactly as single steps would
            live = [(r, req) for r, ((req, _), n) in enumerate(zip(plan, ran)) if i < n and not req.finished]
            if not live:
                break
            done += self.sched.commit([(req, 1) for _, req in live], [out[i, r] for r, _ in live],
                                      [out_p[i, r] for r, _ in live])
            self.stats["steps"] += 1
            self.stats["tokens"] += len(live)
            self.stats["padded_tokens"] += num_rows
        for req, _ in plan:  # a row that left the burst early (a trigger) holds K/V only for what it fed
            if req.rid in alloc and alloc.length(req.rid) > req.computed:
                alloc.truncate(req.rid, req.computed)
        return done

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while not self.sched.idle:
            self.step()

    def warmup(self) -> None:
        """Compile every shape of the ladder now (steps of padding only: they write nothing)."""
        alloc = self.sched.alloc
        for r in self.rows_ladder:
            zeros_f, zeros_i = jnp.zeros(r, jnp.float32), jnp.zeros(r, jnp.int32)
            rows = (zeros_f if self.delta else None,
                    (zeros_f, zeros_i, zeros_f, jnp.zeros(r, jnp.uint32), zeros_i), zeros_i)
            for t in self.tokens_ladder:
                batch = jax.tree.map(jnp.asarray, alloc.ragged_batch([], r, t))
                _, self.pools = _step(self.cfg, self.params, self.pools, jnp.zeros(t, jnp.int32), batch, *rows)
            batch = jax.tree.map(jnp.asarray, dataclasses.replace(alloc.ragged_batch([], r, r), decode_only=True))
            _, self.pools = _burst(self.cfg, self.params, self.pools, zeros_i, batch, *rows, zeros_i,
                                   jnp.full((r, 4), -1, jnp.int32), length=self.decode_burst)

    # -- batch API ----------------------------------------------------------------------

    def generate(self, prompts, max_new_tokens, lam=None, sampling=Greedy(), seed: int = 0,
                 stop_tokens=None, row_ids=None, **pixel_inputs) -> GenerateOutput:
        """All prompts through the engine, as `dj.generate` (same output type and keys: row i
        samples with row id row_ids[i], default i). max_new_tokens: one limit, or one per prompt
        (tokens then has the largest as its width); lam: a scalar or one per prompt (delta mode);
        stop_tokens: one list, or one per prompt (default: the pair's EOS ids, or none).
        Every request is checked before any runs. pixel_inputs: Qwen3-VL images / video of the
        batch, as transformers takes them (each prompt's placeholders take the next ones)."""
        return outputs(self.run_batch(prompts, max_new_tokens, lam=lam, sampling=sampling, seed=seed,
                                      stop_tokens=stop_tokens, row_ids=row_ids, pixel_inputs=pixel_inputs))

    def run_batch(self, prompts, max_new_tokens, lam=None, sampling=Greedy(), seed: int = 0,
                  stop_tokens=None, row_ids=None, budget: ThinkingBudget | None = None,
                  early_exit: EarlyExit | None = None, pixel_inputs: dict | None = None) -> list[Request]:
        """`generate`'s work, returning the finished requests in prompt order."""
        b = len(prompts)
        if b == 0:
            raise InputError("prompts is empty")
        limits = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (b,)).tolist()
        lams = [None] * b if lam is None else np.broadcast_to(check_lam(lam), (b,)).tolist()
        stops = stop_table(self.default_stops if stop_tokens is None else stop_tokens, b)
        row_ids = range(b) if row_ids is None else [int(r) for r in row_ids]
        pixels = {k: v for k, v in (pixel_inputs or {}).items() if v is not None}
        reqs = [self.request(p, limits[i], lam=lams[i], sampling=sampling, seed=seed,
                             stop_tokens=[s for s in stops[i] if s >= 0], row_id=row_ids[i], budget=budget,
                             early_exit=early_exit,
                             pixel_inputs=pixels and qwen3_vl.select_rows(self.cfg, prompts, pixels, [i]))
                for i, p in enumerate(prompts)]
        for req in reqs:
            self.sched.add(req)
        self.run()
        for req in reqs:
            self.finished.pop(req.rid, None)
        return reqs


def outputs(reqs: list[Request]) -> GenerateOutput:
    """Finished requests as one GenerateOutput (width: the largest max_new_tokens)."""
    out = np.zeros((len(reqs), max(r.max_new_tokens for r in reqs)), np.int32)
    for i, req in enumerate(reqs):
        out[i, : len(req.generated)] = req.generated
    return GenerateOutput(tokens=out, lengths=np.array([len(r.generated) for r in reqs], np.int32),
                          finish_reasons=[r.finish_reason for r in reqs],
                          cache_full=any(r.context_full for r in reqs))
