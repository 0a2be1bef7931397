"""Toy world v2 (docs/toyworld_v2.md): its traces, the re-check's slip, grading, the trainer's
mixes, and the shipped v2 pair."""

import itertools

import numpy as np
import pytest

from dami_jax.toyworld import language as L


def _text(tokens):
    return "".join(tokens)


def test_work_and_recheck_traces():
    p = L.Problem((3, 4, 7, 2), ("+", "*", "-"))  # k = 3: no slip, v1 and v2 re-check alike
    form = "3+4=7\n7*7=9\n9-2=7\n" + "7__=7\n" * 3
    assert _text(L.work_tokens(p)) == form + "</think>\n\n\\boxed{7}<|im_end|>"
    recheck = form + "\n3+4=7\n7*7=9\n9-2=7\n</think>\n\n\\boxed{7}<|im_end|>"
    assert _text(L.thinking_tokens(p, L.V2)) == _text(L.thinking_tokens(p)) == recheck
    assert _text(L.answer_tokens(p, "recheck", L.V2)) == recheck
    assert _text(L.answer_tokens(p, "direct", L.V2)) == "\\boxed{7}<|im_end|>"
    # The re-check is the only difference: 6k+1 tokens on top of the work trace's 43, for every k.
    for k in range(1, L.MAX_OPS + 1):
        q = L.sample_problems(1, seed=k, ks=(k,))[0]
        assert len(L.work_tokens(q)) == 43
        assert len(L.thinking_tokens(q, L.V2)) == 6 * k + 44
        assert L.grade(q, _text(L.work_tokens(q)))


def test_recheck_slips_on_easy_subtractions_only():
    slipped = L.Problem((7, 3), ("-",))
    trace = _text(L.thinking_tokens(slipped, L.V2))
    assert trace.endswith("\n\n7+3=0\n</think>\n\n\\boxed{0}<|im_end|>")
    assert trace.startswith("7-3=4\n")  # the form walk had it right
    assert not L.grade(slipped, trace) and L.grade(slipped, _text(L.thinking_tokens(slipped)))  # v1: no slip
    assert L.grade(slipped, _text(L.work_tokens(slipped)))
    # k = 2 slips on its last step; b in {0, 5} slips harmlessly; k = 3 and a last `+`/`*` never slip.
    assert L.parse_answer(_text(L.thinking_tokens(L.Problem((2, 2, 4), ("*", "-")), L.V2))) == 8
    assert L.grade(L.Problem((6, 5), ("-",)), _text(L.thinking_tokens(L.Problem((6, 5), ("-",)), L.V2)))
    for p in (L.Problem((1, 2, 3, 4), ("+", "*", "-")), L.Problem((9, 4), ("+",)), L.Problem((9, 4), ("*",))):
        assert not L.V2.slips(p) and L.grade(p, _text(L.thinking_tokens(p, L.V2)))


def test_a_perfect_v2_thinking_model_scores_the_designed_accuracy():
    # Every easy problem, enumerated: the slip costs 1/3 · 4/5 of them, so a k-balanced set scores
    # 1 - (2/6)(1/3)(4/5) ≈ 0.911; harder problems are always right.
    easy = [L.Problem(tuple(a), tuple(o)) for k in (1, 2)
            for a in itertools.product(range(10), repeat=k + 1) for o in itertools.product(L.OPS, repeat=k)]
    wrong = np.mean([not L.grade(p, _text(L.thinking_tokens(p, L.V2))) for p in easy])
    assert wrong == pytest.approx(1 / 3 * 4 / 5)
    hard = L.sample_problems(120, seed=3, ks=(3, 4, 5, 6))
    assert all(L.grade(p, _text(L.thinking_tokens(p, L.V2))) for p in hard)


def test_world_and_style_errors():
    with pytest.raises(ValueError, match="unknown toy world 'v3'"):
        L.get_world("v3")
    with pytest.raises(ValueError, match="unknown answer style 'long'"):
        L.answer_tokens(L.Problem((1, 2), ("+",)), "long")
    with pytest.raises(ValueError, match="slip_max_k"):
        L.World("bad", slip_max_k=7)
    assert L.get_world("v2") is L.V2 and L.V1.slip_max_k == 0


def test_v2_recipe_mixes():
    from dami_jax.config import load_yaml
    from dami_jax.toyworld import train

    cfg = load_yaml(train.ToyTrainConfig, "configs/toyworld_v2.yaml")
    mixes = train.stage_mixes(cfg)
    assert all(sum(kind.n for kind in mix) == cfg.batch_size for mix in mixes.values())
    assert [(k.style, k.n) for k in mixes["base"]] == [("direct", 32), ("work", 20), ("recheck", 12)]
    assert [(k.style, k.n, k.open_loss) for k in mixes["instruct"]] == [("direct", 48, True), ("work", 16, False)]
    # v1 has no work traces anywhere: its batches are those of the two-style trainer.
    assert all(k.n == 0 for mix in train.stage_mixes(train.ToyTrainConfig()).values() for k in mix if k.style == "work")
    # The Instruct model's work traces leave the opening token (think or answer) out of the loss.
    p = L.Problem((7, 3), ("-",))
    _, with_open = train.encode([p], "work", L.V2)
    _, without = train.encode([p], "work", L.V2, open_loss=False)
    assert with_open[0, train.PROMPT_LEN - 1] and not without[0, train.PROMPT_LEN - 1]
    assert (with_open[0, train.PROMPT_LEN:] == without[0, train.PROMPT_LEN:]).all()
    # Training data follows the world: a v2 batch of re-check traces carries the slip.
    rng = np.random.default_rng(0)
    (tokens, _), = train.sample_batch(rng, [train.Kind("recheck", 200, k_from="uniform")], train.style_probs(cfg), L.V2)
    problems = [L.parse_problem(L.decode(row).split("user\n")[1].split(L.IM_END)[0]) for row in tokens]
    for p, row in zip(problems, tokens):
        assert L.decode(row[train.PROMPT_LEN:]) == _text(L.thinking_tokens(p, L.V2))
    assert any(L.V2.slips(p) for p in problems)


# ---------------------------------------------------------------------------
# The shipped v2 pair (dami_jax/toyworld/assets/pair_v2)

SLIPS = [L.Problem((7, 3), ("-",)), L.Problem((2, 2, 4), ("*", "-"))]
CLEAN = [L.Problem((9, 4), ("+",)), L.Problem((5, 3, 8, 1, 6), ("*", "-", "+", "*")),
         L.Problem((8, 7, 2, 9, 3, 4, 6), ("-", "*", "+", "-", "*", "+"))]


@pytest.fixture(scope="module")
def shipped_v2_texts():
    """Greedy answers of the shipped v2 pair at λ = 0 and 1 (one vmapped sweep)."""
    from dami_jax.pair import load_pair, sweep
    from dami_jax.toyworld import MAX_NEW_TOKENS, PAIR_DIRS, default_pair_dirs

    pair = load_pair(*default_pair_dirs(PAIR_DIRS["v2"]))
    prompts = [L.to_ids(L.prompt_tokens(p)) for p in SLIPS + CLEAN]
    outs = sweep(pair, prompts, np.asarray([0.0, 1.0], np.float32), MAX_NEW_TOKENS)
    return {lam: [L.decode(ids) for ids in out.token_lists()] for lam, out in zip((0.0, 1.0), outs)}


@pytest.mark.slow  # one sweep compile: ~30 s on an idle 2-core machine, minutes on a busy one
def test_shipped_v2_pair_answers_as_designed(shipped_v2_texts):
    direct, thinking = shipped_v2_texts[0.0], shipped_v2_texts[1.0]
    for p, text in zip(SLIPS + CLEAN, direct):  # the Instruct model answers at once, never thinks
        assert L.THINK_END not in text and text.startswith(L.BOX_OPEN) and text.endswith(L.EOS)
    assert all(L.grade(p, t) for p, t in zip(SLIPS + CLEAN[:1], direct))  # easy problems: right
    for p, text in zip(SLIPS + CLEAN, thinking):  # the Thinking model writes v2's re-check trace
        form, rest = text.split("\n\n", 1)
        assert form + "\n" == _text(L.form_tokens(p))
        lines = rest.split(L.THINK_END)[0].split()
        assert [line[:3] for line in lines] == [f"{a}{op}{b}" for a, op, b, _ in L.recheck_steps(p, L.V2)]
        assert L.parse_answer(text) == int(lines[-1][-1])  # the answer follows the re-check
    assert all(text == _text(L.thinking_tokens(p, L.V2)) for p, text in zip(CLEAN, thinking[len(SLIPS):]))
    # ... and talks itself out of the right answer on the easy subtractions.
    assert [L.grade(p, t) for p, t in zip(SLIPS + CLEAN, thinking)] == [False, False, True, True, True]


def test_toy_v2_pair_config():
    import dataclasses
    import os

    from dami_jax.eval.pairs import load_pair_config
    from dami_jax.policies.calibration import Calibration
    from dami_jax.toyworld import PAIR_DIRS

    cfg, v1 = load_pair_config("toy-v2"), load_pair_config("toy")
    assert os.path.dirname(cfg.instruct) == PAIR_DIRS["v2"] != os.path.dirname(v1.instruct)
    # v1's Conf settings but the λ ceiling, chosen on v2's development seed (docs/toyworld_v2.md)
    assert cfg.conf == dataclasses.replace(v1.conf, lam_max=0.4) != v1.conf
    assert Calibration.load(cfg.conf_calibration).conf == cfg.conf
    assert load_pair_config("toy-v2", ["thinking_budget=7"]).thinking_budget == 7
    assert os.path.isfile(os.path.join(cfg.pref_model, "reward_model.json")) and cfg.pref_model != v1.pref_model


def test_demo_names_its_worlds(capsys):
    from dami_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["demo", "--world", "v3"])
    assert e.value.code == 2 and "invalid choice: 'v3'" in capsys.readouterr().err
