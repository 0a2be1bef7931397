"""DAMI-Pref end to end on any problem set: rollouts -> preferences -> features -> training -> export.

`run(cfg, out_dir)` is what `train_pref.py` calls. The pair is `cfg.pair` (`toy`
or a pair YAML, as every command names it) and the prompts are `cfg.prompts` (a
problem set, as `dami eval --bench` names it: `toy`, a benchmark split, a
`.jsonl`). Each problem is asked as the eval asks it (the pair's chat template
and math instruction), rollouts sample with the pair's sampling settings up to
its max_new_tokens, and every answer is graded with the eval's Math-Verify
grading against the problem's gold.

out_dir receives the reward model (reward_model.json + params.npz: what
`pref:DIR` loads), metrics.jsonl and report.json; `work_dir` (default
out_dir/work) holds the resumable state: rollouts.jsonl, features.npz and Orbax
checkpoints (one directory per training settings, so retraining with new
settings reuses the rollouts). Rerunning the same command after an
interruption continues every stage where it stopped.

Under several processes (dami_jax/distributed.py) every process runs `run`: the
rollouts' units and the final check's problems are split across them, the
features come from process 0 (its cache) to all, and the reward model trains
on one mesh over every process's devices (pref/train.py). Process 0 alone
writes out_dir and the caches in work_dir; Orbax's checkpoints are written by
all processes together, so `work_dir` must be a directory every process sees
(one disk, or an NFS share mounted at the same path on every host).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import numpy as np

from dami_jax import distributed
from dami_jax.config import ConfigError
from dami_jax.eval.benchmarks import Problem
from dami_jax.eval.grading import grade
from dami_jax.eval.pairs import PairConfig, load_pair_config, open_pair
from dami_jax.eval.problem_sets import load_problem_set
from dami_jax.eval.run import eval_prompts
from dami_jax.generate.sampling import Greedy
from dami_jax.models.sharding import make_mesh
from dami_jax.policies.base import build_policy, pair_fingerprint
from dami_jax.pref.calibrate import calibrate_beta
from dami_jax.pref.config import FEATURE_FIELDS, TRAIN_FIELDS, PrefConfig
from dami_jax.pref.features import prompt_features
from dami_jax.pref.policy import PrefPolicy
from dami_jax.pref.preferences import preference_pairs, split_by_query
from dami_jax.pref.rollouts import collect_rollouts, prompts_digest
from dami_jax.pref.reward_model import save_reward_model
from dami_jax.pref.train import PrefData, train_reward_model
from dami_jax.files import write_json


@dataclasses.dataclass
class Task:
    """What a run needs before any model loads: the pair's config and the problems."""

    pair_cfg: PairConfig
    problems: list[Problem]
    eval_problems: list[Problem] | None


def load_task(cfg: PrefConfig) -> Task:
    """The pair config and the problem sets, checked (a typo fails here, before a model loads)."""
    pair_cfg = load_pair_config(cfg.pair, list(cfg.pair_overrides))
    try:
        pair_cfg.sampling()
    except ValueError as e:
        raise ConfigError(f"pair {cfg.pair}: rollouts sample n answers per (q, λ): {e}") from e
    problems = load_problem_set(cfg.prompts)
    if len(problems) < 2:
        raise ConfigError(f"PrefConfig.prompts: {cfg.prompts.name} has {len(problems)} problem(s), need >= 2")
    held = load_problem_set(cfg.eval_prompts) if cfg.eval_prompts is not None else None
    return Task(pair_cfg, problems, held)


def math_grader(tokenizer, problems: list[Problem]):
    """grader(i, ids) -> bool: the eval's Math-Verify grade of the decoded answer against problem i's
    gold (an (answer text, gold) pair is graded once: rollouts repeat answers)."""
    seen: dict[tuple[str, str], bool] = {}

    def grader(i: int, ids) -> bool:
        key = (tokenizer.decode(ids, skip_special_tokens=True), problems[i].gold)
        if key not in seen:
            seen[key] = grade(*key).correct
        return seen[key]

    return grader


def cached_features(pair, prompts, cfg: PrefConfig, path: str, mesh=None) -> np.ndarray:
    """h(q) of every prompt, computed once and reused while (pair, prompts, FEATURE_FIELDS) match:
    process 0 reads or computes (and caches) them, every process receives them (a small cost
    next to the rollouts')."""
    feats = _cached_features(pair, prompts, cfg, path, mesh) if distributed.is_writer() else None
    return distributed.broadcast_array(feats, (len(prompts), pair.cfg.hidden_size), np.float32)


def _cached_features(pair, prompts, cfg: PrefConfig, path: str, mesh) -> np.ndarray:
    key = f"{pair_fingerprint(pair)}:{prompts_digest(prompts)}:{cfg.fingerprint(FEATURE_FIELDS)}"
    if os.path.isfile(path):
        with np.load(path) as z:
            if str(z["key"]) == key:
                return z["feats"]
    feats = prompt_features(pair.cfg, pair.instruct, prompts, cfg.hidden_layer, cfg.pooling,
                            batch=cfg.feature_batch, mesh=mesh, probe_tokens=cfg.probe_tokens,
                            stop_tokens=pair.stop_tokens)
    np.savez(path, feats=feats, key=np.asarray(key))
    return feats


def build_data(pair, pair_cfg: PairConfig, problems: list[Problem], cfg: PrefConfig, work: str, mesh=None,
               progress=True):
    """(PrefData, rollouts) for these problems: the first three stages, each cached in `work`."""
    prompts = eval_prompts(pair, pair_cfg, problems)
    ro = collect_rollouts(pair, prompts, math_grader(pair.tokenizer, problems), os.path.join(work, "rollouts.jsonl"),
                          lams=cfg.lam_grid, n_samples=cfg.n_samples, sampling=pair_cfg.sampling(),
                          max_new_tokens=pair_cfg.max_new_tokens, batch=cfg.rollout_batch, seed=cfg.rollout_seed,
                          progress=progress, engine=pair_cfg.engine_size())
    prefs = preference_pairs(ro.acc(), ro.cost(), ro.lams, cfg.eps_acc, cfg.eps_cost)
    train, held, held_q = split_by_query(prefs, len(prompts), cfg.heldout_share, cfg.seed)
    feats = cached_features(pair, prompts, cfg, os.path.join(work, "features.npz"), mesh)
    return PrefData(feats, train, held, held_q), ro


def rollout_summary(ro) -> dict:
    acc, cost = ro.acc(), ro.cost()
    return {"lams": ro.lams.tolist(), "accuracy": acc.mean(0).round(4).tolist(),
            "mean_tokens": cost.mean(0).round(2).tolist(),
            "oracle_accuracy": float(acc.max(1).mean())}


def policy_check(pair, pair_cfg: PairConfig, policies: dict, problems: list[Problem]) -> dict:
    """Greedy accuracy, mean tokens and mean λ of each policy on the problems (graded as the eval
    grades); under several processes each answers its shard, whole engine batches as the eval deals them."""
    prompts = eval_prompts(pair, pair_cfg, problems)
    rows = {}
    for name, policy in policies.items():
        graded = functools.partial(_graded, pair, pair_cfg, policy, problems, prompts)
        correct, tokens, lam = zip(*distributed.map_sharded(graded, list(range(len(problems))),
                                                            block=pair_cfg.batch_size))
        rows[name] = {"accuracy": float(np.mean(correct)), "mean_tokens": float(np.mean(tokens)),
                      "lam_mean": float(np.mean(lam))}
    return rows


def _graded(pair, pair_cfg: PairConfig, policy, problems, prompts, mine: list[int]) -> list[tuple[bool, int, float]]:
    """(correct, tokens, λ) of the problems `mine`, answered greedily."""
    from dami_jax.policies.execute import answer

    out, chosen = answer(pair, policy, [prompts[i] for i in mine], pair_cfg.max_new_tokens, sampling=Greedy(),
                         **pair_cfg.engine_size())
    texts = [pair.tokenizer.decode(ids, skip_special_tokens=True) for ids in out.token_lists()]
    return [(grade(t, problems[i].gold).correct, int(n), float(lam))
            for i, t, n, lam in zip(mine, texts, out.lengths, chosen.lam)]


def evaluate(pair, pair_cfg: PairConfig, policy, problems: list[Problem]) -> dict:
    """The pref policy against λ = 1 (Thinking) and λ = 0 (Instruct), greedy."""
    rows = policy_check(pair, pair_cfg, {"pref": policy, "static:1": build_policy("static:1"),
                                         "static:0": build_policy("static:0")}, problems)
    top = rows["static:1"]
    rows["pref"]["accuracy_vs_static1"] = rows["pref"]["accuracy"] - top["accuracy"]
    rows["pref"]["token_ratio_vs_static1"] = rows["pref"]["mean_tokens"] / top["mean_tokens"]
    return {"n": len(problems), "greedy": True, "max_new_tokens": pair_cfg.max_new_tokens, "policies": rows}


def print_eval(report: dict) -> None:
    print(f"check: {report['n']} held-out problems, greedy")
    print(f"{'policy':>9} {'acc':>6} {'tokens':>8} {'λ mean':>7}")
    for name, r in report["policies"].items():
        print(f"{name:>9} {r['accuracy']:>6.3f} {r['mean_tokens']:>8.1f} {r['lam_mean']:>7.3f}")
    p = report["policies"]["pref"]
    print(f"pref vs λ=1: {100 * p['accuracy_vs_static1']:+.1f} accuracy points, "
          f"{100 * p['token_ratio_vs_static1']:.0f}% of its tokens")


def calibrate(model, meta: dict, data: PrefData, ro, target_drop: float):
    """β for `target_drop` on the held-out queries' rollouts (pref/calibrate.py)."""
    policy = PrefPolicy(model, meta)
    q = data.heldout_queries
    return calibrate_beta(policy.grid_scores(data.feats[q]), np.asarray(policy.grid), ro.acc()[q], ro.cost()[q],
                          ro.lams, target_drop)


def run(cfg: PrefConfig, out_dir: str, work_dir: str | None = None, *, mesh=None, progress: bool = True,
        task: Task | None = None) -> dict:
    """The whole pipeline (module docstring); `mesh` is the reward model's training mesh
    (default: cfg.mesh_data devices on the data axis, every process's); `task`: load_task(cfg),
    if the caller checked it already. Returns the report (on every process)."""
    t0 = time.perf_counter()
    task = task or load_task(cfg)
    work = work_dir or os.path.join(out_dir, "work")
    writer = distributed.is_writer()
    say = print if writer else _silent
    if writer:
        os.makedirs(work, exist_ok=True)
        os.makedirs(out_dir, exist_ok=True)
    pair_cfg = task.pair_cfg
    pair = open_pair(pair_cfg)
    pair_mesh = (None if tuple(pair_cfg.mesh) == (1, 1, 1)  # open_pair's mesh: this process's devices
                 else make_mesh(*pair_cfg.mesh, devices=jax.local_devices()))
    data, ro = build_data(pair, pair_cfg, task.problems, cfg, work, pair_mesh, progress)
    say(f"rollouts: {len(task.problems)} prompts ({cfg.prompts.name}) x {len(ro.lams)} λ x {cfg.n_samples} "
        f"samples; preference pairs: {len(data.train)} train, {len(data.heldout)} held-out "
        f"({len(data.heldout_queries)} queries) [{time.perf_counter() - t0:.0f} s]")
    ckpt = os.path.join(work, f"checkpoints-{cfg.fingerprint(TRAIN_FIELDS)}")  # new settings: a new run
    result = train_reward_model(cfg, data, ckpt, mesh=mesh,
                                metrics_path=os.path.join(out_dir, "metrics.jsonl"), progress=progress)
    m = result.metrics
    say(f"held-out pair accuracy {m['heldout_acc']}, loss {m['heldout_loss']} over {m['heldout_pairs']} pairs; "
        f"mean λ {m['lam_mean']:.3f} [{time.perf_counter() - t0:.0f} s]")
    meta = {"fingerprint": pair_fingerprint(pair), "hidden_layer": cfg.hidden_layer, "pooling": cfg.pooling,
            "probe_tokens": cfg.probe_tokens, "inference_points": cfg.inference_points,
            "feature_batch": cfg.feature_batch, "beta": 0.0,
            "config": dataclasses.asdict(cfg), "pair_config": dataclasses.asdict(pair_cfg), "heldout": m}
    report = {"rollouts": rollout_summary(ro), "train_pairs": len(data.train), "heldout": m}
    if cfg.target_drop is not None:
        cal = calibrate(result.model, meta, data, ro, cfg.target_drop)
        meta["beta"], meta["beta_calibration"] = cal.beta, dataclasses.asdict(cal)
        report["beta_calibration"] = meta["beta_calibration"]
        say(f"β = {cal.beta:.4g} for a drop <= {cal.target_drop}: held-out accuracy {cal.accuracy:.3f} "
            f"(λ=1: {cal.reference_accuracy:.3f}), mean λ {cal.mean_lam:.3f}, "
            f"{cal.mean_tokens:.1f} tokens (λ=1: {cal.reference_tokens:.1f})")
    if writer:
        save_reward_model(result.model, out_dir, meta)
    if task.eval_problems:  # the model as saved (float32 params), held by every process
        report["eval"] = evaluate(pair, pair_cfg, PrefPolicy(result.model, meta, out_dir), task.eval_problems)
        if writer:
            print_eval(report["eval"])
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if writer:
        write_json(os.path.join(out_dir, "report.json"), report)
    say(f"wrote {out_dir}/reward_model.json, params.npz, report.json [{report['seconds']:.0f} s]")
    return report


def _silent(*args, **kwargs) -> None:
    """print's stand-in on the processes other than 0."""
