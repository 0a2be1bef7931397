"""JAX's persistent compilation cache for the command-line tools.

A Qwen3-4B decode program compiles in 30-40 s on an H100 (benchmarks/README.md, gpu_check.sh),
and every `dami eval`, `dami serve` or `train_pref.py` launch compiles the same programs again.
With the cache on, a later launch with the same shapes loads them from disk.

Where: `$DAMI_JAX_CACHE`, else `$XDG_CACHE_HOME/dami_jax/xla` (~/.cache/dami_jax/xla);
`DAMI_JAX_CACHE=off` turns it off. A cache directory set through JAX itself
(`JAX_COMPILATION_CACHE_DIR` or `jax.config`) is left as it is. The library never
turns the cache on by itself: only the entry points call `enable()`.
"""

from __future__ import annotations

import os

OFF = ("", "0", "off", "false", "none")


def default_dir() -> str | None:
    """The cache directory the entry points use, or None when turned off."""
    path = os.environ.get("DAMI_JAX_CACHE")
    if path is None:
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(root, "dami_jax", "xla")
    return None if path.strip().lower() in OFF else path


def enable(path: str | None = None) -> str | None:
    """Turn the persistent cache on (at `path`, else `default_dir()`); the directory in use, or None.

    Call it before the process compiles anything: JAX decides once per process whether to use the cache.
    """
    import jax

    if jax.config.jax_compilation_cache_dir:  # the user's own setting wins
        return jax.config.jax_compilation_cache_dir
    path = path or default_dir()
    if path is None:
        return None
    jax.config.update("jax_compilation_cache_dir", path)  # programs compiling in < 1 s are not stored (JAX's default)
    return path
