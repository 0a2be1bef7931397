"""`python serve.py [--config FILE] [--host H] [--port P] [--api-key K] [key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dami_jax import compilation_cache


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="serve.py", description="OpenAI-compatible DAMI server (per-request λ).")
    p.add_argument("--config", help="YAML of ServeConfig fields (default: ServeConfig's defaults; "
                   "configs/serve.yaml is an example)")
    p.add_argument("--host", help="bind address (default 127.0.0.1; others need --api-key)")
    p.add_argument("--port", type=int)
    p.add_argument("--api-key", help="Bearer key clients must send (default $DAMI_API_KEY)")
    p.add_argument("--log-level", default="info")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. max_rows=16 instruct=DIR thinking=DIR")
    return p.parse_args(argv)


def _fail(message: str):
    """Bad configuration: a message and exit status 2, like an argparse error."""
    print(f"serve.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None) -> None:
    import uvicorn

    from dami_jax.config import ConfigError
    from dami_jax.errors import InputError
    from dami_jax.serve.app import create_app
    from dami_jax.serve.config import load_serve_config

    args = parse_args(argv)
    compilation_cache.enable()
    overrides = list(args.overrides)
    for key, value in (("host", args.host), ("port", args.port),
                       ("api_key", args.api_key or os.environ.get("DAMI_API_KEY"))):
        if value is not None:
            overrides.append(f"{key}={value}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_serve_config(args.config, overrides)
        cfg.check_bind()  # before loading anything
    except ConfigError as e:
        _fail(str(e))
    try:
        app = create_app(cfg)
    except (InputError, FileNotFoundError) as e:  # no pair, no servable policy, a bad file, ...
        _fail(str(e))
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=args.log_level, timeout_graceful_shutdown=5)
