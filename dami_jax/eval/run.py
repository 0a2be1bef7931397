"""`dami eval`: every policy on the same problems; accuracy, tokens and time side by side.

Per-sample records go to `OUT/records_<bench>.jsonl` as they are produced, so an
interrupted run resumes where it stopped and a finished one can be re-scored
without generating again. Each policy runs on the engine, `batch_size` rows at a
time, on chunks of SAVE_EVERY × batch_size prompts (a chunk's records are saved
together); a policy's `seconds` is its wall time over the chunks, its λ choice
(Conf's scoring pass, Pref's features) included. Outputs: one table per benchmark, `results.json`,
`results.csv` and `pareto_<bench>.png`.

Under several processes (dami_jax/distributed.py) each chunk is split across them: each
generates and grades its share with the pair on its own devices, and process 0 appends the
whole chunk's records and writes the results; the others write nothing.
"""

from __future__ import annotations

import csv
import functools
import os
import time

from tqdm.auto import tqdm

from dami_jax import distributed
from dami_jax.errors import InputError
from dami_jax.eval.benchmarks import Problem, load_benchmark, problem_prompt
from dami_jax.eval.metrics import summarize_by_policy
from dami_jax.eval.pairs import PairConfig, expand_policy
from dami_jax.eval.records import RecordStore, make_record
from dami_jax.generate.chat import chat_prompt
from dami_jax.generate.sampling import THINKING_DEFAULT, Greedy
from dami_jax.files import write_json

SAVE_EVERY = 4  # engine-fulls of prompts per saved chunk: a straggler tail per save buys resumability
REFERENCE = "static:1"  # speed-up and token ratios are against the Thinking model
COLUMNS = ("policy", "accuracy", "mean_tokens", "median_tokens", "think_share", "token_ratio",
           "seconds", "tokens_per_s", "speedup", "lam_mean")


def toy_benchmark(per_k: int = 50, seed: int = 20261127) -> list[Problem]:
    from dami_jax.toyworld import language as L

    problems = L.sample_problems(per_k * L.MAX_OPS, seed=seed)
    return [Problem(f"toy-k{p.k}-{i}", p.text, str(p.answer)) for i, p in enumerate(problems)]


def load_problems(name: str, limit: int | None) -> list[Problem]:
    if name == "toy":
        problems = toy_benchmark()
        return problems[:limit] if limit else problems
    return load_benchmark(name, limit=limit)


def eval_prompts(pair, pair_cfg: PairConfig, problems: list[Problem]) -> list[list[int]]:
    """The token ids each problem is asked with (chat template, and the math instruction if set)."""
    with_images = [p.id for p in problems if p.images]
    if with_images:  # the processor's features need the vision keywords of the engine (issue 18)
        raise InputError(f"problems {with_images[:3]}{' ...' if len(with_images) > 3 else ''} have images; "
                         "`dami eval` runs text-only problems until the engine takes image inputs")
    return [chat_prompt(pair.tokenizer, problem_prompt(p, pair_cfg.math_instruction)) for p in problems]


def run_eval(pair, pair_cfg: PairConfig, benches: list[str], policies: list[str], *, samples: int = 1,
             out_dir: str, limit: int | None = None, seed: int = 0, progress: bool = True) -> list[dict]:
    """Run and summarize; returns the result rows (one per benchmark × policy).

    Each policy first runs once untimed on its first batch_size prompts, so `seconds` (and
    the speed-up against λ = 1) measure the work, not compilation.
    """
    from dami_jax.policies.base import build_policy
    from dami_jax.policies.execute import answer

    sampling = Greedy() if samples == 1 else THINKING_DEFAULT
    writer = distributed.is_writer()
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    built = {spec: build_policy(expand_policy(spec, pair_cfg), pair) for spec in policies}
    rows = []
    for bench in benches:
        problems = load_problems(bench, limit)
        prompts = eval_prompts(pair, pair_cfg, problems)
        store = RecordStore(os.path.join(out_dir, f"records_{bench}.jsonl"))
        # process 0's records decide what is left: the others' disks may hold nothing, or an old copy
        done = {tuple(k) for k in distributed.from_writer(store.done_keys)}
        for spec, policy in built.items():
            warmup = True
            for sample in range(samples):
                todo = [i for i, p in enumerate(problems) if (spec, p.id, sample) not in done]
                # A global chunk is one chunk of a one-process run per process: each computes exactly
                # what one process would (the same batches), so the records are the same.
                size = SAVE_EVERY * pair_cfg.batch_size
                step = size * distributed.process_count()
                chunks = [todo[i: i + step] for i in range(0, len(todo), step)]
                kw = dict(sampling=sampling, seed=seed + sample, **pair_cfg.engine_size())
                run = functools.partial(_answer_records, pair, pair_cfg, policy, spec, sample, problems, prompts, kw)
                mine = distributed.shard(todo, block=size)[: pair_cfg.batch_size]
                if chunks and warmup and mine:  # compile outside the timed runs (an engine-full of prompts)
                    answer(pair, policy, [prompts[i] for i in mine], pair_cfg.max_new_tokens, **kw)
                    warmup = False
                for chunk in tqdm(chunks, desc=f"{bench} {spec} #{sample}", disable=not (progress and writer),
                                  leave=False):
                    t0 = time.perf_counter()
                    records = distributed.map_sharded(run, chunk, block=size)  # every process's share, in order
                    share = (time.perf_counter() - t0) / len(chunk)  # the chunk's wall time, summed back per policy
                    if writer:
                        store.extend({**r, "seconds": share} for r in records)
        if writer:
            rows += _summarize(bench, store.load(), policies, out_dir)
    if writer:
        _write_results(out_dir, rows)
    return distributed.broadcast_json(rows)


def _answer_records(pair, pair_cfg, policy, spec, sample, problems, prompts, kw, chunk):
    """The records of the problems at indices `chunk`: answered with the policy, graded."""
    from dami_jax.policies.execute import answer

    out, chosen = answer(pair, policy, [prompts[i] for i in chunk], pair_cfg.max_new_tokens, **kw)
    return _records(pair, spec, sample, [problems[i] for i in chunk], out, chosen)


def _records(pair, spec, sample, problems, out, chosen):
    texts = [pair.tokenizer.decode(ids, skip_special_tokens=True) for ids in out.token_lists()]
    return [make_record(spec, p.id, sample, text, p.gold, int(out.lengths[j]), choices=p.choices,
                        lam=float(chosen.lam[j]), finish_reason=out.finish_reasons[j])
            for j, (p, text) in enumerate(zip(problems, texts))]


def _summarize(bench: str, records: list[dict], policies: list[str], out_dir: str) -> list[dict]:
    records = [r for r in records if r["policy"] in policies]
    wall = {}
    for r in records:
        wall[r["policy"]] = wall.get(r["policy"], 0.0) + r.get("seconds", 0.0)
    ref = REFERENCE if REFERENCE in policies else None
    summary = summarize_by_policy(records, wall_s=wall, ref_policy=ref)
    rows = []
    for spec in policies:
        s = summary[spec]
        lams = [r["lam"] for r in records if r["policy"] == spec]
        rows.append({"bench": bench, "policy": spec, "accuracy": s["accuracy"], "mean_tokens": s["mean_tokens"],
                     "median_tokens": s["median_tokens"], "think_share": s["thinking_share"],
                     "token_ratio": s.get("token_ratio"), "seconds": s["wall_s"],
                     "tokens_per_s": s["tokens_per_s"], "speedup": s.get("speedup"),
                     "lam_mean": sum(lams) / len(lams), "n_items": s["n_items"],
                     "samples": s["samples_per_item"], "pass@1": s["pass@1"],
                     "gradable_share": s["gradable_share"]})
    _print_table(bench, rows)
    _plot(bench, rows, out_dir)
    return rows


def _print_table(bench: str, rows: list[dict]) -> None:
    print(f"\n{bench}: {rows[0]['n_items']} problems × {rows[0]['samples']} sample(s)")
    print("  ".join(f"{c:>13}" if i else f"{c:<16}" for i, c in enumerate(COLUMNS)))
    for r in rows:
        cells = [f"{r[c]:>13.3f}" if isinstance(r[c], float) else f"{str(r[c]):>13}" for c in COLUMNS[1:]]
        print(f"{r['policy']:<16}" + "  ".join(cells))


def _plot(bench: str, rows: list[dict], out_dir: str) -> None:
    from dami_jax.eval.plots import pareto_plot

    curve = [(float(r["policy"].split(":")[1]), r["mean_tokens"], r["accuracy"])
             for r in rows if r["policy"].startswith("static:")]
    points = {r["policy"]: (r["mean_tokens"], r["accuracy"]) for r in rows if not r["policy"].startswith("static:")}
    if curve or points:
        pareto_plot(points, curve, os.path.join(out_dir, f"pareto_{bench}.png"), title=f"{bench}: policies")


def _write_results(out_dir: str, rows: list[dict]) -> None:
    write_json(os.path.join(out_dir, "results.json"), rows, indent=2)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
