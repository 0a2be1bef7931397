"""Shared helpers for the benchmarks: model presets, one printed table, JSON, RSS, bandwidth.

Nothing here is timed itself; each benchmark decides what it measures.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import threading
import time

# Shapes of public Qwen3 checkpoints (random weights; only the shapes matter here).
PRESETS = {
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
                       num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-4b": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_layers=36,
                     num_heads=32, num_kv_heads=8, head_dim=128, tie_word_embeddings=True),
    # Smoke checks: runs end to end in seconds.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True),
}

H100_SXM_NOMINAL_BYTES_S = 3.35e12


def model_config(preset: str):
    import dami_jax as dj

    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    return dj.ModelConfig(**PRESETS[preset], max_position_embeddings=4096)


# ---------------------------------------------------------------------------
# Output: one table, one JSON file.

def print_table(title: str, columns: list[str], rows: list[list], notes: list[str] = ()) -> None:
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print(line)
    print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(columns, widths))))
    print(line)
    for r in cells:
        print("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))))
    print(line)
    for n in notes:
        print(n)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def environment() -> dict:
    import jax

    dev = jax.devices()[0]
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "loadavg_1m": os.getloadavg()[0],
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------
# Resident set size (Linux /proc).

def proc_status_kb(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in kB (VmRSS, VmHWM, RssAnon, RssFile, ...)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0])
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Background thread polling /proc/self/status; keeps the peak of each field.

    Polling misses spikes shorter than the period, so the kernel's VmHWM (reset
    with `reset_peak_rss`) is the primary peak; the sampler splits the peak into
    anonymous memory and file-backed (mmap) pages, which VmHWM cannot.
    """

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, period_s: float = 0.002):
        self.period_s = period_s
        self.peak = {k: 0 for k in self.FIELDS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            s = proc_status_kb(*self.FIELDS)
            for k, v in s.items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------
# Timing, and memory read bandwidth measured in the same process as the benchmark.

def best_time(fn, repeats: int, warmup: bool = True) -> float:
    """Minimum wall time of `repeats` calls of `fn`, after one untimed warm-up call (compile,
    page faults) unless `warmup` is False."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_read_bandwidth(nbytes: int, repeats: int = 5) -> dict[str, float]:
    """Bytes/s of several streaming reads of one array of about `nbytes`; keys name the method.

    CPU: a float32 matrix-vector product (each matrix element read once) by
    XLA (jitted jnp), NumPy (its BLAS, all threads) and PyTorch when present
    (the library HF runs on). GPU/TPU: a jitted full reduction (read only) and a
    jitted copy (counted as read + write bytes). The matrix is written before
    it is read, so no page is the shared zero page.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    out: dict[str, float] = {}
    if jax.default_backend() == "cpu":
        n = int((nbytes // 4) ** 0.5)
        a = jax.jit(lambda: jnp.full((n, n), 1.5, jnp.float32))()
        x = jnp.ones((n,), jnp.float32)
        matvec = jax.jit(lambda a, x: a @ x)
        out["jax_matvec"] = a.nbytes / best_time(lambda: matvec(a, x).block_until_ready(), repeats)
        del a
        an = np.full((n, n), 1.5, np.float32)
        xn = np.ones((n,), np.float32)
        out["numpy_matvec"] = an.nbytes / best_time(lambda: an @ xn, repeats)
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:
            at, xt = torch.from_numpy(an), torch.from_numpy(xn)
            with torch.inference_mode():
                out["torch_matvec"] = an.nbytes / best_time(lambda: torch.mv(at, xt), repeats)
        del an
    else:
        n = nbytes // 4
        a = jax.jit(lambda: jnp.full((n,), 1.5, jnp.float32))()
        total = jax.jit(lambda a: jnp.sum(a))
        copy = jax.jit(lambda a: a * 2.0)
        out["jax_reduce"] = a.nbytes / best_time(lambda: total(a).block_until_ready(), repeats)
        out["jax_copy_rw"] = 2 * a.nbytes / best_time(lambda: copy(a).block_until_ready(), repeats)
        del a
    return out
