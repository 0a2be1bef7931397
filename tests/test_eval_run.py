"""`dami eval` end to end on the shipped toy pair, resume, and the budget and deer baselines."""

import json

import numpy as np
import pytest

from dami_jax.eval import run as eval_run
from dami_jax.generate.sampling import Greedy, Sample
from dami_jax.eval.pairs import expand_policy, load_pair_config, open_pair
from dami_jax.policies import execute
from dami_jax.policies.base import build_policy
from dami_jax.pair import generate_pair
from dami_jax.policies.budget import generate_budget, think_end_ids
from dami_jax.toyworld import language as L


@pytest.fixture(scope="module")
def toy():
    cfg = load_pair_config("toy", ["batch_size=12"])
    return cfg, open_pair(cfg)


def test_eval_writes_every_policy_and_resumes(toy, tmp_path, monkeypatch):
    cfg, pair = toy
    policies = ["static:0", "static:1", "budget:8", "deer"]
    rows = eval_run.run_eval(pair, cfg, ["toy"], policies, out_dir=str(tmp_path), limit=12, progress=False)
    assert [r["policy"] for r in rows] == policies
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    for r in saved:
        for key in ("bench", "policy", "accuracy", "mean_tokens", "think_share", "seconds"):
            assert key in r
        assert 0.0 <= r["accuracy"] <= 1.0 and r["seconds"] > 0
    by = {r["policy"]: r for r in saved}
    assert by["static:0"]["think_share"] == 0.0 and by["static:1"]["think_share"] == 1.0
    assert by["static:0"]["mean_tokens"] < by["static:1"]["mean_tokens"]
    assert by["static:1"]["speedup"] == pytest.approx(1.0)
    # deer's trial answers are counted apart from its outputs' tokens (the toy's line-break trigger: every row probes)
    assert by["deer"]["probe_tokens"] > 0 and by["static:1"]["probe_tokens"] == 0
    assert by["deer"]["mean_tokens"] <= by["static:1"]["mean_tokens"]
    assert (tmp_path / "results.csv").exists() and (tmp_path / "pareto_toy.png").exists()
    with open(tmp_path / "records_toy.jsonl") as f:
        assert sum(1 for _ in f) == 12 * len(policies)

    # A second run finds every record done: nothing is generated again.
    def no_generation(*args, **kwargs):
        raise AssertionError("resumed run generated again")

    monkeypatch.setattr(execute, "answer", no_generation)
    again = eval_run.run_eval(pair, cfg, ["toy"], policies, out_dir=str(tmp_path), limit=12, progress=False)
    assert [(r["policy"], r["accuracy"]) for r in again] == [(r["policy"], r["accuracy"]) for r in rows]


def test_budget_cuts_thinking_and_forces_the_answer(toy):
    _, pair = toy
    end_id, forced = think_end_ids(pair.tokenizer)
    hard = [p for p in L.sample_problems(12, seed=3) if p.k == 6][:2]
    prompts = [L.to_ids(L.prompt_tokens(p)) for p in hard]
    full = generate_budget(pair, prompts, 96, 96)
    assert all(end_id in ids for ids in full.token_lists())  # thinks well past 8 tokens
    cut = generate_budget(pair, prompts, 8, 96)
    for ids in cut.token_lists():
        assert end_id not in ids[:8]
        assert ids[8: 8 + len(forced)] == forced  # the cut closes the thinking itself
        assert L.parse_answer(L.decode(ids)) is not None  # and the model then answers
    # (The toy Thinking model never saw a cut trace: after the forced `</think>` it
    # sometimes resumes working before answering, so output length is not asserted.)
    assert cut.finish_reasons == ["stop", "stop"]


def _two_pass_budget(pair, prompts, budget, max_new_tokens):
    """The simple reference: lock-step λ = 1 up to the budget (stopping at EOS or </think>),
    the cut forced on the host, then a second lock-step call for the rest."""
    end_id, forced = think_end_ids(pair.tokenizer)
    stops = pair.stop_tokens
    first = generate_pair(pair, prompts, 1.0, min(budget, max_new_tokens), mode="merged",
                          stop_tokens=stops + [end_id]).token_lists()
    rows, pending = [], []
    for i, head in enumerate(first):
        if not (head and head[-1] in stops):
            if not (head and head[-1] == end_id):
                head = (head + forced)[:max_new_tokens]
            if len(head) < max_new_tokens:
                pending.append(i)
        rows.append(head)
    if pending:  # greedy: a row's tokens do not depend on how far past its own limit the batch runs
        room = max_new_tokens - min(len(rows[i]) for i in pending)
        tails = generate_pair(pair, [prompts[i] + rows[i] for i in pending], 1.0, room, mode="merged")
        for i, tail in zip(pending, tails.token_lists()):
            rows[i] = rows[i] + tail[: max_new_tokens - len(rows[i])]
    return rows


def test_budget_equals_the_two_pass_reference(toy):
    _, pair = toy
    problems = L.sample_problems(10, seed=5)
    prompts = [L.to_ids(L.prompt_tokens(p)) for p in problems]
    for budget in (4, 12):
        got = generate_budget(pair, prompts, budget, 40, max_rows=5)
        assert got.token_lists() == _two_pass_budget(pair, prompts, budget, 40), budget


def test_policy_specs_expand_to_the_pairs_artifacts(toy):
    cfg, _ = toy
    cfg = type(cfg)(**{**cfg.__dict__, "conf_calibration": "cal.json", "pref_model": "rm"})
    assert expand_policy("conf", cfg) == "conf:cal.json"
    assert expand_policy("routing", cfg) == "routing:cal.json"
    assert expand_policy("pref", cfg) == "pref:rm"
    assert expand_policy("static:0.3", cfg) == "static:0.3"


def test_budget_policy_spec():
    policy = build_policy("budget:64")
    assert policy.thinking_budget == 64 and policy.spec == "budget:64"
    assert np.all(policy([[1], [2]], None).lam == 1.0)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        build_policy("budget:0")


def test_greedy_instruct_rows_reuse_the_conf_probe(toy, monkeypatch):
    cfg, pair = toy
    policy = build_policy(expand_policy("routing", cfg), pair)
    prompts = [L.to_ids(L.prompt_tokens(p)) for p in L.sample_problems(24, seed=9)]
    calls = []

    def counted(pair, prompts, lam, n, **kw):
        calls.append(len(prompts))
        return generate_pair(pair, prompts, lam, n, **kw)

    monkeypatch.setattr(execute, "generate_pair", counted)
    size = cfg.engine_size()  # the module's engine (12 rows): its programs are compiled already
    out, chosen = execute.answer(pair, policy, prompts, cfg.max_new_tokens, **size)
    reused = [i for i, ids in enumerate(execute.reusable_answers(chosen, Greedy(), cfg.max_new_tokens))
              if ids is not None]
    assert reused and len(reused) < len(prompts)  # both kinds of rows are in the batch
    assert all(chosen.lam[i] == 0.0 for i in reused) and calls == [len(prompts) - len(reused)]
    want = generate_pair(pair, prompts, chosen.lam, cfg.max_new_tokens, **size)
    assert out.token_lists() == want.token_lists() and out.finish_reasons == want.finish_reasons
    np.testing.assert_array_equal(out.lengths, want.lengths)
    # Sampled rows are generated: a probe is greedy.
    calls.clear()
    execute.answer(pair, policy, prompts, cfg.max_new_tokens, sampling=Sample(0.7), **size)
    assert calls == [len(prompts)]
