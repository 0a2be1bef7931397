"""One process's share of the serving: its copy of the pair in a dj.Engine, driven by ticks.

Every process of a server holds a `Worker`; process 0 also runs the HTTP front and the
dispatch (serve/engine.py). Each tick, process 0 sends every worker its work as plain JSON:
- `cancel`: [key, choice] pairs whose client is gone, timed out or hit a stop string;
- `admit`: request specs (`spec_of`): prompt ids, sampling, λ or the policy's spec, and so on;
  a request with images also its pixel arrays, which travel beside the JSON (serve/engine.py).
The worker cancels, resolves λ (one policy call per policy over the new prompts, the images
in their own call: `policy(prompts, pair, **pixel_inputs)`), submits
each choice as one engine request, steps its engine once (a step or a burst) and reports
what changed, again as plain JSON: the tokens each choice gained, the ends, the λ used, the
requests it refused, and its counters. One process calls `apply` directly; several exchange
ticks and reports through JAX's collectives (dami_jax.distributed), so every process's
engine runs on its own chips and only these small messages travel.
"""

from __future__ import annotations

import logging

import numpy as np

from dami_jax.engine.engine import Engine as PagedEngine
from dami_jax.engine.scheduler import ThinkingBudget
from dami_jax.generate.sampling import Greedy, Sample

log = logging.getLogger("dami_jax.serve")


def spec_of(key: int, req) -> dict:
    """A GenRequest as a worker needs it: JSON, with its policy named by spec, but for `pixels`
    (its pixel inputs, NumPy arrays, or None)."""
    return {"key": key, "prompt": list(req.prompt), "max_tokens": req.max_tokens, "n": req.n,
            "temperature": req.temperature, "top_k": req.top_k, "top_p": req.top_p, "seed": req.seed,
            "row_base": req.row_base, "lam": req.lam, "stop_ids": list(req.stop_ids),
            "policy": None if req.lam is not None else req.policy.spec, "thinking_budget": req.thinking_budget,
            "pixels": req.pixel_inputs or None}


def batch_pixels(pixel_inputs: list[dict]) -> dict:
    """Several prompts' pixel inputs as one batch's, as transformers takes them: each keyword's
    arrays concatenated in prompt order."""
    keys = dict.fromkeys(k for p in pixel_inputs for k in p)
    return {k: np.concatenate([p[k] for p in pixel_inputs if k in p]) for k in keys}


class Worker:
    """dj.Engine(pair, **engine_kwargs) in delta mode, preempting by recompute (reserve=False: a row
    holds pages for the tokens it has, so more rows fit the pool), plus the served policies by spec."""

    def __init__(self, pair, policies=(), **engine_kwargs):
        self.pair, self.engine_kwargs = pair, engine_kwargs
        self.policies = {p.spec: p for p in policies}
        self.engine = self._new_engine()
        self.rids: dict[tuple[int, int], int] = {}  # (request key, choice) -> engine request id
        self.emitted: dict[int, int] = {}  # engine request id -> tokens reported

    def _new_engine(self) -> PagedEngine:
        return PagedEngine(self.pair, reserve=False, **self.engine_kwargs)

    @property
    def free_rows(self) -> int:
        sched = self.engine.sched
        return sched.max_rows - len(sched.running) - len(sched.waiting)

    def apply(self, work: dict) -> dict:
        """Cancel, admit, step once; the report of what changed (module docstring)."""
        report = {"lam": {}, "refused": {}, "events": [], "failed": None}
        for key, choice in work["cancel"]:
            rid = self.rids.pop((key, choice), None)
            if rid is not None:
                self.engine.cancel(rid)
                self.emitted.pop(rid, None)
        sched = self.engine.sched
        steps, preemptions = self.engine.stats["steps"], sched.preemptions
        rows = 0
        try:
            self._admit(work["admit"], report)
            if self.rids:
                rows = self._step(report["events"])
        except Exception as e:  # a bug must not kill the server: fail this worker's requests
            log.exception("engine step failed")
            report["failed"] = f"engine error: {e}"
            self.rids.clear()
            self.emitted.clear()
            self.engine = self._new_engine()  # its pools may have been donated to the failed call
        sched = self.engine.sched
        report["stats"] = {"rows": rows, "free_rows": self.free_rows, "steps": self.engine.stats["steps"] - steps,
                           "pages_free": sched.alloc.num_free, "pages_used": sched.alloc.num_usable - sched.alloc.num_free,
                           "preemptions": max(0, sched.preemptions - preemptions), "active": len(self.rids)}
        return report

    def _admit(self, specs: list[dict], report: dict) -> None:
        for spec, lam in zip(specs, self._lambdas(specs, report["refused"])):
            if lam is None:  # its policy failed: refused
                continue
            rids = []
            early_exit = None if spec["policy"] is None else getattr(self.policies[spec["policy"]], "early_exit", None)
            try:
                budget = None if spec["thinking_budget"] is None else self._budget(spec["thinking_budget"])
                sampling = Greedy() if spec["temperature"] <= 0 else Sample(spec["temperature"], spec["top_k"],
                                                                             spec["top_p"])
                for j in range(spec["n"]):
                    rids.append(self.engine.submit(spec["prompt"], spec["max_tokens"], lam=lam, sampling=sampling,
                                                   seed=spec["seed"], stop_tokens=tuple(spec["stop_ids"]),
                                                   row_id=spec["row_base"] + j, budget=budget, early_exit=early_exit,
                                                   pixel_inputs=spec["pixels"]))
            except Exception as e:  # refused (e.g. a budget without `</think>`): this request only
                for rid in rids:
                    self.engine.cancel(rid)
                report["refused"][spec["key"]] = f"request refused: {e}"
                continue
            for j, rid in enumerate(rids):
                self.rids[spec["key"], j] = rid
                self.emitted[rid] = 0
            report["lam"][spec["key"]] = lam

    def _lambdas(self, specs: list[dict], refused: dict) -> list[float | None]:
        """Explicit λ, else one policy call per distinct policy over its requests' prompts, those
        with images in a call of their own that passes their pixel inputs (so a text request never
        depends on a policy's handling of images). A policy that fails refuses its requests (their
        λ stays None)."""
        out: list[float | None] = [s["lam"] for s in specs]
        groups: dict[tuple[str, bool], list[int]] = {}
        for i, s in enumerate(specs):
            if s["lam"] is None:
                groups.setdefault((s["policy"], s["pixels"] is not None), []).append(i)
        for (name, images), idx in groups.items():
            try:
                if name not in self.policies:
                    raise KeyError(f"policy {name!r} is not served here")
                pixels = batch_pixels([specs[i]["pixels"] for i in idx]) if images else {}
                lam = self.policies[name]([specs[i]["prompt"] for i in idx], self.pair, **pixels).lam
            except Exception as e:
                log.exception("policy %r failed", name)
                for i in idx:
                    refused[specs[i]["key"]] = f"policy {name} failed: {e}"
                continue
            for i, v in zip(idx, lam):
                out[i] = round(float(v), 6)  # float32 0.8 reads 0.8
        return out

    def _budget(self, tokens: int) -> ThinkingBudget:
        from dami_jax.policies.budget import think_end_ids

        end_id, forced = think_end_ids(self.pair.tokenizer)
        return ThinkingBudget(tokens, end_id, tuple(forced))

    def _step(self, events: list) -> int:
        """One engine step (or burst): [key, choice, new settled tokens, finish reason or None] per
        choice that changed; returns the rows that ran."""
        ended = {}
        for req in self.engine.step():
            self.engine.poll(req.rid)  # the engine keeps finished requests for `poll`: take them
            ended[req.rid] = req
        live = {req.rid: req for req in self.engine.sched.running}
        for (key, choice), rid in list(self.rids.items()):
            req = ended.get(rid) or live.get(rid)  # neither: waiting after a preemption
            settled = 0 if req is None else req.settled  # all of it once finished
            if req is None or (settled <= self.emitted[rid] and rid not in ended):
                continue
            finish = req.finish_reason if rid in ended else None
            events.append([key, choice, [int(t) for t in req.generated[self.emitted[rid]: settled]], finish])
            self.emitted[rid] = max(self.emitted[rid], settled)
            if finish is not None:
                del self.rids[key, choice], self.emitted[rid]
        return len(live) + len(ended)
