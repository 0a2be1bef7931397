"""The generation engine: paged KV cache (pages.py), paged attention (paged_attention.py)."""
