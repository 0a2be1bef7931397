"""Helpers shared by the tests: tiny Qwen3 / Qwen3-MoE (and Qwen2, Llama) architectures, random HF models,
padding, random prompts and flat views of params trees. Fixtures live in conftest.py.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time

import numpy as np

from dami_jax.tree import path_keys

# ---------------------------------------------------------------------------
# Tiny architectures. Every dimension is even so an 8-device (2, 2, 2) mesh
# really shards them; the variants cover the semantics we must match.

_COMMON = dict(max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
               pad_token_id=None)

TINY = {
    # Tied embeddings, head_dim == hidden / heads, 2:1 GQA.
    "dense_tied": dict(
        model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        rope_theta=10000.0,
    ),
    # Untied, head_dim (16) != hidden / heads (48 / 6 = 8), 3:1 GQA, non-default eps.
    "dense_gqa": dict(
        model_type="qwen3", vocab_size=160, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        rope_theta=500.0, rms_norm_eps=1e-5,
    ),
    # MoE, normalized top-k weights, layer 1 forced dense by mlp_only_layers.
    "moe_norm": dict(
        model_type="qwen3_moe", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[1], rope_theta=10000.0,
    ),
    # MoE, raw top-k weights, MoE only on every 2nd layer (decoder_sparse_step=2).
    "moe_sparse": dict(
        model_type="qwen3_moe", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
        num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=False,
        decoder_sparse_step=2, mlp_only_layers=[], rope_theta=10000.0,
    ),
}

# The other families (tests/test_model_families.py). Qwen2: q/k/v biases, no q/k norms, head_dim =
# hidden / heads. Llama: attention and MLP biases (or none), llama3 RoPE scaling whose pretraining
# context (32) the tests' prompts run well past, so all three of its frequency bands matter.
_LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=32)
TINY_FAMILIES = {
    "qwen2": dict(
        model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0,
    ),
    "qwen2_tied": dict(
        model_type="qwen2", vocab_size=160, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500.0,
        rms_norm_eps=1e-5,
    ),
    "llama": dict(
        model_type="llama", vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        attention_bias=True, mlp_bias=True, rope_theta=10000.0, rope=_LLAMA3,
    ),
    "llama_tied": dict(
        model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=50000.0,
        rope={**_LLAMA3, "factor": 4.0, "high_freq_factor": 2.0},
    ),
}


def hf_config(name: str, **overrides):
    """A transformers config (Qwen3Config, Qwen2Config, LlamaConfig, ...) for the tiny architecture `name`."""
    from transformers import AutoConfig

    spec = {**_COMMON, **{**TINY, **TINY_FAMILIES}[name], **overrides}
    model_type = spec.pop("model_type")
    rope = spec.pop("rope", {"rope_type": "default"})
    spec["rope_parameters"] = {**rope, "rope_theta": spec.pop("rope_theta")}
    return AutoConfig.for_model(model_type, **spec)


def perturb_(model, seed: int) -> None:
    """Random weights everywhere: std 1/sqrt(fan_in) matrices, norm scales 1 + 0.3·N(0, 1).

    The default init (normal 0.02, unit norms) would leave every norm at 1, so a
    wrong norm mapping or a missing norm could go unnoticed.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))


def build_hf_model(name: str, seed: int = 0, **overrides):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(name, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    perturb_(model, seed)
    model.eval()
    # No EOS anywhere: generation runs for exactly max_new_tokens on both sides.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.generation_config.bos_token_id = None
    return model


@dataclasses.dataclass
class TinyCheckpoint:
    name: str
    path: str  # HF directory (config.json + model.safetensors)
    hf: object  # the torch model, float32, eval mode
    _cfg: object = None
    _params: dict = dataclasses.field(default_factory=dict)

    @property
    def cfg(self):
        if self._cfg is None:
            import dami_jax as dj

            self._cfg = dj.ModelConfig.from_hf(self.path)
        return self._cfg

    def params(self, dtype: str = "float32") -> dict:
        """Our params loaded from the HF directory (cached per dtype, single device)."""
        if dtype not in self._params:
            import dami_jax as dj

            self._params[dtype] = dj.load_hf(self.path, dtype=dtype, progress=False)
        return self._params[dtype]

    def hf_logits(self, tokens: list[int]) -> np.ndarray:
        """HF float32 logits (T, V) for one unpadded prompt."""
        import torch

        with torch.no_grad():
            out = self.hf(torch.tensor([tokens]), use_cache=False)
        return out.logits[0].float().numpy()


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (B, T) tokens and attention mask, written independently of the library."""
    t = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), t), pad_id, np.int32)
    mask = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, t - len(p):] = p
        mask[i, t - len(p):] = 1
    return tokens, mask


def random_prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


def leaves(tree) -> dict:
    """{path tuple of strings: numpy array} for every leaf."""
    import jax

    return {path_keys(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def sigkill_when(proc, ready, waiting_for: str, deadline_s: float) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (polled every 2 ms), and wait for it to die. The test
    fails if `proc` ends first or `waiting_for` has not happened within `deadline_s`."""
    import pytest

    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {waiting_for}")
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
            assert proc.returncode == -signal.SIGKILL, proc.returncode
            return
        time.sleep(0.002)
    proc.kill()
    pytest.fail(f"{waiting_for}: not within {deadline_s} s")
