"""The DAMI workload end to end: `dami eval` on the toy pair, each policy's wall time and work.

What a user of `dami eval --pair toy --bench toy --policies static:1,conf,static:0` waits
for, timed by the eval itself (`dami_jax.eval.run.run_eval`, in this process, after its
per-policy warm-up): a policy's seconds over the whole run, its λ choice (Conf's scoring
pass) included. The reference is static:1 (the Thinking model) of the same run; the
speed-up is its seconds over a policy's. Target: conf ≥ 1.05x.

Beside the time, the work each policy processed, in tokens:
- prompt: the prompts' tokens (one prefill each);
- scoring: Conf's probe (the Instruct model's prompt pass and its greedy probe tokens, and
  the Thinking model's teacher-forced pass over both when the calibration weighs JS);
- generated: answer tokens the engine generated (a λ = 0 row whose probe already ended
  reuses it, so its tokens count under scoring, not twice);
so the time ratios can be read against the work ratios.

    nice python benchmarks/dami_workload.py --json benchmarks/results/dami_workload_toy.json
    python benchmarks/dami_workload.py --limit 60                # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

POLICIES = ("static:1", "conf", "static:0")


def work_of(pair, pair_cfg, policy, prompts: list[list[int]]) -> dict:
    """Tokens a policy processes on these prompts (see the module doc); untimed."""
    from dami_jax.generate.sampling import Greedy
    from dami_jax.policies.execute import reusable_answers

    chosen = policy(prompts, pair)
    prompt = sum(map(len, prompts))
    scoring = 0
    if chosen.instruct_answers is not None:  # conf / routing: the probe ran
        conf = policy.calibration.conf
        probe = int(chosen.info["probe_len"].sum())
        scoring = (prompt + probe) * (2 if conf.w_js != 0 else 1)
        reused = [ids is not None for ids in reusable_answers(chosen, Greedy(), pair_cfg.max_new_tokens)]
    else:
        reused = [False] * len(prompts)
    return dict(prompt=prompt, scoring=scoring, reused_rows=int(sum(reused)), reused=reused)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--limit", type=int, default=None, help="problems (default: all 300)")
    ap.add_argument("--repeats", type=int, default=2, help="whole eval runs; each policy's minimum is kept")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import json

    from dami_jax.eval import run as eval_run
    from dami_jax.eval.pairs import expand_policy, load_pair_config, open_pair
    from dami_jax.policies.base import build_policy

    policies = args.policies.split(",")
    if "static:1" not in policies:
        ap.error("--policies must include static:1 (the reference)")
    pair_cfg = load_pair_config("toy")
    pair = open_pair(pair_cfg)
    load_start = os.getloadavg()[0]
    seconds, rows = {}, {}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            for r in eval_run.run_eval(pair, pair_cfg, ["toy"], policies, out_dir=out, limit=args.limit,
                                       progress=False):
                seconds[r["policy"]] = min(seconds.get(r["policy"], float("inf")), r["seconds"])
                rows[r["policy"]] = r
            with open(os.path.join(out, "records_toy.jsonl")) as f:
                records = [json.loads(line) for line in f]
    problems = eval_run.load_problems("toy", args.limit)
    prompts = eval_run.eval_prompts(pair, pair_cfg, problems)
    table, results = [], []
    for spec in policies:
        policy = build_policy(expand_policy(spec, pair_cfg), pair)
        work = work_of(pair, pair_cfg, policy, prompts)
        tokens = {r["id"]: r["tokens"] for r in records if r["policy"] == spec}
        gen = sum(tokens[p.id] for i, p in enumerate(problems) if not work["reused"][i])
        processed = work["prompt"] + work["scoring"] + gen
        res = dict(policy=spec, seconds=seconds[spec], speedup=seconds["static:1"] / seconds[spec],
                   accuracy=rows[spec]["accuracy"], prompt_tokens=work["prompt"], scoring_tokens=work["scoring"],
                   generated_tokens=gen, reused_rows=work["reused_rows"], processed_tokens=processed,
                   lam_mean=rows[spec]["lam_mean"])
        results.append(res)
        table.append([spec, res["accuracy"], res["seconds"], res["speedup"], work["prompt"], work["scoring"], gen,
                      work["reused_rows"], processed])
    ref = next(r for r in results if r["policy"] == "static:1")
    for res, row in zip(results, table):
        res["work_ratio"] = res["processed_tokens"] / ref["processed_tokens"]
        row.append(res["work_ratio"])
    _common.print_table(
        f"dami eval on the toy pair ({len(problems)} problems, engine rows {pair_cfg.batch_size}; "
        f"min of {args.repeats} runs)",
        ["policy", "accuracy", "seconds", "speed-up", "prompt", "scoring", "generated", "reused rows",
         "processed", "work ratio"], table,
        notes=["speed-up: static:1's seconds over the policy's (target: conf >= 1.05); work ratio: "
               "processed tokens over static:1's"])
    _common.write_json(args.json, dict(benchmark="dami_workload", environment=_common.environment(),
                                       load_start=load_start, load_end=os.getloadavg()[0], args=vars(args),
                                       results=results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
