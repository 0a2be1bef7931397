"""Generation: greedy parity with HF generate, stop rules, full cache, sampling, chat helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dami_jax as dj
from dami_jax.generate.chat import load_tokenizer
from dami_jax.generate.decode import generate_lockstep
from helpers import random_prompts

NEW = 32
LENGTHS = [5, 12, 1, 20]  # 4 prompts of different lengths: left padding in one batch


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(128, LENGTHS, seed=11)  # ids < 128: valid for every tiny vocab


def _hf_greedy(ckpt, prompt, n):
    import torch

    with torch.no_grad():
        out = ckpt.hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    assert len(new) == n
    return new


# Module-level cache: each greedy batch is generated once and reused by the tests below.
_GREEDY: dict = {}


def _ours_greedy(ckpt, prompts):
    if ckpt.name not in _GREEDY:
        _GREEDY[ckpt.name] = dj.generate(ckpt.cfg, ckpt.params(), prompts, NEW)
    return _GREEDY[ckpt.name]


@pytest.mark.parametrize("name", ["dense_gqa", "moe_norm"])
def test_greedy_matches_hf_generate(tiny_hf, prompts, name):
    ckpt = tiny_hf(name)
    assert dj.GenerationIds.from_hf(ckpt.path).eos == ()  # no EOS: every row runs the full NEW tokens
    out = _ours_greedy(ckpt, prompts)
    assert isinstance(out, dj.GenerateOutput)
    assert out.tokens.shape == (len(prompts), NEW)
    assert out.lengths.tolist() == [NEW] * len(prompts)
    assert out.finish_reasons == ["length"] * len(prompts)
    assert out.cache_full is False
    for i, prompt in enumerate(prompts):
        ref = _hf_greedy(ckpt, prompt, NEW)
        assert out.tokens[i].tolist() == ref, f"{name} row {i} (prompt length {len(prompt)})"
    assert out.token_lists() == [row.tolist() for row in out.tokens]


def test_stop_tokens_per_row(tiny_hf, prompts):
    ckpt = tiny_hf("dense_gqa")
    full = _ours_greedy(ckpt, prompts).tokens
    # Per row, a stop token taken from its own greedy output (first occurrence decides),
    # except row 3 whose stop token never appears: it must run to the token limit.
    picks = [3, 0, 17, None]
    stops, expect_len = [], []
    for i, p in enumerate(picks):
        row = full[i].tolist()
        if p is None:
            tok = next(t for t in range(ckpt.cfg.vocab_size) if t not in row)
            expect_len.append(NEW)
        else:
            tok = row[p]
            expect_len.append(row.index(tok) + 1)
        stops.append([tok])
    out = dj.generate(ckpt.cfg, ckpt.params(), prompts, NEW, stop_tokens=stops)
    assert out.lengths.tolist() == expect_len
    assert out.finish_reasons == ["stop", "stop", "stop", "length"]
    assert out.cache_full is False
    for i, n in enumerate(expect_len):
        assert out.tokens[i, :n].tolist() == full[i, :n].tolist()  # stopping one row leaves the others alone
        assert out.tokens[i, n - 1] == stops[i][0] or n == NEW
    assert expect_len[1] == 1  # a stop token emitted straight out of prefill

    # One list for every row.
    tok = int(full[0, 5])
    out = dj.generate(ckpt.cfg, ckpt.params(), prompts, NEW, stop_tokens=[tok])
    for i in range(len(prompts)):
        row = full[i].tolist()
        if tok in row:
            assert out.lengths[i] == row.index(tok) + 1 and out.finish_reasons[i] == "stop"
        else:
            assert out.lengths[i] == NEW and out.finish_reasons[i] == "length"

    with pytest.raises(ValueError, match="stop_tokens has 2 rows for a batch of 4"):
        dj.generate(ckpt.cfg, ckpt.params(), prompts, NEW, stop_tokens=[[1], [2]])


def test_full_cache_is_reported(tiny_hf, prompts):
    ckpt = tiny_hf("dense_gqa")
    full = _ours_greedy(ckpt, prompts).tokens
    # max_cache is per sequence: each row holds at most 36 tokens, prompt included, so
    # the 20-token prompt gets 16 new tokens and the 1-token one all NEW.
    out = dj.generate(ckpt.cfg, ckpt.params(), prompts, NEW, max_cache=36)
    assert out.cache_full is True
    assert out.finish_reasons == ["length"] * 4
    assert out.lengths.tolist() == [min(NEW, 36 - n) for n in LENGTHS] == [31, 24, 32, 16]
    for row, n in zip(range(4), out.lengths):  # never truncated silently, never wrong
        np.testing.assert_array_equal(out.tokens[row, :n], full[row, :n])
    # Asking for no more than fits is not a full cache.
    out = dj.generate(ckpt.cfg, ckpt.params(), prompts, 5, max_cache=36)
    assert out.cache_full is False and out.lengths.tolist() == [5] * 4
    np.testing.assert_array_equal(out.tokens, full[:, :5])


def test_lockstep_full_cache_is_reported(tiny_hf, prompts):
    """The lock-step reference (generate_pair's merged mode) counts one dense cache for all rows."""
    ckpt = tiny_hf("dense_gqa")
    full = _ours_greedy(ckpt, prompts).tokens
    # The 32-slot bucket would leave too little room, so the 20-token prompt is padded
    # to 20 only: 36 slots hold the prompt and 16 decoded tokens, and the 17th token is
    # predicted from slot 35; then the cache is full.
    out = generate_lockstep(ckpt.cfg, ckpt.params(), prompts, NEW, max_cache=36)
    assert out.cache_full is True and out.finish_reasons == ["length"] * 4
    assert out.lengths.tolist() == [17] * 4
    np.testing.assert_array_equal(out.tokens[:, :17], full[:, :17])


def test_sampling_seeded(tiny_hf, prompts):
    ckpt = tiny_hf("dense_gqa")
    sampling = dj.Sample(temperature=0.9, top_k=40, top_p=0.95)
    a = dj.generate(ckpt.cfg, ckpt.params(), prompts, NEW, sampling=sampling, seed=123)
    b = dj.generate(ckpt.cfg, ckpt.params(), prompts, NEW, sampling=sampling, seed=123)
    c = dj.generate(ckpt.cfg, ckpt.params(), prompts, NEW, sampling=sampling, seed=124)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    greedy = _ours_greedy(ckpt, prompts).tokens
    assert not np.array_equal(a.tokens, greedy)
    assert a.tokens.min() >= 0 and a.tokens.max() < ckpt.cfg.vocab_size


# ---------------------------------------------------------------------------
# Sampling filters against a NumPy reference of HF's logits warpers.

def ref_filtered(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """HF order: TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper (min_tokens_to_keep=1)."""
    x = logits.astype(np.float32) / np.float32(temperature)
    if top_k:
        k = min(top_k, x.shape[-1])
        kth = -np.sort(-x, axis=-1)[:, k - 1:k]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        out = x.copy()
        for b in range(x.shape[0]):
            order = np.argsort(x[b], kind="stable")  # ascending
            s = x[b, order]
            p = np.exp(s - s.max())
            p = p / p.sum()
            remove = np.cumsum(p) <= 1.0 - top_p
            remove[-1] = False  # the most likely token always stays
            out[b, order[remove]] = -np.inf
        x = out
    return x


SETTINGS = [
    (1.0, 0, 1.0),  # no filter
    (0.7, 20, 0.8),  # Qwen3 2507 Instruct
    (0.6, 20, 0.95),  # Qwen3 2507 Thinking
    (1.3, 5, 1.0),  # top-k only
    (1.0, 0, 0.5),  # top-p only
    (0.5, 1000, 0.9),  # k beyond the vocabulary
    (2.0, 1, 0.3),  # k = 1: argmax only
    (1.0, 0, 1e-6),  # tiny p: the top token alone survives
]


def _random_logits(seed, b=8, v=64):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, v)) * rng.uniform(0.5, 4.0, size=(b, 1))).astype(np.float32)


def test_reference_matches_transformers_warpers():
    """The NumPy reference itself agrees with transformers' warpers (so it is HF's rule)."""
    import torch
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                         TopPLogitsWarper)

    logits = _random_logits(0)
    for t, k, p in SETTINGS:
        x = torch.from_numpy(logits.copy())
        x = TemperatureLogitsWarper(t)(None, x)
        if k:
            x = TopKLogitsWarper(k)(None, x)
        if p < 1.0:
            x = TopPLogitsWarper(p)(None, x)
        np.testing.assert_array_equal(np.isneginf(x.numpy()), np.isneginf(ref_filtered(logits, t, k, p)))


@pytest.mark.parametrize("t, k, p", SETTINGS)
def test_filtered_logits_match_reference(t, k, p):
    for seed in range(3):
        logits = _random_logits(seed)
        ref = ref_filtered(logits, t, k, p)
        ours = np.asarray(dj.Sample(temperature=t, top_k=k, top_p=p).filtered_logits(jnp.asarray(logits)))
        np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref), err_msg=f"seed {seed}")
        keep = ~np.isneginf(ref)
        np.testing.assert_allclose(ours[keep], ref[keep], rtol=1e-6)
        assert keep.sum(axis=-1).min() >= 1
        if k:
            assert keep.sum(axis=-1).max() <= k
    if (t, k, p) == (1.0, 0, 1e-6) or k == 1:
        np.testing.assert_array_equal(keep.sum(axis=-1), 1)


def test_top_k_keeps_ties():
    """HF keeps every token tied with the k-th largest (`scores < kth` removes)."""
    logits = np.array([[3.0, 1.0, 2.0, 2.0, 0.0, 2.0]], np.float32)
    ours = np.asarray(dj.Sample(top_k=2).filtered_logits(jnp.asarray(logits)))
    np.testing.assert_array_equal(~np.isneginf(ours), ~np.isneginf(ref_filtered(logits, 1.0, 2, 1.0)))
    assert (~np.isneginf(ours)).sum() == 4


def test_samples_follow_filtered_distribution():
    sampling = dj.Sample(temperature=0.7, top_k=8, top_p=0.9)
    logits = jnp.asarray(_random_logits(5, b=2, v=32))
    probs = np.asarray(jax.nn.softmax(sampling.filtered_logits(logits), axis=-1))
    n = 20000
    keys = jax.random.split(jax.random.key(0), (n, 2))  # one key per row per draw
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sampling.next_tokens(logits, k)))(keys))  # (n, B)
    for b in range(2):
        assert np.all(probs[b, draws[:, b]] > 0), "sampled a filtered-out token"
        freq = np.bincount(draws[:, b], minlength=32) / n
        assert np.max(np.abs(freq - probs[b])) < 0.02  # ~6 standard errors at n = 20000


def test_sample_argument_checks():
    with pytest.raises(ValueError, match="temperature"):
        dj.Sample(temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        dj.Sample(top_k=-1)
    with pytest.raises(ValueError, match="top_p"):
        dj.Sample(top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        dj.Sample(top_p=1.5)


# ---------------------------------------------------------------------------
# Chat helpers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
WORDS = ["[UNK]", "system", "user", "assistant", "you", "are", "helpful", "what", "is", "2", "+", "?", "4"]
TEMPLATE = (
    "{%- for m in messages -%}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking %}<think>\n{% endif -%}"
    "{%- endif -%}"
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return str(path)


def _ids(*words):
    vocab = SPECIALS + WORDS
    return [vocab.index(w) for w in words]


def test_chat_prompt(tokenizer_dir):
    from transformers import AutoTokenizer

    for tok in (AutoTokenizer.from_pretrained(tokenizer_dir), load_tokenizer(tokenizer_dir)):
        ids = dj.chat_prompt(tok, "what is 2 + 2 ?")
        assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
        assert ids == _ids("<|im_start|>", "user", "what", "is", "2", "+", "2", "?", "<|im_end|>",
                           "<|im_start|>", "assistant")
        messages = [{"role": "system", "content": "you are helpful"}, {"role": "user", "content": "what is 4 ?"}]
        ids = dj.chat_prompt(tok, messages)
        assert ids == _ids("<|im_start|>", "system", "you", "are", "helpful", "<|im_end|>",
                           "<|im_start|>", "user", "what", "is", "4", "?", "<|im_end|>",
                           "<|im_start|>", "assistant")
        # Template keyword arguments pass through (Qwen3's enable_thinking).
        ids = dj.chat_prompt(tok, "what is 4 ?", enable_thinking=True)
        assert ids[-3:] == _ids("<|im_start|>", "assistant", "<think>")
        # Decoding a generated continuation and parsing it.
        text = tok.decode(_ids("2", "+", "2", "</think>", "4"), skip_special_tokens=False)
        assert dj.split_thinking(text) == ("2 + 2", "4")


def test_bucket_padding_leaves_room_to_generate(tiny_hf):
    ckpt = tiny_hf("dense_tied")
    # 17 prompt tokens + 4 new tokens = 21 <= 24 slots: everything fits without padding.
    out = generate_lockstep(ckpt.cfg, ckpt.params(), [list(range(1, 18))], 4, max_cache=24)
    assert out.lengths.tolist() == [4] and out.cache_full is False


@pytest.mark.parametrize("delta", [False, True])
def test_last_only_logits_are_the_last_column(tiny_hf, prompts, delta):
    from dami_jax.interpolate import delta_params
    from dami_jax.models import qwen3
    from dami_jax.models.kv_cache import KVCache
    from helpers import left_pad

    ckpt = tiny_hf("dense_gqa")
    params = ckpt.params()
    lam = None
    if delta:  # a second model for Δ, per-row λ
        params = delta_params(params, tiny_hf("dense_gqa", seed=1).params())
        lam = jnp.linspace(0.0, 1.0, len(prompts))
    tokens, mask = left_pad(prompts)
    cache = KVCache.init(ckpt.cfg, tokens.shape[0], tokens.shape[1] + 2, jnp.float32)
    full, _ = qwen3.apply(ckpt.cfg, params, tokens, mask, cache=cache, lam=lam)
    last, last_cache = qwen3.apply(ckpt.cfg, params, tokens, mask, cache=cache, lam=lam, last_only=True)
    assert last.shape == (tokens.shape[0], 1, ckpt.cfg.vocab_size)
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    assert int(last_cache.index) == tokens.shape[1]
