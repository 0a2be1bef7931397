"""Generation engine workloads: does time follow the work, whatever the budget and the mix?

Each workload is data: a list of `Request`s (prompt ids, max_new_tokens, stop ids, λ,
the row id seeding its sampling) and the number of rows decoded at once. A runner is a
callable `runner(workload) -> list of token arrays` (each request's generated tokens, a
stop token included), built once per model; this script times every runner on every
workload in one process, interleaved, and prints one table of ratios between workloads.
The workload types and the runners live in engine_runners.py.

Runners shipped:
- `lockstep`: `generate.decode.generate_lockstep` over a dense cache (what `dj.generate` and
  `dj.generate_pair` in delta mode ran before the engine; the pair's λ per row). Requests go in order in chunks of `rows`;
  each chunk runs to its longest request (its max_new_tokens is the chunk's largest, each
  row cut at its own), which is exactly what lock step costs.
- `engine`: `dj.Engine` (paged KV, continuous batching, decode bursts), at most `rows`
  rows at once; its pool holds the workload's `pool_tokens` per layer (default rows x the
  longest request), rows admitted by the pages they hold and preempted if it runs out. An
  engine is built once per shape and kept between calls (building it zeroes its pool).
- `hf_cb`: transformers' continuous batching (the manager under `model.generate_batch`,
  paged cache, `sdpa` attention, CPU), greedy only, single model (no λ): the peer.
A runner that cannot serve a workload raises `Unsupported` (e.g. lockstep when its dense cache
would take more than half the memory it lives in); that runner and workload show as "-", the
runner's other workloads still run, and no ratio is formed across the gap.

How a row "stops by its Nth token" on random weights: greedy random models repeat one
token forever, so no stop id can mark step N. Most workloads give each request its own
max_new_tokens = N and no stop id. "Capacity is not cost" needs a large max_new_tokens
with rows that stop early, so it samples (temperature 1, per-(seed, row, step) keys,
which the engine keeps) and picks, from a lock-step trace, each row's stop id:
the last token among its first N that had not appeared before it, so the row ends there
(at most N tokens; lengths are checked equal across budgets and runners).

Cases (the engine's targets); the figure is time ratio / processed-token ratio, where
processed = prompt + generated tokens (equal tokens: the time ratio itself):
- time follows the work: random pair, 32 rows, 64-token prompts, half to 32 and half to
  512 new tokens, over all 32 rows to 512. Target ≤ 1.15. Its "step figure" sets the time
  against a step model instead of tokens: a decode step costs a fixed a (every weight read
  once, however many rows) plus b per row; a and b are fitted to the all-512 run and a third,
  one-row run of 512 tokens (steps = the longest row's tokens, row-steps = all rows' tokens),
  and the mixed run's time is divided by what the fit predicts for its steps and row-steps.
  Proposed target ≤ 1.15 (the token figure cannot reach 1.15 while a is paid at every step).
- capacity is not cost: random pair, 8 rows, 256-token prompts, rows stopping by their
  41st token, max_new_tokens 8192 over 64. Target ≤ 1.2. Case capacity_0.6b (opt-in): Qwen3-0.6B
  shape, float32, 8 rows, 512-token prompts, rows stopping by token 128, a --big-capacity
  (default 32K: prompt + max_new_tokens) over a 1K capacity; end to end, prefill included. The
  engine gets one pool for both: what the rows hold (8 x 1K tokens), or one request's full
  capacity if larger (the engine refuses a request its pool could never hold). Lockstep's dense
  cache at 32K (60 GB) is over its memory budget: Unsupported there.
- a lone row in a big pool: single random model, 1 request (64-token prompt, 256 new tokens,
  greedy), the engine's pool at 2^18 tokens per layer (1 GiB) over rows x longest (320 tokens):
  a decode step must not touch the pool's unused pages. Target ≤ 1.2 (token ratio 1).
- more requests than rows: 256 mixed-length requests, 32 rows, over the same generated
  tokens in 256 requests of one length. Target ≤ 1.2.
- peer: single random model, 32 requests x 64 tokens and the mixed requests, tokens/s of
  each runner (hf_cb on the same weights via `dj.save_hf`). peer_0.6b (opt-in): 32 x 64 at
  the Qwen3-0.6B shape, float32.
- memory (host arithmetic, no timing): rows admitted at once for Qwen3-4B bf16 KV shapes
  in a 40 GB budget, lengths 90% ≤ 2K and 10% ≤ 32K, by `dami_jax.engine.pages.PageAllocator`
  (pages reserved for each request's full length) vs a dense cache of the longest length.

    nice python benchmarks/engine.py --json benchmarks/results/engine_cpu.json
    python benchmarks/engine.py --cases memory,peer                     # a subset
    nice python benchmarks/engine.py --cases lone_row_big_pool,memory --no-hf
    nice python benchmarks/engine.py --cases capacity_0.6b,peer_0.6b --big-capacity 4096 \
        --json benchmarks/results/engine_0.6b_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import _common  # noqa: E402
from engine_runners import (Request, Unsupported, Workload, kv_bytes_per_token, log,  # noqa: E402
                            make_runners)

# A random Qwen3 pair small enough for 2 CPU cores: 4 layers, 256 wide (the shape of the peer figure
# quoted for transformers); vocabulary cut to 32K so the layers, not the lm_head, set the step time.
SMALL = dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
             num_kv_heads=2, head_dim=64, tie_word_embeddings=True)
CASES = ("time_follows_work", "capacity_not_cost", "more_requests_than_rows", "lone_row_big_pool", "peer", "memory")
BIG_CASES = ("capacity_0.6b", "peer_0.6b")  # Qwen3-0.6B shape, float32: minutes each on 2 cores, so opt-in


@dataclasses.dataclass(frozen=True)
class Case:
    """One workload (tokens/s per runner) or two, whose time ratio is set against their processed-token ratio."""

    name: str
    model: str  # key of the models dict: "pair", "single", "big"
    workloads: dict  # label -> Workload; of two, the first is the numerator, the second the reference
    target: float | None  # max of (time ratio / token ratio); None: report only
    note: str = ""
    one_row: str | None = None  # label of a third workload, one row of the reference's longest: fits the step model


# ---------------------------------------------------------------------------
# Workloads.

def random_prompts(rng, vocab: int, lengths) -> list[tuple[int, ...]]:
    return [tuple(int(t) for t in rng.integers(0, vocab, n)) for n in lengths]


def time_follows_work(vocab: int, rng) -> Case:
    prompts = random_prompts(rng, vocab, [64] * 32)
    lams = [0.0, 1.0] * 16  # the short rows at λ 0 (Instruct), the long ones at λ 1 (Thinking)
    mixed = [Request(p, 32 if lam == 0 else 512, lam=lam, row_id=i) for i, (p, lam) in enumerate(zip(prompts, lams))]
    full = [dataclasses.replace(r, max_new_tokens=512) for r in mixed]
    return Case("time follows the work", "pair",
                {"half 32 / half 512": Workload(tuple(mixed), 32), "all 512": Workload(tuple(full), 32),
                 "1 row x 512": Workload(tuple(full[1:2]), 1)},
                target=1.15, note="32 rows, 64-token prompts, λ 0 rows stop by 32, λ 1 rows by 512",
                one_row="1 row x 512")


def more_requests_than_rows(vocab: int, rng, lam=True) -> Case:
    n, rows = 256, 32
    prompt_lens = rng.integers(16, 129, n)
    new = rng.integers(16, 257, n)
    prompts = random_prompts(rng, vocab, prompt_lens)
    lams = [float(x) for x in rng.choice([0.0, 0.5, 1.0], n)] if lam else [None] * n
    mixed = [Request(p, int(m), lam=lam_, row_id=i) for i, (p, m, lam_) in enumerate(zip(prompts, new, lams))]
    # Uniform: the same generated tokens (and prompt tokens, to within rounding) in equal requests.
    mean_new, mean_prompt = int(round(new.mean())), int(round(prompt_lens.mean()))
    uniform = [Request(p[:mean_prompt] + p[:1] * (mean_prompt - len(p)), mean_new, lam=r.lam, row_id=i)
               for i, (p, r) in enumerate(zip(prompts, mixed))]
    return Case("more requests than rows", "pair" if lam else "single",
                {"mixed": Workload(tuple(mixed), rows), "uniform": Workload(tuple(uniform), rows)},
                target=1.2, note=f"{n} requests, {rows} rows, prompts 16-128, new tokens 16-256 "
                                 f"(uniform: {mean_prompt} + {mean_new})")


def capacity_not_cost(cfg, params, rng, name: str, model: str, rows: int, prompt_len: int, stop_by: int,
                      budgets: tuple[int, int], lam: float | None, pool_tokens: int | None = None) -> Case:
    """Rows stop by `stop_by` tokens through stop ids picked from a sampled lock-step trace.
    pool_tokens: the engine's pool under both budgets (None: each budget's rows x longest)."""
    import dami_jax as dj
    from dami_jax.generate.decode import generate_lockstep

    prompts = random_prompts(rng, cfg.vocab_size, [prompt_len] * rows)
    sampling = dj.Sample(temperature=1.0)
    trace = generate_lockstep(cfg, params, [list(p) for p in prompts], stop_by, sampling=sampling, seed=0,
                        lam=None if lam is None else [lam] * rows).tokens
    requests = []
    for i, (p, toks) in enumerate(zip(prompts, trace)):
        last_new = max(j for j in range(stop_by) if toks[j] not in toks[:j])
        requests.append(Request(p, 0, stop_tokens=(int(toks[last_new]),), lam=lam, row_id=i))
    big, small = budgets
    pool = "" if pool_tokens is None else f"; engine pool {pool_tokens} tokens per layer under both"
    return Case(name, model, {f"max_new {big}": _budget(requests, big, rows, sampling, pool_tokens),
                              f"max_new {small}": _budget(requests, small, rows, sampling, pool_tokens)},
                target=1.2, note=f"{rows} rows, {prompt_len}-token prompts, sampled (T=1), each row stops by "
                                 f"token {stop_by} on its own stop id{pool}")


def _budget(requests, max_new: int, rows: int, sampling, pool_tokens: int | None) -> Workload:
    return Workload(tuple(dataclasses.replace(r, max_new_tokens=max_new) for r in requests), rows, sampling,
                    pool_tokens=pool_tokens)


def lone_row_big_pool(cfg, rng, pool_tokens: int = 2 ** 18) -> Case:
    """One decoding row, the engine's pool sized to it vs a large one: the pool's unused pages must cost
    nothing (a cache write that makes XLA copy the pool would cost a pool copy per layer and step)."""
    work = Workload((Request(random_prompts(rng, cfg.vocab_size, [64])[0], 256),), rows=1)
    fitted = 64 + 256
    gib = pool_tokens * kv_bytes_per_token(cfg, 4) / 2 ** 30
    return Case("lone row, big pool", "single",
                {f"pool {pool_tokens}": dataclasses.replace(work, pool_tokens=pool_tokens),
                 f"pool {fitted}": work},
                target=1.2, note=f"1 request, 64-token prompt, 256 new tokens, greedy; engine pool {pool_tokens} "
                                 f"tokens per layer ({gib:.2g} GiB float32) over rows x longest ({fitted}); "
                                 f"lockstep and hf_cb ignore the pool (same work twice: ratio ~1 by construction)")


def peer_cases(vocab: int, rng, model: str = "single") -> list[Case]:
    uniform = Workload(tuple(Request(p, 64, row_id=i) for i, p in enumerate(random_prompts(rng, vocab, [64] * 32))),
                       32)
    mixed = more_requests_than_rows(vocab, rng, lam=False).workloads["mixed"]
    mixed = Workload(mixed.requests[:64], 32)
    return [Case(f"peer ({model}): 32 x 64", model, {"32 req x 64": uniform}, None, "64-token prompts, greedy"),
            Case(f"peer ({model}): mixed", model, {"64 req mixed": mixed}, None,
                 "64 requests, prompts 16-128, new 16-256, 32 rows")]


# ---------------------------------------------------------------------------
# Timing.

def time_case(case: Case, runners: dict, repeats: int) -> dict:
    """Per runner and workload: min seconds over `repeats` rounds after a warm-up call, runners
    and workloads taking turns within a round (so a change of load hits all alike). A workload
    a runner cannot serve is {"unsupported": why}; its other workloads still run."""
    out = {}
    for name, run in runners.items():
        out[name] = {}
        for label, work in case.workloads.items():
            t = time.perf_counter()
            try:
                tokens = run(work)
            except Unsupported as e:
                out[name][label] = {"unsupported": str(e)}
                log(f"  {name} / {label}: unsupported: {e}")
                continue
            lengths = [len(x) for x in tokens]
            out[name][label] = dict(warmup_s=time.perf_counter() - t, all_s=[], lengths=lengths,
                                    generated=int(sum(lengths)), processed=work.processed_tokens(lengths),
                                    tokens=tokens)
            log(f"  {name} / {label}: warm-up {out[name][label]['warmup_s']:.1f} s")
    for _ in range(repeats):
        for name, run in runners.items():
            for label, work in case.workloads.items():
                if "unsupported" in out[name][label]:
                    continue
                t = time.perf_counter()
                run(work)
                out[name][label]["all_s"].append(time.perf_counter() - t)
                log(f"  {name} / {label}: {out[name][label]['all_s'][-1]:.2f} s")
    for name, per in out.items():
        for label, r in per.items():
            if "unsupported" in r:
                continue
            ref = out.get("lockstep", {}).get(label, {}).get("tokens")  # None where lockstep did not run
            r["same_tokens_as_lockstep"] = (None if ref is None else
                                            float(np.mean([np.array_equal(a, b) for a, b in zip(r["tokens"], ref)])))
            r["s"] = min(r["all_s"]) if r["all_s"] else r["warmup_s"]
            r["tok_s"] = r["generated"] / r["s"]
            log(f"  {case.name} / {name} / {label}: {r['s']:.2f} s, {r['generated']} generated "
                f"({r['processed']} processed), {r['tok_s']:.0f} tok/s (warm-up {r['warmup_s']:.1f} s)")
    for per in out.values():
        for r in per.values():
            r.pop("tokens", None)
    return out


def summarize(case: Case, timed: dict) -> dict:
    """Per runner: tok/s and the ratio to lockstep per workload (None where either did not run), and
    for two-workload cases the time ratio, processed-token ratio and their quotient (the figure), None
    unless the runner ran both. None for a runner that ran no workload."""
    labels = list(case.workloads)
    lock = timed.get("lockstep", {})
    out = {}
    for name, per in timed.items():
        ran = {lab: r for lab, r in per.items() if "unsupported" not in r}
        if not ran:
            out[name] = None
            continue
        same = [r["same_tokens_as_lockstep"] for r in ran.values() if r["same_tokens_as_lockstep"] is not None]
        s = {"tok_s": {lab: ran[lab]["tok_s"] if lab in ran else None for lab in labels},
             "vs_lockstep": {lab: ran[lab]["tok_s"] / lock[lab]["tok_s"]
                             if lab in ran and "tok_s" in lock.get(lab, {}) else None for lab in labels},
             "same_tokens_as_lockstep": min(same) if same else None,
             "unsupported": {lab: r["unsupported"] for lab, r in per.items() if lab not in ran}}
        pair = [lab for lab in labels if lab != case.one_row]
        if len(pair) == 2:
            s.update(time_ratio=None, token_ratio=None, generated_ratio=None, figure=None, meets_target=None)
            if all(lab in ran for lab in pair):
                a, b = (per[lab] for lab in pair)
                s["time_ratio"] = a["s"] / b["s"]
                s["token_ratio"] = a["processed"] / b["processed"]
                s["generated_ratio"] = a["generated"] / b["generated"]
                s["figure"] = s["time_ratio"] / s["token_ratio"]
                s["meets_target"] = s["figure"] <= case.target if case.target else None
        if case.one_row:
            s["step_model"] = step_model(*(per[lab] for lab in pair), per[case.one_row]) if len(ran) == 3 else None
        out[name] = s
    return out


def step_model(num: dict, ref: dict, one: dict) -> dict:
    """Fit t = steps·a + row_steps·b to the reference run and the one-row run (steps: the longest
    row's tokens; row_steps: all rows' tokens; prefill is folded into both), then divide the
    numerator's time by what the fit predicts for its own steps and row-steps."""
    def work(r):
        return max(r["lengths"]), sum(r["lengths"])

    (n1, m1), (nr, mr), (nn, mn) = work(one), work(ref), work(num)
    a, b = np.linalg.solve([[n1, m1], [nr, mr]], [one["s"], ref["s"]])
    predicted = nn * a + mn * b
    return dict(a_ms=1e3 * a, b_ms=1e3 * b, predicted_s=predicted, predicted_ratio=predicted / ref["s"],
                figure=num["s"] / predicted)


# ---------------------------------------------------------------------------
# Memory: rows admitted at once (host arithmetic).

def memory_case(budget_bytes: float = 40e9, page_size: int = 16, draws: int = 20) -> dict:
    """Requests drawn from the length mix are admitted in order, each reserving pages for its full
    length, until the first refusal; `draws` seeded orders (the 10% long ones dominate)."""
    from dami_jax.engine.pages import OutOfPages, PageAllocator

    cfg = _common.PRESETS["qwen3-4b"]
    bytes_per_token = 2 * cfg["num_layers"] * cfg["num_kv_heads"] * cfg["head_dim"] * 2  # k and v, bf16
    longest = 32768
    num_pages = int(budget_bytes // (page_size * bytes_per_token))
    admitted = []
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        alloc = PageAllocator(num_pages + 1, page_size, longest // page_size)  # + the null page
        while True:
            n = int(rng.integers(1, 2049) if rng.random() < 0.9 else rng.integers(2049, longest + 1))
            try:
                alloc.admit(len(alloc.sequences()), reserve_tokens=n)
            except OutOfPages:
                break
        admitted.append(len(alloc.sequences()))
    mean_len = 0.9 * 2049 / 2 + 0.1 * (2049 + longest) / 2
    return {
        "bytes_per_token": bytes_per_token, "budget_bytes": budget_bytes, "page_size": page_size,
        "pool_pages": num_pages, "dense_bytes_per_row": longest * bytes_per_token,
        "dense_rows": int(budget_bytes // (longest * bytes_per_token)), "paged_rows_per_draw": admitted,
        "paged_rows_mean": float(np.mean(admitted)), "paged_rows_min": min(admitted), "paged_rows_max": max(admitted),
        "mean_length": mean_len, "expected_rows": budget_bytes / bytes_per_token / mean_len,
    }


# ---------------------------------------------------------------------------

def make_models(names: set, dtype: str, big_capacity: int) -> dict:
    """cfg and params per model key: the random pair (delta params), one random model, and the 0.6B shape."""
    import jax

    import dami_jax as dj

    models = {}
    if names & {"pair", "single"}:
        cfg = dj.ModelConfig(**SMALL, max_position_embeddings=8192 + 512)
        instruct, thinking = dj.init_params(cfg, 0, dtype=dtype), dj.init_params(cfg, 1, dtype=dtype)
        models["pair"] = (cfg, dj.ModelPair(cfg, instruct, thinking).delta)
        models["single"] = (cfg, instruct)
    if "big" in names:
        cfg = dj.ModelConfig(**_common.PRESETS["qwen3-0.6b"], max_position_embeddings=big_capacity)
        models["big"] = (cfg, dj.init_params(cfg, 0, dtype="float32"))
    for _, p in models.values():
        jax.block_until_ready(jax.tree.leaves(p))
    return models


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated subset of {','.join(CASES + BIG_CASES)} (default: all but the 0.6B ones)")
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds after the warm-up (min kept)")
    ap.add_argument("--big-capacity", type=int, default=32768,
                    help="capacity_0.6b: the large capacity (prompt + max_new_tokens), against 1024")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' continuous batching")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)
    chosen = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(chosen) - set(CASES + BIG_CASES))
    if unknown:
        ap.error(f"unknown case(s) {unknown}; expected a subset of {list(CASES + BIG_CASES)}")

    load_start = os.getloadavg()[0]
    need = {"pair"} if set(chosen) & {"time_follows_work", "capacity_not_cost", "more_requests_than_rows"} else set()
    need |= {"single"} if set(chosen) & {"peer", "lone_row_big_pool"} else set()
    need |= {"big"} if set(chosen) & set(BIG_CASES) else set()
    models = make_models(need, "float32", args.big_capacity + 1)
    vocab = SMALL["vocab_size"]

    cases = []
    if "time_follows_work" in chosen:
        cases.append(time_follows_work(vocab, np.random.default_rng(1)))
    if "capacity_not_cost" in chosen:
        cfg, params = models["pair"]
        cases.append(capacity_not_cost(cfg, params, np.random.default_rng(2), "capacity is not cost", "pair",
                                       rows=8, prompt_len=256, stop_by=41, budgets=(8192, 64), lam=0.5))
    if "capacity_0.6b" in chosen:
        cfg, params = models["big"]
        # One pool for both budgets, sized for what 8 rows of 1K hold; at least one request's full
        # capacity, since the engine refuses a request its pool could never hold.
        cases.append(capacity_not_cost(cfg, params, np.random.default_rng(3), "capacity is not cost (0.6B)", "big",
                                       rows=8, prompt_len=512, stop_by=128,
                                       budgets=(args.big_capacity - 512, 1024 - 512), lam=None,
                                       pool_tokens=max(8 * 1024, args.big_capacity)))
    if "more_requests_than_rows" in chosen:
        cases.append(more_requests_than_rows(vocab, np.random.default_rng(4)))
    if "lone_row_big_pool" in chosen:
        cases.append(lone_row_big_pool(models["single"][0], np.random.default_rng(7)))
    if "peer" in chosen:
        cases += peer_cases(vocab, np.random.default_rng(5))
    if "peer_0.6b" in chosen:
        cases += peer_cases(models["big"][0].vocab_size, np.random.default_rng(6), model="big")[:1]

    runners_by_model = {m: make_runners(*models[m], m, not args.no_hf) for m in {c.model for c in cases}}
    results = []
    for case in cases:
        log(f"{case.name}: {', '.join(runners_by_model[case.model])}")
        t0 = time.perf_counter()
        timed = time_case(case, runners_by_model[case.model], args.repeats)
        results.append(dict(case=case.name, model=case.model, note=case.note, target=case.target,
                            workloads=list(case.workloads),
                            wall_s=time.perf_counter() - t0, summary=summarize(case, timed), timed=timed))
    memory = memory_case() if "memory" in chosen else None
    report(args, results, memory, load_start)
    return 0


def report(args, results: list[dict], memory: dict | None, load_start: float) -> None:
    columns = ["case", "runner", "time ratio", "token ratio", "figure", "target", "step figure",
               "tok/s (each workload)", "x lockstep (each)", "same tokens", "wall s"]

    def each(values: dict, fmt: str) -> str:
        return " / ".join("-" if v is None else format(v, fmt) for v in values.values())

    rows, notes = [], []
    for r in results:
        notes.append(f"{r['case']}: {r['note']}; workloads {' / '.join(r['workloads'])}")
        for name, s in r["summary"].items():
            for label, why in ({} if s is None else s["unsupported"]).items():
                notes.append(f"  {name} / {label}: unsupported ({why})")
            if s is None:
                rows.append([r["case"], name, None, None, None, r["target"], None, "unsupported", None, None, None])
                continue
            steps = s.get("step_model")
            if steps:
                notes.append(f"  {name}: step model a = {steps['a_ms']:.2f} ms a step, b = {steps['b_ms']:.3f} ms "
                             f"a row-step; predicted time ratio {steps['predicted_ratio']:.3f}")
            rows.append([r["case"], name, s.get("time_ratio"), s.get("token_ratio"), s.get("figure"),
                         r["target"], steps and steps["figure"], each(s["tok_s"], ".0f"),
                         each(s["vs_lockstep"], ".2f"), s["same_tokens_as_lockstep"], r["wall_s"]])
    notes.append("step figure = the first workload's time / the time the step model (fitted to the others) "
                 "predicts for it; proposed target ≤ 1.15 where shown")
    notes.append("figure = time ratio / processed-token ratio (prompt + generated); lower is better; "
                 "lock step ~ time ratio 1 whatever the work; '-': not run (unsupported) or nothing to compare")
    if memory:
        m = memory
        notes.append(
            f"memory (Qwen3-4B bf16 KV, {m['bytes_per_token'] / 1024:.0f} KiB/token, 40 GB): dense lock step "
            f"{m['dense_rows']} rows (32768 x {m['bytes_per_token']} B = {m['dense_bytes_per_row'] / 1e9:.2f} GB a row); "
            f"paged ({m['page_size']}-token pages, {m['pool_pages']} pages, full length reserved) {m['paged_rows_mean']:.0f} "
            f"rows admitted at once (min {m['paged_rows_min']}, max {m['paged_rows_max']} over "
            f"{len(m['paged_rows_per_draw'])} draws; {m['expected_rows']:.0f} at the mean length {m['mean_length']:.0f})")
    notes.append(f"load average (1 min) at start / end: {load_start:.1f} / {os.getloadavg()[0]:.1f} on "
                 f"{os.cpu_count()} CPUs shared with other jobs: min of {args.repeats} timed round(s) after a warm-up")
    env = _common.environment()
    _common.print_table(f"Generation engine workloads ({env['device']}, {env['backend']})", columns, rows, notes)
    _common.write_json(args.json, {"benchmark": "engine", "args": vars(args), "environment": env,
                                   "loadavg_1m_start": load_start, "small_config": SMALL, "results": results,
                                   "memory": memory})


if __name__ == "__main__":
    sys.exit(main())
