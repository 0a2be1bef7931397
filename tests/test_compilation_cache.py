"""The entry points' persistent compilation cache: where it goes, how it is turned off, and that a
second `dami generate` loads its programs from it (subprocesses: JAX's config is process-global)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dami_jax import compilation_cache



def test_default_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("DAMI_JAX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache.default_dir() == str(tmp_path / "dami_jax" / "xla")
    monkeypatch.setenv("DAMI_JAX_CACHE", str(tmp_path / "mine"))
    assert compilation_cache.default_dir() == str(tmp_path / "mine")
    for off in ("off", "0", "", "OFF", "none"):
        monkeypatch.setenv("DAMI_JAX_CACHE", off)
        assert compilation_cache.default_dir() is None


def _clean_env(**extra) -> dict:
    """This process's environment without a JAX cache directory of the user's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def _python(code: str, env: dict) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=_clean_env(**env))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_enable_respects_jax_own_setting_and_off(tmp_path):
    code = "from dami_jax import compilation_cache as c; import jax; print(c.enable(), jax.config.jax_compilation_cache_dir)"
    env = {"DAMI_JAX_CACHE": str(tmp_path / "dami")}
    assert _python(code, env) == f"{tmp_path / 'dami'} {tmp_path / 'dami'}"
    assert _python(code, {**env, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax")}) == \
        f"{tmp_path / 'jax'} {tmp_path / 'jax'}"
    assert _python(code, {"DAMI_JAX_CACHE": "off"}) == "None None"


@pytest.mark.slow
def test_second_launch_loads_its_programs_from_the_cache(tmp_path):
    """Two `dami generate` launches: the first compiles and stores, the second hits the cache for every
    program it asks the cache for (JAX's own monitoring events count the hits) and answers the same."""
    args = ["generate", "--pair", "toy", "--policy", "static:0.5", "--prompt", "2+3", "--max-new-tokens", "8"]
    code = ("import collections, json, sys, jax; events = collections.Counter(); "
            "jax.monitoring.register_event_listener(lambda e, **k: events.update([e.rsplit('/', 1)[-1]])); "
            "from dami_jax.cli import main; main(json.loads(sys.argv[1])); print(json.dumps(events))")
    env = _clean_env(DAMI_JAX_CACHE=str(tmp_path / "cache"),
                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # the toy's programs compile in under 1 s
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                              timeout=300, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().splitlines()
        runs.append((json.loads(lines[-2]), json.loads(lines[-1])))  # generate's answer, the event counts
    (first, ev1), (second, ev2) = runs
    assert ev1["compile_requests_use_cache"] > 0 and ev1.get("cache_hits", 0) == 0
    assert ev2["cache_hits"] == ev2["compile_requests_use_cache"] == ev1["compile_requests_use_cache"]
    assert first == second
