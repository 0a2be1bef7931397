"""`dami analyze` on the toy pair: each subcommand's wall and CPU time with its defaults.

Target (issue 19): each runs in under 2 minutes on this machine (2 cores). Every subcommand
runs as its own `dami` process, as a user starts it, in the order frontier, think-ratio (which
reuses frontier's sweep), cka, barrier, then think-ratio alone (its own sweep). CPU time is
the child's user + system time: on a machine shared with other jobs the wall time grows with
the load (recorded beside it), the CPU time much less.

    python benchmarks/analyze.py --json benchmarks/results/analyze_toy_cpu.json
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

TARGET_S = 120.0
RUNS = (("frontier", "out"), ("think-ratio", "out"), ("cka", "out"), ("barrier", "out"), ("think-ratio", "alone"))


def timed(argv: list[str]) -> dict:
    """Wall and CPU seconds of one child process, and the load average when it ended."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_1min": os.getloadavg()[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for command, out in RUNS:
            cmd = [sys.executable, "-m", "dami_jax.cli", "analyze", command, "--pair", "toy",
                   "--out", os.path.join(tmp, out), "--no-progress"]
            r = timed(cmd)
            name = command + (" (sweep reused)" if command == "think-ratio" and out == "out" else "")
            rows.append({"command": name, **r, "cpu_over_target": round(r["cpu_s"] / TARGET_S, 2)})
    _common.print_table("dami analyze --pair toy (defaults)", ["command", "wall_s", "cpu_s", "load_1min",
                        "cpu_over_target"], [[r[k] for k in ("command", "wall_s", "cpu_s", "load_1min",
                                                              "cpu_over_target")] for r in rows],
                        notes=[f"target: each under {TARGET_S:.0f} s on this machine"])
    _common.write_json(args.json, {"target_s": TARGET_S, "rows": rows, "environment": _common.environment()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
