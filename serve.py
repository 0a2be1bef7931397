#!/usr/bin/env python
"""OpenAI-compatible DAMI server: thin entry over dami_jax.serve (python serve.py --help)."""

from dami_jax.serve import main

if __name__ == "__main__":
    main()
