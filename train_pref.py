"""Train the DAMI-Pref reward model (DESIGN 1.3); thin entry to dami_jax.pref.pipeline.

    python train_pref.py --config configs/pref_toy.yaml --out dami_jax/pref/assets/toy [key=value ...]

Rerun the same command to resume an interrupted run (rollouts, features and
training all continue where they stopped).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML of PrefConfig fields (configs/pref_toy.yaml)")
    parser.add_argument("--out", default="runs/pref", help="reward model, metrics.jsonl, report.json")
    parser.add_argument("--work", default=None, help="resumable state (default OUT/work)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. steps=500")
    args = parser.parse_args(argv)

    from dami_jax.pref.config import load_pref_config
    from dami_jax.pref.pipeline import run

    try:
        cfg = load_pref_config(args.config, args.overrides)
        run(cfg, args.out, args.work, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError
        print(f"train_pref: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
