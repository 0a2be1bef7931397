"""Shared fixtures: tiny random Hugging Face Qwen3 / Qwen3-MoE checkpoints built locally
(helpers.py builds them).

XLA_FLAGS is set here, before anything imports jax, so every test session sees
8 CPU devices (the sharding tests need them; every other test runs on device 0).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# 8 CPU devices, and LLVM's -O0 for the compiled kernels: the suite's time is mostly XLA
# compiling tiny programs (about 3/4 of a toy-pair test), and -O0 cuts that by about a quarter.
# It changes no arithmetic (XLA CPU emits no fast-math), only how fast the tiny kernels run.
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DAMI_JAX_CACHE", "off")  # tests write no compilation cache to ~/.cache

# One persistent compilation cache for the session, shared by the xdist workers and every dami
# subprocess a test launches (they inherit the environment): most tests compile the same toy-pair
# programs, and loading one costs about a third of compiling it (test_pair.py: 117 s -> 38 s CPU).
# It is made before the workers start and removed when the process that made it exits. Every
# program is stored (the toy's compile in well under JAX's 1 s threshold), and a size limit turns
# on JAX's file lock, so a worker never reads an entry another process is still writing.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dami_jax_test_xla_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

import gc  # noqa: E402

import pytest  # noqa: E402

from helpers import TinyCheckpoint, build_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """Factory: tiny_hf(name, seed=0) -> TinyCheckpoint saved with save_pretrained (cached)."""
    import torch

    torch.set_num_threads(1)
    cache: dict = {}

    def make(name: str, seed: int = 0) -> TinyCheckpoint:
        key = (name, seed)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{name}-{seed}")
            model = build_hf_model(name, seed)
            model.save_pretrained(path)
            cache[key] = TinyCheckpoint(name=name, path=str(path), hf=model)
        return cache[key]

    return make


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module.

    Each XLA CPU executable holds a few memory mappings for its JIT code, and JAX caches
    every one it compiles. An xdist worker runs hundreds of tests, so it reached Linux's
    per-process limit (vm.max_map_count, 65530); LLVM then crashed with a segfault inside
    the next compile. Clearing per module keeps a worker near the largest module's count
    (about 14K); measured, the suite runs no slower for it.
    """
    yield
    import jax

    jax.clear_caches()
    gc.collect()
