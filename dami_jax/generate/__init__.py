"""Generation: KV-cached prefill/decode, sampling methods, chat helpers."""

from dami_jax.generate.chat import chat_prompt, load_tokenizer
from dami_jax.generate.decode import GenerateOutput
from dami_jax.generate.sampling import INSTRUCT_DEFAULT, THINKING_DEFAULT, Greedy, Sample
from dami_jax.thinking import split_thinking

__all__ = ["GenerateOutput", "Greedy", "INSTRUCT_DEFAULT", "Sample", "THINKING_DEFAULT",
           "chat_prompt", "load_tokenizer", "split_thinking"]
