"""OpenAI-compatible DAMI server: per-request λ (a policy or explicit) in one continuous batch.

    from dami_jax.serve import create_app, load_serve_config
    app = create_app(load_serve_config(None, ["max_rows=16"]))   # an ASGI app for uvicorn

`serve.py` (repo root) is the command-line entry; see `main`.
"""

from dami_jax.serve.app import Server, create_app
from dami_jax.serve.config import ServeConfig, load_serve_config
from dami_jax.serve.engine import Engine
from dami_jax.serve.request import GenRequest, QueueFull
from dami_jax.serve.main import main

__all__ = ["Engine", "GenRequest", "QueueFull", "ServeConfig", "Server", "create_app", "load_serve_config", "main"]
