"""DAMI-Pref features on the toy world: prompt-only h(q) against h over prompt + a greedy probe,
both against DAMI-Conf's score. Can any of them tell which queries the Instruct model gets wrong?

On the toy world every static λ < 0.4 answers in 4 tokens and λ ≥ 0.6 thinks for 65, so a
policy is mostly a yes/no decision to think, and its accuracy-at-tokens is set by how well its
score ranks the queries Instruct gets wrong.

Method:
  * rollouts, preference pairs and reward-model training exactly as `train_pref.py` runs them
    (`--config` + overrides; rollouts cached in `--work`, so a train_pref.py work directory of
    the same settings is reused); one reward model per `--features` setting
    (hidden_layer:pooling:probe_tokens), everything else equal;
  * on held-out toy problem sets (`--seeds`, `--n` each), label = the Instruct model's greedy
    answer (λ = 0) is wrong; scores: r(q, 1) − r(q, 0) for Pref, s(q) for DAMI-Conf (the shipped
    toy calibration's ConfConfig);
  * per score: AUROC, and the share of queries a threshold must send to Thinking to catch 97%,
    99% and all of Instruct's wrong answers (lower is better; the oracle sends exactly the wrong
    ones);
  * per policy (Pref argmax λ, Conf): greedy accuracy and mean tokens against λ = 1.

Usage:
  python benchmarks/pref_features.py --work runs/pref_toy_work        # the shipped settings
  python benchmarks/pref_features.py --work runs/pg prompts.limit=2400 n_samples=1 \\
      "pair_overrides=[top_k=1, temperature=1.0]" \\
      --json benchmarks/results/pref_features_toy_greedy.json         # greedy rollouts (about 10 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402
import numpy as np  # noqa: E402
from conf_signals import auroc  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECALLS = (0.97, 0.99, 1.0)


def log(msg: str) -> None:
    print(f"[pref_features] {msg}", file=sys.stderr, flush=True)


def share_to_catch(score, positive, recall: float) -> float:
    """Smallest share of queries, taken by descending score, holding `recall` of the positives."""
    pos = np.asarray(positive, bool)[np.argsort(-np.asarray(score), kind="stable")]
    caught = np.cumsum(pos) / max(pos.sum(), 1)
    return float((np.searchsorted(caught, recall - 1e-9) + 1) / len(pos))


def parse_feature(spec: str) -> dict:
    layer, pooling, probe = spec.split(":")
    return {"hidden_layer": int(layer), "pooling": pooling, "probe_tokens": int(probe)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "pref_toy.yaml"))
    ap.add_argument("--work", required=True, help="rollouts cache (a train_pref.py work dir is reused)")
    ap.add_argument("--features", default="1:last:0,-1:last:0,-1:probe:16",
                    help="comma-separated hidden_layer:pooling:probe_tokens settings")
    ap.add_argument("--seeds", default="4242,5151,20261127", help="held-out toy problem sets")
    ap.add_argument("--n", type=int, default=300, help="problems per set")
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*", help="PrefConfig key=value overrides")
    args = ap.parse_args(argv)

    import jax.numpy as jnp

    from dami_jax.eval.pairs import expand_policy, open_pair, toy_pair_config
    from dami_jax.eval.problem_sets import toy_problems
    from dami_jax.eval.run import eval_prompts
    from dami_jax.pair import generate_pair
    from dami_jax.policies.base import build_policy, pair_fingerprint
    from dami_jax.pref.config import load_pref_config
    from dami_jax.pref.pipeline import build_data, load_task, math_grader
    from dami_jax.pref.policy import PrefPolicy
    from dami_jax.pref.train import train_reward_model

    base = load_pref_config(args.config, args.overrides)
    task = load_task(base)
    pair_cfg = task.pair_cfg
    pair = open_pair(pair_cfg)
    conf = build_policy(expand_policy("conf", toy_pair_config()), pair)

    def answers(problems, prompts, lam):
        """Greedy answers at per-query λ, graded as the eval grades: (correct (Q,), tokens (Q,))."""
        lam = np.broadcast_to(np.asarray(lam, np.float32), (len(prompts),))
        out = generate_pair(pair, prompts, lam, pair_cfg.max_new_tokens, **pair_cfg.engine_size())
        grader = math_grader(pair.tokenizer, problems)
        return np.array([grader(i, ids) for i, ids in enumerate(out.token_lists())]), out.lengths

    sets = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        problems = toy_problems(args.n, seed)
        prompts = eval_prompts(pair, pair_cfg, problems)
        c0, _ = answers(problems, prompts, 0.0)
        c1, t1 = answers(problems, prompts, 1.0)
        sets[seed] = {"problems": problems, "prompts": prompts, "wrong": ~c0, "lam1": (c1.mean(), t1.mean())}
        log(f"set {seed}: Instruct wrong on {(~c0).mean():.3f}, λ=1 {c1.mean():.3f} at {t1.mean():.1f} tokens")

    def measure(name: str, score_and_lam) -> dict:
        out = {}
        for seed, s in sets.items():
            score, lam = score_and_lam(s["prompts"])
            correct, tokens = answers(s["problems"], s["prompts"], lam)
            out[seed] = {"auroc": auroc(score, s["wrong"]),
                         "share_to_catch": {str(r): share_to_catch(score, s["wrong"], r) for r in RECALLS},
                         "accuracy": float(correct.mean()), "token_ratio": float(tokens.mean() / s["lam1"][1]),
                         "lam1_accuracy": float(s["lam1"][0])}
        log(f"{name}: " + "; ".join(f"{k} AUROC {v['auroc']:.3f} acc {v['accuracy']:.3f} at "
                                    f"{v['token_ratio']:.3f}" for k, v in out.items()))
        return out

    def conf_score(prompts):
        out = conf(prompts, pair)
        return out.info["score"], out.lam

    results = {"conf": {"setting": conf.spec, "sets": measure("conf", conf_score)}}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.features.split(","):
            cfg = dataclasses.replace(base, **parse_feature(spec))
            data, _ = build_data(pair, pair_cfg, task.problems, cfg, args.work)
            res = train_reward_model(cfg, data, os.path.join(tmp, spec.replace(":", "_")), progress=False)
            meta = {"fingerprint": pair_fingerprint(pair), "inference_points": cfg.inference_points,
                    **parse_feature(spec)}
            policy = PrefPolicy(res.model, meta)

            def margin(prompts, policy=policy, model=res.model):  # r(q, 1) − r(q, 0), and the policy's λ
                feats = policy.features(prompts, pair)
                r = np.asarray(model.grid_scores(jnp.asarray(feats), jnp.asarray([0.0, 1.0])))
                return r[:, 1] - r[:, 0], policy.lam_from_features(feats)[0]

            results[f"pref {spec}"] = {"setting": parse_feature(spec), "heldout_pair_acc": res.metrics["heldout_acc"],
                                       "sets": measure(f"pref {spec}", margin)}

    rows = []
    for name, r in results.items():
        for seed, v in r["sets"].items():
            rows.append([name, seed, r.get("heldout_pair_acc"), v["auroc"], *v["share_to_catch"].values(),
                         v["accuracy"], v["token_ratio"]])
    notes = [f"rollouts: {len(task.problems)} prompts x {len(base.lam_grid)} λ x {base.n_samples} samples "
             f"(T {pair_cfg.temperature}, top-k {pair_cfg.top_k}, top-p {pair_cfg.top_p}); training {base.steps} steps",
             "share@r: share of queries sent to Thinking (by descending score) to catch r of Instruct's wrong "
             "answers; acc / tokens: the policy's greedy accuracy and mean tokens / λ=1's"]
    _common.print_table("DAMI-Pref features vs DAMI-Conf: ranking Instruct's wrong answers",
                        ["score", "set", "pair acc", "AUROC", "share@.97", "share@.99", "share@1", "acc",
                         "tokens/λ=1"], rows, notes)
    _common.write_json(args.json, {"benchmark": "pref_features", "args": vars(args),
                                   "environment": _common.environment(), "config": dataclasses.asdict(base),
                                   "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
