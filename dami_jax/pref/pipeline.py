"""DAMI-Pref end to end on the toy world: rollouts -> preferences -> features -> training -> export.

`run(cfg, out_dir)` is what `train_pref.py` calls. out_dir receives the reward
model (reward_model.json + params.npz: what `pref:DIR` loads), metrics.jsonl
and report.json; `work_dir` (default out_dir/work) holds the resumable state:
rollouts.jsonl, features.npz and Orbax checkpoints (one directory per training
settings, so retraining with new settings reuses the rollouts). Rerunning the
same command after an interruption continues every stage where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from dami_jax.generate.sampling import Sample
from dami_jax.policies.base import pair_fingerprint
from dami_jax.pref.config import FEATURE_FIELDS, TRAIN_FIELDS, PrefConfig
from dami_jax.pref.features import prompt_features
from dami_jax.pref.preferences import preference_pairs, split_by_query
from dami_jax.pref.rollouts import collect_rollouts, prompts_digest
from dami_jax.pref.reward_model import save_reward_model
from dami_jax.pref.train import PrefData, train_reward_model


def load_task_pair(cfg: PrefConfig):
    from dami_jax.pair import load_pair
    from dami_jax.toyworld import default_pair_dirs

    instruct, thinking = default_pair_dirs(cfg.pair)
    return load_pair(instruct, thinking)


def cached_features(pair, prompts, cfg: PrefConfig, path: str, mesh=None) -> np.ndarray:
    """h(q) of every prompt, computed once and reused while (pair, prompts, FEATURE_FIELDS) match."""
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


def build_data(pair, prompts, grader, cfg: PrefConfig, work: str, mesh=None, progress=True):
    """(PrefData, rollouts) for these prompts: the first three stages, each cached in `work`."""
    ro = collect_rollouts(pair, prompts, grader, os.path.join(work, "rollouts.jsonl"), lams=cfg.lam_grid,
                          n_samples=cfg.n_samples, sampling=Sample(cfg.temperature, cfg.top_k, cfg.top_p),
                          max_new_tokens=cfg.max_new_tokens, batch=cfg.rollout_batch, seed=cfg.rollout_seed,
                          progress=progress)
    prefs = preference_pairs(ro.acc(), ro.cost(), ro.lams, cfg.eps_acc, cfg.eps_cost)
    train, held, held_q = split_by_query(prefs, len(prompts), cfg.heldout_share, cfg.seed)
    feats = cached_features(pair, prompts, cfg, os.path.join(work, "features.npz"), mesh)
    return PrefData(feats, train, held, held_q), ro


def rollout_summary(ro) -> dict:
    acc, cost = ro.acc(), ro.cost()
    return {"lams": ro.lams.tolist(), "accuracy": acc.mean(0).round(4).tolist(),
            "mean_tokens": cost.mean(0).round(2).tolist(),
            "oracle_accuracy": float(acc.max(1).mean())}


def run(cfg: PrefConfig, out_dir: str, work_dir: str | None = None, *, mesh=None, progress: bool = True) -> dict:
    from dami_jax.pref.policy import PrefPolicy
    from dami_jax.pref.toy import evaluate_toy, print_eval, toy_task

    t0 = time.perf_counter()
    work = work_dir or os.path.join(out_dir, "work")
    os.makedirs(work, exist_ok=True)
    os.makedirs(out_dir, exist_ok=True)
    pair = load_task_pair(cfg)
    _, prompts, grader = toy_task(cfg.train_prompts, cfg.prompt_seed)
    data, ro = build_data(pair, prompts, grader, cfg, work, mesh, progress)
    print(f"rollouts: {len(prompts)} prompts x {len(ro.lams)} λ x {cfg.n_samples} samples; "
          f"preference pairs: {len(data.train)} train, {len(data.heldout)} held-out "
          f"({len(data.heldout_queries)} queries) [{time.perf_counter() - t0:.0f} s]")
    ckpt = os.path.join(work, f"checkpoints-{cfg.fingerprint(TRAIN_FIELDS)}")  # new settings: a new run
    result = train_reward_model(cfg, data, ckpt, mesh=mesh,
                                metrics_path=os.path.join(out_dir, "metrics.jsonl"), progress=progress)
    m = result.metrics
    print(f"held-out pair accuracy {m['heldout_acc']}, loss {m['heldout_loss']} over {m['heldout_pairs']} pairs; "
          f"mean λ {m['lam_mean']:.3f} [{time.perf_counter() - t0:.0f} s]")
    meta = {"fingerprint": pair_fingerprint(pair), "hidden_layer": cfg.hidden_layer, "pooling": cfg.pooling,
            "probe_tokens": cfg.probe_tokens, "inference_points": cfg.inference_points,
            "feature_batch": cfg.feature_batch,
            "config": dataclasses.asdict(cfg), "heldout": result.metrics}
    save_reward_model(result.model, out_dir, meta)
    report = {"rollouts": rollout_summary(ro), "train_pairs": len(data.train), "heldout": result.metrics}
    if cfg.eval_prompts:
        policy = PrefPolicy.from_dir(out_dir, pair)
        report["eval"] = evaluate_toy(pair, policy, cfg.eval_prompts, cfg.eval_seed, cfg.max_new_tokens)
        print_eval(report["eval"])
    report["seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out_dir}/reward_model.json, params.npz, report.json [{report['seconds']:.0f} s]")
    return report
