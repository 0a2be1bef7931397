"""Toy world: language, tokenizer (through transformers), grading, a tiny training run."""

import dataclasses
import json
import os

import numpy as np
import pytest

from dami_jax.toyworld import language as L
from dami_jax.toyworld import tokenizer as T


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("toy_tok")
    T.save_tokenizer(out)
    return transformers.AutoTokenizer.from_pretrained(str(out))


def _ids(encoded):
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True).
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_tokenizer_round_trip_and_special_tokens(hf_tokenizer):
    tok = hf_tokenizer
    assert len(tok) == len(L.VOCAB)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == L.EOS_ID
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == L.PAD_ID
    for p in L.sample_problems(12, seed=3):
        for tokens in (L.thinking_tokens(p), L.direct_tokens(p)):
            text = "".join(tokens)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids == L.to_ids(tokens)
            assert tok.decode(ids) == text == L.decode(ids)
    # </think> survives skip_special_tokens (as in Qwen3), EOS does not.
    p = L.sample_problems(1, seed=0)[0]
    ids = L.to_ids(L.thinking_tokens(p))
    assert tok.decode(ids, skip_special_tokens=True) == "".join(L.thinking_tokens(p)[:-1])


def test_chat_template_matches_prompt_tokens(hf_tokenizer):
    tok = hf_tokenizer
    for p in L.sample_problems(6, seed=1):
        msgs = [{"role": "user", "content": p.text}]
        ids = _ids(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
        assert ids == L.to_ids(L.prompt_tokens(p))
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert text.endswith("<|im_start|>assistant\n<think>\n")
    # An earlier thinking turn keeps only its answer.
    turn = "".join(L.thinking_tokens(p)[:-1])
    text = tok.apply_chat_template(msgs + [{"role": "assistant", "content": turn}], tokenize=False)
    assert "</think>" not in text and text.endswith(f"\\boxed{{{p.answer}}}<|im_end|>\n")


def test_generator_is_deterministic_and_balanced():
    a, b = L.sample_problems(60, seed=7), L.sample_problems(60, seed=7)
    assert a == b and a != L.sample_problems(60, seed=8)
    assert [p.k for p in a[:6]] == [1, 2, 3, 4, 5, 6]
    assert {len(p.text) for p in a} == {2 * L.MAX_OPS + 1}  # fixed-width slots
    assert all(L.parse_problem(p.text) == p for p in a)


def test_answers_and_traces_by_difficulty():
    p = L.Problem((3, 4, 7, 2), ("+", "*", "-"))
    assert p.k == 3 and p.answer == 7 and p.text == "3+4*7-2______"
    trace = "".join(L.thinking_tokens(p))
    form = "3+4=7\n7*7=9\n9-2=7\n" + "7__=7\n" * 3
    assert trace == form + "\n3+4=7\n7*7=9\n9-2=7\n</think>\n\n\\boxed{7}<|im_end|>"
    assert "".join(L.direct_tokens(p)) == "\\boxed{7}<|im_end|>"
    # Thinking cost grows with k, and is far above a direct answer even at k=1.
    cost = [np.mean([len(L.thinking_tokens(q)) for q in L.sample_problems(30, 0, ks=(k,))]) for k in range(1, 7)]
    assert all(x < y for x, y in zip(cost, cost[1:]))
    assert cost[0] >= 10 * len(L.direct_tokens(p))


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{7}", 7),
    ("\\boxed{ 7 }<|im_end|>", 7),
    ("1+6=7\n\\boxed{3}\n</think>\n\n\\boxed{7}<|im_end|>", 7),  # only after the last </think>
    ("3+4=7\n</think>\n\nseven", None),
    ("\\boxed{7}</think>", None),  # boxed only inside the thinking part
    ("", None),
    ("\\boxed{2}\\boxed{7}", 7),  # the last box counts
])
def test_parse_answer(text, expected):
    assert L.parse_answer(text) == expected


def test_grade():
    p = L.Problem((3, 4), ("*",))
    assert L.grade(p, "\\boxed{2}<|im_end|>")
    assert L.grade(p, "3*4=2\n</think>\n\n\\boxed{2}")
    assert not L.grade(p, "\\boxed{12}")
    assert not L.grade(p, "3*4=2\n")
    with pytest.raises(ValueError, match="ops"):
        L.Problem((1, 2), ())
    with pytest.raises(ValueError, match="toy-world problem"):
        L.parse_problem("what is 3+4?")


def test_tiny_training_run_decreases_loss(tmp_path):
    """A few steps on a tiny config: the loss falls, and reruns repeat it exactly."""
    from dami_jax.toyworld import train

    cfg = dataclasses.replace(
        train.ToyTrainConfig(), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
        num_kv_heads=1, head_dim=16, batch_size=8, base_steps=12, base_lr=1e-2, warmup_steps=1)
    mcfg = train.model_config(cfg)
    params = train.init_params(mcfg, cfg.seed)
    _, losses = train.train_stage(cfg, mcfg, params, steps=cfg.base_steps, lr=cfg.base_lr,
                                  mix=train.stage_mixes(cfg)["base"], seed=0, desc="test", progress=False)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    _, again = train.train_stage(cfg, mcfg, params, steps=cfg.base_steps, lr=cfg.base_lr,
                                 mix=train.stage_mixes(cfg)["base"], seed=0, desc="test", progress=False)
    np.testing.assert_allclose(again, losses, rtol=1e-6)  # deterministic given the seed


def test_recipe_yaml_matches_defaults():
    from dami_jax.config import load_yaml
    from dami_jax.toyworld import train

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "toyworld.yaml")
    assert load_yaml(train.ToyTrainConfig, path) == train.ToyTrainConfig()


@pytest.mark.slow
def test_saved_pair_loads_in_transformers(tmp_path):
    """Tiny untrained pair through train_pair's writer: HF loads it, logits match ours."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from dami_jax.toyworld import train

    cfg = dataclasses.replace(
        train.ToyTrainConfig(), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
        num_kv_heads=1, head_dim=16, batch_size=4, base_steps=1, instruct_steps=1, thinking_steps=1,
        warmup_steps=1, eval_per_k=1, eval_lams=(0.0, 1.0))
    prov = train.train_pair(tmp_path, cfg, progress=False, command="test")
    assert set(prov["final_losses"]) == {"base", "instruct", "thinking"}
    assert json.loads((tmp_path / "provenance.json").read_text())["seed"] == cfg.seed
    ids = L.to_ids(L.prompt_tokens(L.sample_problems(1, seed=0)[0]))
    for name in ("instruct", "thinking"):
        tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / name))
        assert tok.eos_token_id == L.EOS_ID
        model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / name))
        with torch.no_grad():
            hf = model(torch.tensor([ids])).logits.numpy()
        from dami_jax.checkpoint.hf import load_hf
        from dami_jax.models.qwen3 import forward

        ours = np.asarray(forward(train.model_config(cfg), load_hf(str(tmp_path / name)), [ids]))
        np.testing.assert_allclose(ours, hf, atol=1e-4)
