"""Load test of the DAMI server: N chat requests at a concurrency C with a mix of λ and of
max_tokens, against the offline engine (`dj.Engine.generate`) on the same requests.

    nice python benchmarks/serve_load.py --random --n 200 --json out/serve_load.json   # starts serve.py
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --n 1000                 # a running server

Every request is greedy, streamed (time to first token = first SSE chunk), with an
explicit λ cycling through `--lams` and max_tokens through `--max-tokens`, on toy-world
questions. The started server runs ServeConfig's engine knobs with max_rows = C,
max_seq_len and the overrides given; the offline reference is one dj.Engine built from the
same knobs (`ServeConfig.engine_kwargs`), all requests submitted at once, compile excluded
(`warmup` first). Between them, the server's engine loop alone (serve.Engine, every
request submitted at once, no HTTP) tells the loop's cost from the HTTP path's. Each runs
`--repeats` times, the fastest kept. Reported: tokens/s of the server (generated tokens /
wall time of the whole load), of the loop alone and of the offline engine; p50/p99
time to first token and latency; errors; the share of requests whose tokens equal the
offline ones; server RSS (`process_resident_memory_bytes` of /metrics) before the loads
and after each.

The pair: `--instruct/--thinking` directories, else the shipped toy pair, else
(`--random [PRESET]`) a random pair with the toy tokenizer, built in a temp dir:
`toy` (tiny) or a preset shape, e.g. `--random qwen3-0.6b --dtype bfloat16` on a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_pair(root: str, preset: str) -> tuple[str, str]:
    """Two independent random checkpoints with the toy tokenizer: `toy` (tiny, toy vocabulary)
    or a preset shape of _common.PRESETS (e.g. qwen3-0.6b; ids past the toy vocabulary decode to nothing)."""
    import jax

    import dami_jax as dj
    from dami_jax.models import qwen3
    from dami_jax.toyworld import language as L
    from dami_jax.toyworld.tokenizer import save_tokenizer

    shape = dict(vocab_size=len(L.VOCAB), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, tie_word_embeddings=False) if preset == "toy" else _common.PRESETS[preset]
    cfg, ids = dj.ModelConfig(**shape, max_position_embeddings=4096), dj.GenerationIds(eos=(L.EOS_ID,))
    dirs = []
    for name, seed in (("instruct", 0), ("thinking", 1)):
        rng = np.random.default_rng(seed)

        def leaf(s):
            if len(s.shape) == 1:
                return np.ones(s.shape, np.float32)
            return rng.standard_normal(s.shape, np.float32) * np.float32(0.04 if preset == "toy" else 0.02)

        d = os.path.join(root, name)
        dj.save_hf(cfg, jax.tree.map(leaf, qwen3.abstract_params(cfg)), d, generation_ids=ids)
        save_tokenizer(d)
        dirs.append(d)
    return dirs[0], dirs[1]


def start_server(instruct: str, thinking: str, dtype: str, overrides) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, os.path.join(ROOT, "serve.py"), "--port", str(port), "--log-level", "warning",
           "--set", f"instruct={instruct}", "--set", f"thinking={thinking}", "--set", f"dtype={dtype}", *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.time() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"serve.py exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise SystemExit("serve.py did not come up in 600 s")
        time.sleep(0.5)


def server_rss(url: str) -> float | None:
    import httpx

    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("process_resident_memory_bytes"):
            return float(line.split()[-1]) / 2**20
    return None


async def one(reader, writer, host: str, question: str, lam: float, max_tokens: int) -> dict:
    """One streamed chat request on a kept-alive HTTP/1.1 connection, read as chunks of SSE lines.
    A load generator on the server's own cores must be lean: httpx took about as much CPU per
    request as the server."""
    body = json.dumps({"messages": [{"role": "user", "content": question}], "lambda": lam,  # explicit λ: any model
                       "max_tokens": max_tokens, "temperature": 0, "stream": True, "return_token_ids": True,
                       "stream_options": {"include_usage": True}}).encode()
    t0, ttft, ids, err = time.perf_counter(), None, [], None
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
    status = (await reader.readline()).split(b" ", 2)
    headers = {}
    while (line := (await reader.readline()).strip()):
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if b"content-length" in headers:  # an error body
        data = await reader.readexactly(int(headers[b"content-length"]))
        return {"error": f"{b' '.join(status[1:]).decode().strip()} {data[:200]!r}"}
    buf = b""
    while size := int((await reader.readline()).split(b";")[0], 16):  # chunked: size line, data, CRLF
        buf += (await reader.readexactly(size + 2))[:-2]
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            ttft = ttft or time.perf_counter() - t0
            chunk = json.loads(line[6:])
            if "error" in chunk:
                err = chunk["error"]["message"]
            for c in chunk.get("choices", []):
                ids += c.get("token_ids", [])
    await reader.readline()  # the last chunk's CRLF
    return {"ttft": ttft, "latency": time.perf_counter() - t0, "ids": ids, "error": err}


async def load(url: str, jobs, concurrency: int) -> tuple[list[dict], float]:
    """jobs: (question, λ, max_tokens) each, sent by `concurrency` clients with a connection each;
    results in the jobs' order and the wall time."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    results, todo = [None] * len(jobs), iter(range(len(jobs)))

    async def client():
        conn = None
        for i in todo:
            try:
                conn = conn or await asyncio.open_connection(host, int(port))
                results[i] = await one(*conn, host, *jobs[i])
            except Exception as e:  # noqa: BLE001 - every failure is counted; the connection is dropped
                results[i] = {"error": f"{type(e).__name__}: {e}"}
                if conn:
                    conn[1].close()
                conn = None
        if conn:
            conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


def offline(pair, prompts, lams, max_tokens, serve_cfg, repeats: int):
    """The offline engine on the same requests: its tokens and best seconds (compile excluded)."""
    import dami_jax as dj

    engine = dj.Engine(pair, **serve_cfg.engine_kwargs(pair.cfg))
    engine.warmup()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = engine.generate(prompts, max_tokens, lam=lams)
        best = min(best, time.perf_counter() - t0)
    return out.token_lists(), best


def serving_loop(pair, prompts, lams, max_tokens, serve_cfg, repeats: int):
    """The server's engine loop alone, without HTTP: every request submitted at once to
    serve.Engine, its events read on an asyncio loop. Its tokens and best seconds."""
    from dami_jax.serve.engine import Engine
    from dami_jax.serve.request import GenRequest

    engine = Engine(pair, len(prompts), None, **serve_cfg.engine_kwargs(pair.cfg))
    engine.warmup()
    engine.start()

    async def collect(req) -> list[int]:
        ids = []
        while True:
            for event in await req.events.get():
                if event[0] == "error":
                    raise RuntimeError(event[1])
                if event[0] == "finish":
                    return ids
                ids.append(event[2])

    async def run():
        loop = asyncio.get_running_loop()
        reqs = [GenRequest(prompt=p, max_tokens=n, lam=float(lam), stop_ids=tuple(pair.stop_tokens), loop=loop,
                           events=asyncio.Queue()) for p, n, lam in zip(prompts, max_tokens, lams)]
        t0 = time.perf_counter()
        engine.submit(reqs)
        ids = await asyncio.gather(*(collect(r) for r in reqs))
        return ids, time.perf_counter() - t0

    try:
        runs = [asyncio.run(run()) for _ in range(repeats)]
    finally:
        engine.stop()
    return runs[-1][0], min(seconds for _, seconds in runs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server (default: start serve.py on a free loopback port)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="loads (and offline runs); the fastest is kept")
    ap.add_argument("--max-tokens", default="16,64,256", help="max_tokens of the requests, cycled")
    ap.add_argument("--lams", default="0,0.2,0.4,0.5,0.6,0.8,1")
    ap.add_argument("--instruct")
    ap.add_argument("--thinking")
    ap.add_argument("--random", nargs="?", const="toy", metavar="PRESET",
                    help="a random pair: toy (tiny, the default) or a preset shape such as qwen3-0.6b")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-seq-len", type=int, default=4096, help="max_seq_len of the started server (and offline)")
    ap.add_argument("--json")
    ap.add_argument("overrides", nargs="*",
                    help="ServeConfig overrides of the started server and the offline engine, e.g. decode_burst=1")
    args = ap.parse_args(argv)

    from dami_jax import compilation_cache
    from dami_jax.generate.chat import chat_prompt, load_tokenizer
    from dami_jax.pair import load_pair
    from dami_jax.serve import load_serve_config
    from dami_jax.toyworld import language as L

    if args.instruct:
        instruct, thinking = args.instruct, args.thinking
    elif args.random:
        instruct, thinking = random_pair(tempfile.mkdtemp(prefix="serve_load_pair_"), args.random)
    else:
        from dami_jax.toyworld import default_pair_dirs

        instruct, thinking = default_pair_dirs()
    lam_grid = [float(x) for x in args.lams.split(",")]
    questions = [p.text for p in L.sample_problems(args.n, seed=1)]
    lams = np.asarray([lam_grid[i % len(lam_grid)] for i in range(args.n)], np.float32)
    limit_grid = [int(x) for x in args.max_tokens.split(",")]
    limits = [limit_grid[i % len(limit_grid)] for i in range(args.n)]
    jobs = list(zip(questions, lams.tolist(), limits))
    overrides = [f"max_rows={args.concurrency}", f"max_queue={2 * args.concurrency}",
                 f"max_seq_len={args.max_seq_len}", *args.overrides]
    serve_cfg = load_serve_config(None, overrides)
    compilation_cache.enable()  # the offline engine's programs: as the server compiled them
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(instruct, thinking, args.dtype, overrides)
    try:
        rss = [server_rss(url)]  # before the first load, then after each
        asyncio.run(load(url, jobs[:8], 8))  # the first requests' host paths
        loads = []
        for _ in range(args.repeats):
            loads.append(asyncio.run(load(url, jobs, args.concurrency)))
            rss.append(server_rss(url))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    tok = load_tokenizer(thinking)
    prompts = [chat_prompt(tok, q) for q in questions]
    pair = load_pair(instruct, thinking, dtype=args.dtype)
    knobs = serve_cfg.engine_kwargs(pair.cfg)
    ref, off_s = offline(pair, prompts, lams, limits, serve_cfg, args.repeats)
    alone, alone_s = serving_loop(pair, prompts, lams, limits, serve_cfg, args.repeats)

    results, wall = min(loads, key=lambda x: x[1])  # the fastest load; errors and tokens checked over all
    every = [r for results_, _ in loads for r in results_]
    failed = [r for r in every if r["error"]]
    ok = [r for r in results if not r["error"]]
    tokens = sum(len(r["ids"]) for r in ok)
    ttft = np.asarray([r["ttft"] for r in ok]) * 1e3
    lat = np.asarray([r["latency"] for r in ok]) * 1e3
    checked = [r["ids"] == ref[i % len(ref)] for i, r in enumerate(every) if not r["error"]]
    same = float(np.mean(checked)) if checked else float("nan")
    off_tokens = sum(map(len, ref))
    rows = [["server (streamed, C=%d)" % args.concurrency, len(results), len(results) - len(ok), tokens, wall,
             tokens / wall, np.percentile(ttft, 50), np.percentile(ttft, 99), np.percentile(lat, 50),
             np.percentile(lat, 99)],
            ["serving loop alone (no HTTP)", len(prompts), 0, sum(map(len, alone)), alone_s,
             sum(map(len, alone)) / alone_s, None, None, None, None],
            ["offline dj.Engine (%d rows)" % args.concurrency, len(prompts), 0, off_tokens, off_s,
             off_tokens / off_s, None, None, None, None]]
    ratio = (tokens / wall) / (off_tokens / off_s)
    loop_ratio = (sum(map(len, alone)) / alone_s) / (off_tokens / off_s)
    notes = [f"server / offline tokens/s: {ratio:.2f}; serving loop alone / offline: {loop_ratio:.2f} "
             f"(the fastest of {args.repeats} runs each)",
             f"errors over all {len(every)} requests: {len(failed)}; with the offline tokens: {same:.3f} "
             f"(serving loop alone: {np.mean([a == b for a, b in zip(alone, ref)]):.3f})",
             "server RSS (MiB) before the loads, then after each: " + ", ".join(f"{x:.0f}" for x in rss),
             f"λ mix {lam_grid}, max_tokens mix {limit_grid}, greedy; engine: {knobs}"]
    _common.print_table("serve_load", ["run", "requests", "errors", "tokens", "wall_s", "tok/s", "ttft_p50_ms",
                                       "ttft_p99_ms", "lat_p50_ms", "lat_p99_ms"], rows, notes)
    errors = sorted({r["error"] for r in failed})[:5]
    _common.write_json(args.json, {
        "env": _common.environment(), "xla_flags": os.environ.get("XLA_FLAGS"), "args": vars(args),
        "pair": [instruct, thinking],
        "server": {"requests": len(every), "errors": len(failed), "error_samples": errors,
                   "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                   "ttft_ms": {"p50": float(np.percentile(ttft, 50)), "p99": float(np.percentile(ttft, 99))},
                   "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))},
                   "rss_mib_before_and_after_each_load": rss},
        "serving_loop_alone": {"tokens": sum(map(len, alone)), "wall_s": alone_s,
                               "same_tokens_share": float(np.mean([a == b for a, b in zip(alone, ref)])),
                               "ratio_to_offline": loop_ratio},
        "offline": {"tokens": off_tokens, "wall_s": off_s, "tokens_per_s": off_tokens / off_s, "engine": knobs},
        "all_walls_s": [w for _, w in loads], "speed_ratio": ratio,
        "same_tokens_share": same,
    })
    return 0 if ok and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
