"""`python serve.py [--pair toy|PAIR.yaml] [--set K=V] [--config FILE] [--host H] [--port P] [--api-key K] [key=value ...]`.

Under several processes (the flags of dami_jax.distributed, or a TPU VM pod slice) every
process loads its own copy of the pair; process 0 serves HTTP and the others step their
engines with it (serve/engine.py) until it stops.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dami_jax import compilation_cache, distributed


def parse_args(argv=None) -> argparse.Namespace:
    from dami_jax.eval.pairs import add_pair_arguments

    p = argparse.ArgumentParser(prog="serve.py", description="OpenAI-compatible DAMI server (per-request λ).")
    add_pair_arguments(p)
    p.add_argument("--config", help="YAML of ServeConfig fields (default: ServeConfig's defaults; "
                   "configs/serve.yaml is an example)")
    p.add_argument("--host", help="bind address (default 127.0.0.1; others need --api-key)")
    p.add_argument("--port", type=int)
    p.add_argument("--api-key", help="Bearer key clients must send (default $DAMI_API_KEY)")
    p.add_argument("--log-level", default="info")
    p.add_argument("overrides", nargs="*", help="ServeConfig overrides, e.g. max_rows=16 temperature=0.6")
    distributed.add_process_args(p)
    return p.parse_args(argv)


def _fail(message: str):
    """Bad configuration: a message and exit status 2, like an argparse error."""
    print(f"serve.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None) -> None:
    import uvicorn

    from dami_jax.errors import InputError
    from dami_jax.eval.pairs import load_pair_config
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
        pair_cfg = load_pair_config(args.pair, args.set)
        distributed.init_from_args(args)  # before the policies: checking a pref policy reads its model onto a device
        app = create_app(cfg, pair_cfg=pair_cfg)  # checks every policy spec, then loads the pair
    except (InputError, FileNotFoundError) as e:  # a bad file or field, no servable policy, ...
        _fail(str(e))
    if not distributed.is_writer():
        app.server.follow()
        return
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=args.log_level, timeout_graceful_shutdown=5)
