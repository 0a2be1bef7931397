"""Train the DAMI-Pref reward model (DESIGN 1.3): the same command as `dami train-pref`.

    python train_pref.py --config configs/pref_toy.yaml --out dami_jax/pref/assets/toy [key=value ...]

Rerun the same command to resume an interrupted run (rollouts, features and
training all continue where they stopped). On several processes (a pod slice,
or --coordinator/--num-processes/--process-id) every process runs the same
command with a --work directory they all see; process 0 writes the outputs
(README, "Multi-host / pod slice").
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from dami_jax.cli import main as dami

    return dami(["train-pref", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
