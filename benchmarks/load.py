"""Peak memory and time of `dj.load_hf` on a sharded bfloat16 safetensors checkpoint.

Three processes, so the measured one only loads:
  1. a writer subprocess builds random params of the preset (`dj.init_params`) and
     saves them with `dj.save_hf(..., dtype="bfloat16", max_shard_bytes=--shard-mb)`
     (skipped with --ckpt DIR, which measures an existing checkpoint);
  2. a fresh measuring subprocess per row imports jax and dami_jax (the modules
     load_hf uses included) and initializes the backend, then records its RSS
     (VmRSS) as the baseline, resets the kernel's peak (VmHWM) to it by writing 5
     to /proc/self/clear_refs, loads with `dj.load_hf(dir, dtype=--dtype)`, waits
     for every array (`jax.block_until_ready`), and reads VmHWM:
         peak growth = VmHWM - baseline          (kernel counter: no spike missed)
     A thread polling /proc/self/status every 2 ms splits that peak into
     anonymous memory (RssAnon) and file pages mapped from the checkpoint
     (RssFile), which VmHWM does not tell apart;
  3. this process prints the table and writes the JSON.
Rows: "cold" loads after the checkpoint's pages were dropped from the page cache
(fsync, then posix_fadvise DONTNEED: best effort, no root needed); "warm" loads
again with the files cached, so it times the conversion, not the disk.
Checkpoint size = the bytes of the *.safetensors files on disk.
Target: peak growth <= 1.3x the checkpoint size.

Usage:
  python benchmarks/load.py                       # qwen3-0.6b, bfloat16, 500 MB shards
  python benchmarks/load.py --preset tiny         # smoke check
  python benchmarks/load.py --ckpt /path/to/hf_model --json out.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402

TARGET = 1.3


def log(msg: str) -> None:
    print(f"[load] {msg}", file=sys.stderr, flush=True)


def _save(directory: str, preset: str, shard_bytes: int) -> None:
    """Writer subprocess: random params of the preset -> sharded bfloat16 safetensors."""
    import dami_jax as dj

    cfg = _common.model_config(preset)
    params = dj.init_params(cfg, 0, dtype="bfloat16")
    dj.save_hf(cfg, params, directory, dtype="bfloat16", max_shard_bytes=shard_bytes, progress=False)


def _measure(directory: str, dtype: str) -> dict:
    """Measuring subprocess: RSS and seconds of one load_hf (see the module docstring)."""
    import time

    import jax
    import numpy as np

    import dami_jax as dj
    import dami_jax.checkpoint.store  # noqa: F401  (load_hf imports it on first use)

    jax.block_until_ready(jax.device_put(np.ones((1024,), np.float32)))  # backend and transfer path up
    base = _common.proc_status_kb("VmRSS", "RssAnon", "RssFile")
    hwm_reset = _common.reset_peak_rss()
    with _common.RssSampler() as sampler:
        t0, c0 = time.perf_counter(), time.process_time()
        params = dj.load_hf(directory, dtype=dtype, progress=False)
        jax.block_until_ready(params)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    end = _common.proc_status_kb("VmRSS", "VmHWM", "RssAnon", "RssFile")
    kb = 1024
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "hwm_reset": hwm_reset,
        "baseline_rss": base["VmRSS"] * kb,
        "peak_growth": (end["VmHWM"] - base["VmRSS"]) * kb if hwm_reset else None,
        "sampled_peak_growth": (sampler.peak["VmRSS"] - base["VmRSS"]) * kb,
        "sampled_peak_anon_growth": (sampler.peak["RssAnon"] - base["RssAnon"]) * kb,
        "sampled_peak_file_growth": (sampler.peak["RssFile"] - base["RssFile"]) * kb,
        "after_growth": (end["VmRSS"] - base["VmRSS"]) * kb,
        "params_bytes": int(sum(x.nbytes for x in jax.tree.leaves(params))),
        "backend": jax.default_backend(),
    }


def drop_page_cache(files: list[str]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_child(*args: str) -> str:
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"subprocess failed ({proc.returncode}): {' '.join(cmd)}")
    return proc.stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen3-0.6b", choices=sorted(_common.PRESETS))
    ap.add_argument("--dtype", default="bfloat16", help="dtype to load as")
    ap.add_argument("--shard-mb", type=float, default=500.0, help="max shard size when writing (MB)")
    ap.add_argument("--ckpt", default=None, help="measure this checkpoint directory instead of writing one")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--_save", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._save:
        _save(args._save, args.preset, int(args.shard_mb * 1e6))
        return 0
    if args._measure:
        print(json.dumps(_measure(args._measure, args.dtype)))
        return 0

    tmp = None
    directory = args.ckpt
    if directory is None:
        tmp = tempfile.TemporaryDirectory(prefix="dami-bench-load-")
        directory = os.path.join(tmp.name, "ckpt")
        log(f"writing {args.preset} bfloat16 checkpoint to {directory} (subprocess)")
        run_child("--_save", directory, "--preset", args.preset, "--shard-mb", str(args.shard_mb))
    try:
        files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        if not files:
            raise SystemExit(f"{directory}: no *.safetensors files")
        ckpt_bytes = sum(os.path.getsize(f) for f in files)
        rows, results = [], []
        for mode in ("cold", "warm"):
            if mode == "cold":
                drop_page_cache(files)
            log(f"measuring a {mode} load (subprocess)")
            r = json.loads(run_child("--_measure", directory, "--dtype", args.dtype).strip().splitlines()[-1])
            r["mode"] = mode
            peak = r["peak_growth"] if r["peak_growth"] is not None else r["sampled_peak_growth"]
            r["peak_growth_x_ckpt"] = peak / ckpt_bytes
            r["meets_target"] = r["peak_growth_x_ckpt"] <= TARGET
            results.append(r)
            rows.append([mode, r["seconds"], r["cpu_seconds"], ckpt_bytes / r["seconds"] / 1e9, peak / 1e9,
                         r["peak_growth_x_ckpt"], r["after_growth"] / 1e9,
                         r["sampled_peak_anon_growth"] / 1e9, r["sampled_peak_file_growth"] / 1e9])
    finally:
        if tmp is not None:
            tmp.cleanup()

    env = _common.environment()
    _common.print_table(
        f"load_hf: {args.preset}, {len(files)} bfloat16 shard(s), {ckpt_bytes / 1e9:.3f} GB on disk, "
        f"loaded as {args.dtype} ({env['device']})",
        ["load", "seconds", "cpu s", "GB/s", "peak growth GB", "x ckpt", "after GB", "peak anon GB", "peak file GB"],
        rows,
        [f"peak growth = VmHWM (reset to the baseline RSS via /proc/self/clear_refs) - baseline; "
         f"target <= {TARGET}x checkpoint size",
         "after = RSS growth once loaded; anon/file = peaks of RssAnon/RssFile polled every 2 ms",
         "cold = page cache dropped first (posix_fadvise DONTNEED), warm = files cached"],
    )
    _common.write_json(args.json, {
        "benchmark": "load", "args": vars(args), "environment": env,
        "checkpoint": {"files": len(files), "bytes": ckpt_bytes, "dtype": "bfloat16"},
        "target_x_ckpt": TARGET, "results": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
