"""DAMI-Pref training survives SIGKILL: a killed and restarted run ends where an uninterrupted one does.

The in-process resume test (test_pref.py) stops cleanly after a checkpoint. Here
the trainer runs in its own process (Orbax CheckpointManager, async saves, the
metrics log) and is killed with SIGKILL while a checkpoint is being written, so
the restart sees what a crash leaves: a finished older checkpoint, a
half-written `<step>.orbax-checkpoint-tmp` directory and metrics logged past the
last checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from helpers import sigkill_when

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 60, 5  # 12 periodic saves of ~0.1-0.3 s each on a busy CPU: a wide window to kill in

# The same command for all three runs: synthetic separable preferences (test_pref.synthetic_data),
# one CPU device, final params to OUT/params.npz and the first step this process ran to OUT/start.
WORKER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from flax import nnx
    sys.path.insert(0, sys.argv[2])
    from test_pref import small_cfg, synthetic_data
    from dami_jax.models.sharding import make_mesh
    from dami_jax.pref.train import train_reward_model
    out, steps, every = sys.argv[1], int(sys.argv[3]), int(sys.argv[4])
    cfg = small_cfg(steps=steps, checkpoint_every=every, log_every=every, eval_every=4 * every)
    res = train_reward_model(cfg, synthetic_data(), out + "/ckpt", mesh=make_mesh(data=1, devices=jax.devices()[:1]),
                             metrics_path=out + "/metrics.jsonl", progress=False)
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(res.model)))[0]
    np.savez(out + "/params.npz", **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})
    with open(out + "/start", "w") as f:
        f.write(str(min(res.losses)))
""")


def _launch(script, out):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": ROOT}
    os.makedirs(out, exist_ok=True)
    return subprocess.Popen([sys.executable, str(script), str(out), os.path.dirname(os.path.abspath(__file__)),
                             str(STEPS), str(EVERY)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(proc, what: str, timeout: float = 240) -> None:
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{out[-3000:]}"


def _steps_on_disk(ckpt) -> tuple[list[int], list[str]]:
    """Finished checkpoint steps and in-progress (tmp) entries of an Orbax directory."""
    names = os.listdir(ckpt) if os.path.isdir(ckpt) else []
    return sorted(int(n) for n in names if n.isdigit()), [n for n in names if "tmp" in n]


def _kill_mid_save(proc, ckpt, deadline_s: float = 240) -> tuple[list[int], list[str]]:
    """SIGKILL once a periodic checkpoint before the last step is finished and the next one is being written.

    Returns what the kill left on disk (the save seen in progress may have finished just before it).
    """
    def saving_after_a_finished_one():
        done, tmp = _steps_on_disk(ckpt)
        return bool(tmp) and any(EVERY <= s < STEPS for s in done)

    sigkill_when(proc, saving_after_a_finished_one, f"a checkpoint in [{EVERY}, {STEPS}) was finished and the next "
                 "one in progress (make the run longer (STEPS) or save more often)", deadline_s)
    return _steps_on_disk(ckpt)


@pytest.mark.slow
def test_sigkill_mid_training_then_restart_matches_an_uninterrupted_run(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = _launch(script, whole)  # runs alongside: only its end result is compared
    victim = _launch(script, killed)
    try:
        done, tmp = _kill_mid_save(victim, killed / "ckpt")
        assert max(done) < STEPS and not (killed / "params.npz").exists()
        restart = _launch(script, killed)  # the same command on the same directory
        _finish(restart, "the restarted run")
    finally:
        for p in (reference, victim):
            if p.poll() is None:
                p.kill()
    _finish(reference, "the uninterrupted run")
    # The restart resumed from the last finished checkpoint (not from scratch, not past it).
    start = int((killed / "start").read_text())
    assert EVERY <= start == max(done) < STEPS, (start, done, tmp)
    # Same final params. Exactly, not within a tolerance: the restored float32 state is bit-identical
    # to the state the killed run saved, every batch is a function of (seed, step), and the same
    # jitted step on the same CPU is deterministic, so every later step computes the same bits.
    with np.load(whole / "params.npz") as a, np.load(killed / "params.npz") as b:
        assert sorted(a.files) == sorted(b.files) and len(a.files) >= 4
        for k in a.files:
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    # The log of the restarted run is the uninterrupted run's, no record lost or repeated: the killed
    # run logged steps past its last finished checkpoint (a step is logged before it is saved), and
    # the restart logs them again after dropping those copies.
    assert (killed / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
    assert _steps_on_disk(killed / "ckpt") == ([STEPS - EVERY, STEPS], [])  # the stale tmp dir is gone
