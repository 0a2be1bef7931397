"""DEER (dynamic early exit) and the engine's row forks.

A tiny random Instruct/Thinking pair with a hand-made word-level tokenizer that holds the
DEER strings (`Wait`, `**Final Answer**`, `\\boxed`, `</think>`): the policy's defaults
encode as they would for Qwen. The trigger the tests use is the word the random Thinking
model generates most (a random model says `Wait` rarely), so every row forks probes.

- allocator: forks share full pages (owners counted), never a page someone writes, and
  every page comes back;
- fork == simple path: each probe's tokens and max probabilities equal those of the same
  trial run as its own, fully prefilled request, and above threshold 1 the rows are the
  Thinking model's tokens exactly (with bursts, page-tail recompute and preemption);
- the exit decision equals a NumPy float64 reference of the confidence rule on the model's
  logits, at thresholds just below and above it (both outcomes, each aggregate);
- an exit's output is the row's tokens before the trigger, the close, then what the model
  generates from there: no probe token leaks into it;
- bad input: a threshold outside (0, 1], a trigger the tokenizer cannot encode.
"""

from __future__ import annotations

import collections
import dataclasses
import json

import jax
import numpy as np
import pytest

import dami_jax as dj
from dami_jax.config import ConfigError
from dami_jax.engine.early_exit import EarlyExit, confidence
from dami_jax.engine.pages import OutOfPages, PageAllocator
from dami_jax.engine.scheduler import Request, Scheduler
from dami_jax.errors import InputError
from dami_jax.models import qwen3
from dami_jax.policies.deer_config import DeerConfig

WORDS = ["Wait", "**Final Answer**", "\\boxed", "<think>", "</think>", "<|im_end|>", "<unk>"]
CHARS = list("0123456789+-=abcdefgh{} \n")
VOCAB = CHARS + WORDS
EOS = VOCAB.index("<|im_end|>")
MAX_NEW = 24
PROBE = 4


def _save_tokenizer(path) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_tokens([AddedToken(w, normalized=False, special=False) for w in WORDS[:5]])
    tok.add_special_tokens([AddedToken(w, normalized=False, special=True) for w in WORDS[5:]])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "unk_token": "<unk>",
        "pad_token": "<|im_end|>", "clean_up_tokenization_spaces": False}))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg = dj.ModelConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    root = tmp_path_factory.mktemp("deer-pair")
    shapes = qwen3.abstract_params(cfg)
    for name, seed in (("instruct", 0), ("thinking", 1)):
        rng = np.random.default_rng(seed)
        params = jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(np.float32) if len(s.shape) > 1
                              else np.ones(s.shape, np.float32), shapes)
        dj.save_hf(cfg, params, root / name, generation_ids=dj.GenerationIds(eos=(EOS,)))
        _save_tokenizer(root / name)
    return dj.load_pair(root / "instruct", root / "thinking")


@pytest.fixture(scope="module")
def prompts():
    """Long enough that most probes fork past a full page of 16 tokens and share it."""
    rng = np.random.default_rng(3)
    return [rng.integers(0, 20, n).tolist() for n in (13, 17, 9, 20)]  # 59 tokens: one prefill of 64


@pytest.fixture(scope="module")
def thinking(pair, prompts):
    """The Thinking model's greedy tokens (λ = 1, the pair's stop ids)."""
    return _engine(pair, prompts).generate(prompts, MAX_NEW, lam=1.0).token_lists()


@pytest.fixture(scope="module")
def rule(pair, thinking):
    """The default DEER settings in this tokenizer, with the Thinking model's most common word as the
    trigger and as the end of a trial answer (so trials end, and are judged, often)."""
    from dami_jax.policies.deer import deer_rule

    word = VOCAB[collections.Counter(t for row in thinking for t in row if t != EOS).most_common(1)[0][0]]
    settings = DeerConfig(trigger=word, answer_end=word, probe_tokens=PROBE, think_ratio=1.0)
    return deer_rule(pair.tokenizer, settings)


def _engine(pair, prompts):
    """Every engine here is generate_deer's for all the prompts (so all share compiled programs)."""
    from dami_jax.engine.offline import sized_engine

    inducer = len(pair.tokenizer.encode(DeerConfig().inducer, add_special_tokens=False))
    return sized_engine(pair, None, prompts, MAX_NEW, probe_tokens=inducer + PROBE, max_rows=4)


def _run(pair, prompts, rows, rule):
    """The requests of prompts[rows] under `rule` (an engine sized for all the prompts)."""
    return _engine(pair, prompts).run_batch([prompts[i] for i in rows], MAX_NEW, lam=1.0, early_exit=rule)


# -- allocator ----------------------------------------------------------------------


def _owners_consistent(alloc: PageAllocator) -> None:
    held = collections.Counter(p for s in alloc.sequences() for p in alloc.pages(s))
    free = alloc.free_pages().tolist()
    assert not set(held) & set(free), "a page is both held and free"
    assert sorted(set(held) | set(free)) == list(range(1, alloc.num_pages)), "a page leaked"
    assert all(alloc.owners(p) == n for p, n in held.items()) and all(alloc.owners(p) == 0 for p in free)


def test_fork_shares_full_pages_and_frees_each_page_once():
    alloc = PageAllocator(num_pages=12, page_size=4, max_pages_per_seq=11)
    alloc.admit("row")
    alloc.extend("row", 10)  # pages a, b full; c holds 2 tokens
    a, b, c = alloc.pages("row")
    assert alloc.fork("row", "probe", 10, reserve_tokens=16) == 8  # shares a, b; starts a fresh page
    probe = alloc.pages("probe")
    assert probe[:2] == (a, b) and c not in probe and len(probe) == 4
    assert [alloc.owners(p) for p in (a, b, c)] == [2, 2, 1]
    _owners_consistent(alloc)
    alloc.extend("probe", 5)  # the tail and beyond: into its own pages
    alloc.extend("row", 2)  # the row goes on in page c, which only it holds
    alloc.truncate("row", 8)
    with pytest.raises(RuntimeError, match="which a fork shares"):
        alloc.truncate("row", 7)
        alloc.extend("row", 1)  # rewriting token 7 would write page b, which the probe reads
    assert alloc.length("row") == 7  # the refused extend changed nothing
    free = alloc.num_free
    alloc.free("row")  # a, b stay with the probe; c comes back
    assert alloc.num_free == free + 1 and alloc.owners(a) == 1
    _owners_consistent(alloc)
    alloc.free("probe")
    assert alloc.num_free == alloc.num_usable
    alloc.admit("next", reserve_tokens=4 * 11)  # every page, those the fork held included, is reused
    assert sorted(alloc.pages("next")) == list(range(1, 12))


def test_forks_under_random_traffic_never_leak_a_page():
    rng = np.random.default_rng(0)
    alloc = PageAllocator(num_pages=40, page_size=4, max_pages_per_seq=12)
    live, n = [], 0
    for _ in range(3000):
        op = rng.choice(["admit", "grow", "fork", "free", "preempt"])
        if op == "admit" or not live:
            if alloc.can_fit(8):
                alloc.admit(n, reserve_tokens=int(rng.integers(0, 8)))
                live.append(n)
                n += 1
            continue
        seq = live[rng.integers(len(live))]
        if op == "grow":
            k = int(rng.integers(1, 6))
            if alloc.can_fit(k, seq):
                alloc.extend(seq, k)
        elif op == "fork":
            at = int(rng.integers(0, alloc.length(seq) + 1))
            try:
                assert alloc.fork(seq, n, at, reserve_tokens=at + 4) == at - at % 4
                live.append(n)
            except OutOfPages:
                assert n not in alloc
            n += 1
        else:  # free and preempt both drop the sequence's hold on its pages
            alloc.free(seq) if op == "free" else alloc.preempt(seq)
            live.remove(seq)
        _owners_consistent(alloc)
    for seq in live:
        alloc.free(seq)
    assert alloc.num_free == alloc.num_usable


# -- the scheduler: forks under preemption ---------------------------------------------

TRIGGER, END, ANSWER_END = 9, 5, 8  # made-up ids


def _made_up(tokens: list[int]) -> tuple[int, float]:
    """A deterministic made-up model: the next token and its max probability from the sequence alone
    (as a real one's are, whatever else runs), the trigger and the answer end now and then."""
    h = hash(tuple(tokens)) % 1000
    return (TRIGGER if h % 6 == 0 else ANSWER_END if h % 3 == 1 else 10 + h % 50), 0.5 + (h % 97) / 200


def _drive(sched, reqs) -> None:
    for req in reqs:
        sched.add(req)
    for _ in range(20_000):
        if sched.idle:
            return
        plan = sched.plan()
        assert plan and len(plan) <= sched.max_rows
        assert not any(req.paused for req, _ in plan)
        made = [_made_up(req.tokens[: req.computed + q]) for req, q in plan]
        sched.commit(plan, [t for t, _ in made], [p for _, p in made])
    raise AssertionError("the scheduler did not finish")


def _deer_requests(n: int):
    from dami_jax.engine.scheduler import ThinkingBudget

    rule = EarlyExit(triggers=((TRIGGER,),), inducer=(3, 4), close=(6, END, 6), end_id=END, answer_end=ANSWER_END,
                     threshold=0.85, probe_tokens=3)
    rng = np.random.default_rng(2)
    return [Request(rid=i, prompt=rng.integers(10, 60, int(rng.integers(2, 14))).tolist(), max_new_tokens=30,
                    lam=1.0, temperature=0.0, top_k=0, top_p_cut=0.0, stop_ids=frozenset({7}), seed=0, row_id=i,
                    early_exit=rule, budget=ThinkingBudget(27, END, rule.close)) for i in range(n)]


def test_forks_under_preemption_give_the_same_rows_and_probes_and_leak_no_page():
    """The same made-up requests through a roomy reserved pool and a small preempting one: every
    row ends with the same tokens and the same probes; every page comes back."""
    runs = []
    for pages, reserve in ((400, True), (14, False)):
        alloc = PageAllocator(num_pages=pages, page_size=4, max_pages_per_seq=12)
        sched = Scheduler(alloc, max_rows=4, max_tokens=8, context=48, reserve=reserve)
        reqs = _deer_requests(16)
        _drive(sched, reqs)
        assert alloc.num_free == alloc.num_usable and not alloc.sequences()
        runs.append((sched, reqs))
    (_, roomy), (small, tight) = runs
    assert small.preemptions > 0
    assert [r.generated for r in tight] == [r.generated for r in roomy]
    assert [r.probes for r in tight] == [r.probes for r in roomy]
    probes = [p for r in roomy for p in r.probes]
    assert {p.exited for p in probes} == {True, False}, "the threshold should give both outcomes"
    for r in roomy:  # no probe token in any output; an exit ends the thinking with the close tokens
        for p in r.probes:
            assert r.generated[p.at: p.at + (3 if p.exited else 1)] == ([6, END, 6] if p.exited else [TRIGGER])


# -- the fork equals the simple path -------------------------------------------------


def _trial_alone(pair, prompts, rule, row_prompt, row_tokens, probe):
    """The probe as a separate request: prefilled in full from the row's tokens before its trigger."""
    engine = _engine(pair, prompts)
    rid = engine.submit(row_prompt + row_tokens[: probe.at] + list(rule.inducer), rule.probe_tokens, lam=1.0,
                        stop_tokens=[*pair.stop_tokens, *rule.probe_stops], record_probs=True)
    engine.run()
    return engine.poll(rid)


@pytest.mark.slow  # pays the module's compiles: 14 s + 10 s of setup (whole file 31 s; 3 min on loaded cores)
def test_above_threshold_one_rows_are_the_thinking_models_and_forks_equal_separate_trials(
        pair, prompts, rule, thinking):
    engine = _engine(pair, prompts)
    reqs = engine.run_batch(prompts, MAX_NEW, lam=1.0, early_exit=dataclasses.replace(rule, threshold=1.5))
    assert [r.generated for r in reqs] == thinking
    assert sum(len(r.probes) for r in reqs) >= 8, "too few probes for the test to say much"
    assert sum(len(prompt) + p.at >= 16 for prompt, r in zip(prompts, reqs) for p in r.probes) >= 4, "no shared page"
    assert engine.sched.alloc.num_free == engine.sched.alloc.num_usable  # every fork gave its pages back
    for prompt, req in list(zip(prompts, reqs))[:2]:
        for probe in req.probes:
            assert not probe.exited
            assert any(req.generated[probe.at: probe.at + len(t)] == list(t) for t in rule.triggers)
            alone = _trial_alone(pair, prompts, rule, prompt, req.generated, probe)
            assert list(probe.tokens) == alone.generated
            np.testing.assert_allclose(probe.max_probs, alone.max_probs, rtol=1e-5)


# -- the exit decision ---------------------------------------------------------------


def _reference_confidence(pair, rule, tokens: list[int], n_probe: int, kind: str) -> float:
    """NumPy float64: 0 unless the trial (the last n_probe tokens) ends with the answer end, else
    the max probability of each of its tokens, from the Thinking model's logits on all the tokens
    before it, aggregated by `kind`."""
    if tokens[-1] != rule.answer_end:
        return 0.0
    logits = np.asarray(dj.forward(pair.cfg, pair.thinking, np.asarray([tokens], np.int32)), np.float64)[0]
    z = logits[len(tokens) - n_probe - 1: len(tokens) - 1]
    p = np.exp(z - z.max(-1, keepdims=True))
    top = (p / p.sum(-1, keepdims=True)).max(-1)
    return {"avg1": top.mean(), "avg2": np.exp(np.log(top).mean()), "min": top.min()}[kind]


@pytest.mark.parametrize("kind", ["avg1", "avg2", "min"])
def test_exit_decision_equals_a_numpy_reference_of_the_confidence_rule(pair, prompts, rule, thinking, kind):
    """Row 0's probes scored by NumPy on the model's logits; then the threshold just above the first
    judged one's confidence (it must go on) and just below (it must exit there)."""
    base = dataclasses.replace(rule, confidence=kind)
    [row] = _run(pair, prompts, [0], dataclasses.replace(base, threshold=1.5))
    refs = [_reference_confidence(pair, rule, prompts[0] + thinking[0][: p.at] + list(rule.inducer) + list(p.tokens),
                                  len(p.tokens), kind) for p in row.probes]
    np.testing.assert_allclose([p.confidence for p in row.probes], refs, rtol=1e-4)
    judged = [i for i, r in enumerate(refs) if r > 0]
    assert judged and len(judged) < len(refs), "want trials that end with the answer end and trials that do not"
    first, ref = row.probes[judged[0]], refs[judged[0]]
    assert first.confidence == pytest.approx(confidence(first.max_probs, kind))
    for threshold, exits in ((ref * 1.01, False), (ref * 0.99, True)):
        [row] = _run(pair, prompts, [0], dataclasses.replace(base, threshold=threshold))
        probe = row.probes[judged[0]]
        assert (probe.at, probe.exited) == (first.at, exits) and exits == (ref >= threshold)
        assert not any(p.exited for p in row.probes[: judged[0]])
        assert len(row.probes) == judged[0] + 1 if exits else len(row.probes) > judged[0] + 1


def test_an_exit_answers_from_the_tokens_before_the_trigger_and_no_probe_token_leaks(pair, prompts, rule, thinking):
    """Threshold barely above 0: every row exits at its first judged probe. Its output is the
    Thinking model's tokens before the trigger, the close tokens, then exactly what the model
    generates from that prefix as a fresh request: nothing of the probes (inducer, trial tokens,
    their K/V)."""
    from dami_jax.policies.deer import generate_deer

    out, probes = generate_deer(pair, prompts, MAX_NEW, dataclasses.replace(rule, threshold=1e-9), max_rows=4)
    exited = 0
    for prompt, row, ref, row_probes in zip(prompts, out.token_lists(), thinking, probes):
        if not any(p.exited for p in row_probes):  # no trial judged: the Thinking model's tokens
            assert row == ref
            continue
        exited += 1
        *before, probe = row_probes
        assert probe.exited and not any(p.exited for p in before) and row[: probe.at] == ref[: probe.at]
        head = row[: probe.at + len(rule.close)]
        assert head[probe.at:] == list(rule.close)
        fresh = _engine(pair, prompts).generate([prompt + head], MAX_NEW - len(head), lam=1.0).token_lists()[0]
        assert row[len(head):] == fresh
    assert exited >= 2


def test_thinking_is_cut_at_think_ratio(pair, prompts, rule):
    """No exit, thinking never closed by this random model: the close is forced at think_ratio."""
    cut = dataclasses.replace(rule, threshold=1.5, think_ratio=0.5)
    end = MAX_NEW // 2
    for row in [r.generated for r in _run(pair, prompts, range(len(prompts)), cut)]:
        if rule.end_id not in row[:end]:
            assert row[end: end + len(rule.close)] == list(rule.close)[: MAX_NEW - end]


# -- the policy and bad input -----------------------------------------------------------


def test_deer_policy_specs_and_bad_input(pair, prompts, rule):
    from dami_jax.policies import build_policy
    from dami_jax.policies.execute import answer

    policy = build_policy("deer:0.9", pair)
    assert policy.spec == "deer:0.9" and policy.settings.threshold == 0.9 and policy.settings.lam == 1.0
    assert build_policy("deer", pair).settings.threshold == 0.95
    assert policy.early_exit.triggers == ((VOCAB.index("Wait"),), (VOCAB.index(" "), VOCAB.index("Wait")))
    assert policy.early_exit.inducer == tuple(VOCAB.index(w) for w in ("\n", "**Final Answer**", "\n", "\\boxed"))
    for bad in ("deer:0", "deer:-0.5", "deer:1.01", "deer:nan", "deer:high"):
        with pytest.raises(ConfigError, match=r"threshold must be a number in \(0, 1\]"):
            build_policy(bad, pair)
    with pytest.raises(InputError, match=r"cannot encode the trigger 'Hmm'"):
        build_policy({"name": "deer", "trigger": "Hmm"}, pair)
    with pytest.raises(InputError, match=r"early-exit threshold must be > 0"):
        EarlyExit(triggers=((1,),), inducer=(2,), close=(3,), end_id=3, answer_end=3, threshold=0.0)
    trigger = pair.tokenizer.decode(list(rule.triggers[0]))
    policy = build_policy({"name": "deer", "trigger": trigger, "probe_tokens": PROBE, "threshold": 1.0}, pair)
    out, chosen = answer(pair, policy, prompts, MAX_NEW)  # confidences of this random model stay below 1
    assert chosen.lam.tolist() == [1.0] * len(prompts)
    [reqs] = [_engine(pair, prompts).run_batch(prompts, MAX_NEW, lam=1.0, early_exit=policy.early_exit)]
    assert out.token_lists() == [r.generated for r in reqs]
    assert chosen.info["probe_tokens"].tolist() == [r.probe_tokens for r in reqs] and min(r.probe_tokens for r in reqs) > 0


def test_toy_pair_config_runs_deer_on_the_line_break():
    from dami_jax.eval.pairs import expand_policy, toy_pair_config

    spec = expand_policy("deer:0.8", toy_pair_config())
    assert (spec["trigger"], spec["inducer"], spec["answer_end"], spec["threshold"]) == ("\n", "\\boxed{", "}", 0.8)
    with pytest.raises(ConfigError, match="threshold must be a number"):
        expand_policy("deer:x", toy_pair_config())
