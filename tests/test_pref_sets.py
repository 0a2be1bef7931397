"""DAMI-Pref on a prompt set other than the built-in toy one: toy problems written as a JSONL file of
`question` / `answer` rows give exactly the toy set's preferences; `train_pref.py` on the file
survives SIGKILL; its reward model evaluates as `pref:DIR`; bad prompt specs are clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dami_jax.config import ConfigError
from dami_jax.eval.problem_sets import ProblemSet, load_problem_set, toy_problems
from dami_jax.pref import load_pref_config, load_rollouts
from helpers import sigkill_when

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREF_TOY = os.path.join(ROOT, "configs", "pref_toy.yaml")
TOY_12 = "{name: toy, limit: 12, seed: 1234}"
# Small and fast on the toy pair: 8 new tokens (λ = 0 answers in 4, λ = 1 cannot finish its trace,
# so answers differ in correctness and cost), a 3-point grid, 2 samples in units of 2 prompts.
SMALL = ["pair_overrides=[max_new_tokens=8]", "lam_grid=[0.0, 0.5, 1.0]", "n_samples=2", "rollout_batch=2",
         "steps=6", "batch_size=8", "log_every=2", "eval_every=3", "checkpoint_every=3", "heldout_share=0.25",
         "eval_prompts=null"]


def write_questions(path, problems) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps({"question": p.question, "answer": p.gold}) + "\n" for p in problems)
    return f"{{name: {path}, fields: {{id: null}}}}"  # rows carry no id: number them


def small_cfg(prompts: str, *more):
    return load_pref_config(PREF_TOY, [*SMALL, f"prompts={prompts}", *more])


# ---------------------------------------------------------------------------
# Prompt specs

@pytest.mark.parametrize("spec, match", [
    ("{name: toy, sed: 3}", r"unknown key\(s\) \['sed'\]"),
    ("{name: gsm8k, splt: train}", r"unknown key\(s\) \['splt'\]"),
    ("{name: q.jsonl, fields: {question: q, anser: a}}", r"unknown key\(s\) \['anser'\]"),
    ("{name: gsm8k, seed: 3}", "seed applies to the toy problems only"),
    ("{name: toy, split: train}", "split applies to hub benchmarks"),
    ("{name: toy, fields: {question: q}}", "toy problems take no field map"),
    ("nosuch", "unknown problem set 'nosuch'"),
    ("{name: toy, limit: 0}", "limit must be >= 1"),
    ("[toy]", "expected a name or a mapping"),
])
def test_bad_prompt_specs_are_clear_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        load_pref_config(PREF_TOY, [f"prompts={spec}"])


def test_prompt_specs_name_the_eval_problem_sets(tmp_path):
    from dami_jax.eval.run import toy_benchmark

    assert load_problem_set("toy") == toy_benchmark()  # `toy` is the eval's toy bench
    assert ProblemSet.of({"name": "gsm8k", "split": "train"}) == ProblemSet("gsm8k", split="train")
    spec = write_questions(tmp_path / "q.jsonl", toy_problems(5, 7))
    got = load_problem_set(load_pref_config(PREF_TOY, [f"prompts={spec}"]).prompts)
    assert [(p.question, p.gold) for p in got] == [(p.question, p.gold) for p in toy_problems(5, 7)]
    assert got[0].id == "q.jsonl-0"


def test_a_missing_prompt_file_fails_before_the_pair_loads(tmp_path, monkeypatch):
    from dami_jax.pref import pipeline

    def no_load(*a, **k):
        raise AssertionError("the pair must not load before the prompts are checked")

    monkeypatch.setattr(pipeline, "open_pair", no_load)
    with pytest.raises(FileNotFoundError, match="nosuch.jsonl"):
        pipeline.run(small_cfg(f"{tmp_path}/nosuch.jsonl"), str(tmp_path / "out"), progress=False)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        pipeline.run(small_cfg(TOY_12, "pair_overrides=[temperature=0]"), str(tmp_path / "out"), progress=False)
    with pytest.raises((ConfigError, FileNotFoundError), match="no/such/pair.yaml"):
        pipeline.run(small_cfg(TOY_12, "pair=no/such/pair.yaml"), str(tmp_path / "out"), progress=False)


# ---------------------------------------------------------------------------
# The same problems as `toy` and as a JSONL file

@pytest.mark.slow
def test_jsonl_problems_give_the_toy_preferences(tmp_path):
    from dami_jax.eval.pairs import open_pair
    from dami_jax.pref.pipeline import build_data, load_task

    spec = write_questions(tmp_path / "q.jsonl", toy_problems(12, 1234))
    as_toy, as_file = small_cfg(TOY_12), small_cfg(spec)
    toy_task, file_task = load_task(as_toy), load_task(as_file)
    assert toy_task.pair_cfg == file_task.pair_cfg and toy_task.pair_cfg.max_new_tokens == 8
    pair = open_pair(toy_task.pair_cfg)
    a, ro_a = build_data(pair, toy_task.pair_cfg, toy_task.problems, as_toy, str(tmp_path / "a"), progress=False)
    b, ro_b = build_data(pair, file_task.pair_cfg, file_task.problems, as_file, str(tmp_path / "b"), progress=False)
    assert 0 < ro_a.acc().mean() < 1 and len(a.train) > 0  # graded answers of both kinds: pairs to learn
    for x, y in ((ro_a.correct, ro_b.correct), (ro_a.tokens, ro_b.tokens), (a.feats, b.feats),
                 (a.heldout_queries, b.heldout_queries)):
        np.testing.assert_array_equal(x, y)
    for prefs_a, prefs_b in ((a.train, b.train), (a.heldout, b.heldout)):
        for field in ("query", "win", "lose"):
            np.testing.assert_array_equal(getattr(prefs_a, field), getattr(prefs_b, field))


# ---------------------------------------------------------------------------
# train_pref.py on the JSONL set: SIGKILL mid-rollouts, rerun, then `pref:DIR` in the eval

def _launch(out, spec):
    cmd = [sys.executable, os.path.join(ROOT, "train_pref.py"), "--config", PREF_TOY, "--out", str(out),
           "--no-progress", *SMALL, f"prompts={spec}"]
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc, what: str) -> None:
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{out[-3000:]}"


def _records(path) -> list[tuple]:
    """(prompt, λ, sample) of each complete record line of a rollouts file (header skipped)."""
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw[: raw.rfind(b"\n") + 1].decode().splitlines()[1:]
    return [(r["prompt"], r["lam"], r["sample"]) for r in map(json.loads, lines)]


def _kill_mid_rollouts(proc, path, total: int, deadline_s: float = 400) -> list[tuple]:
    """SIGKILL once some but not all rollouts are on disk; returns the records written by then."""
    sigkill_when(proc, lambda: 0 < len(_records(path) if os.path.isfile(path) else []) < total,
                 "some but not all rollouts were on disk", deadline_s)
    return _records(path)


@pytest.mark.slow
def test_train_pref_on_jsonl_survives_sigkill_and_serves_as_pref_dir(tmp_path):
    from dami_jax.eval.pairs import load_pair_config, open_pair
    from dami_jax.eval.run import eval_prompts, run_eval
    from dami_jax.pref import PrefPolicy

    spec = write_questions(tmp_path / "q.jsonl", toy_problems(12, 1234))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    total = 12 * 3 * 2  # prompts x λ x samples, in 12 units of 6 records
    reference = _launch(whole, spec)  # runs alongside: only its end result is compared
    victim = _launch(killed, spec)
    try:
        before = _kill_mid_rollouts(victim, killed / "work" / "rollouts.jsonl", total)
        assert not (killed / "reward_model.json").exists()
        _finish(_launch(killed, spec), "the rerun")  # the same command on the same directory
    finally:
        for p in (reference, victim):
            if p.poll() is None:
                p.kill()
    _finish(reference, "the uninterrupted run")
    # Every answer present; those of the units finished before the kill were not generated again.
    after = _records(killed / "work" / "rollouts.jsonl")
    assert set(after) == set(_records(whole / "work" / "rollouts.jsonl")) and len(set(after)) == total
    finished = [key for key in before if sum(k[0] // 2 == key[0] // 2 and k[2] == key[2] for k in before) == 6]
    assert finished and all(after.count(key) == 1 for key in finished)
    # The rerun ends where the uninterrupted run does: same rollouts, same reward model, same log.
    a, b = load_rollouts(whole / "work" / "rollouts.jsonl"), load_rollouts(killed / "work" / "rollouts.jsonl")
    np.testing.assert_array_equal(a.correct, b.correct)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    with np.load(whole / "params.npz") as x, np.load(killed / "params.npz") as y:
        assert sorted(x.files) == sorted(y.files)
        for k in x.files:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert (killed / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
    # The reward model is a policy of the eval: `pref:DIR` on the eval's toy problems.
    pair_cfg = load_pair_config("toy", ["max_new_tokens=8"])
    pair = open_pair(pair_cfg)
    rows = run_eval(pair, pair_cfg, ["toy"], [f"pref:{killed}", "static:0"], out_dir=str(tmp_path / "eval"),
                    limit=12, progress=False)
    pref = next(r for r in rows if r["policy"] == f"pref:{killed}")
    assert pref["n_items"] == 12 and 0.0 <= pref["lam_mean"] <= 1.0 and 0.0 <= pref["accuracy"] <= 1.0
    records = [json.loads(x) for x in (tmp_path / "eval" / "records_toy.jsonl").read_text().splitlines()]
    lams = np.array([r["lam"] for r in records if r["policy"] == f"pref:{killed}"])
    policy = PrefPolicy.from_dir(killed, pair)
    want = policy(eval_prompts(pair, pair_cfg, load_problem_set("toy")[:12]), pair).lam
    np.testing.assert_allclose(lams, want, atol=1e-6)  # the records hold the reward model's choices
