"""Several processes: `dami eval`, `dami calibrate`, `dami generate`, `dami train-pref`, `dami serve` and Pref rollouts
on 2 processes × 4 CPU devices (gloo collectives, loopback coordinator) give what one process gives,
process 0 alone writes, and a killed run resumes.

The one-process references run in this process (CLI `main`); the two processes are `dami` subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from dami_jax import distributed
from dami_jax.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The toy pair at 1 engine row: a chunk is 4 engine-fulls, so one process runs 8 problems in 2 chunks
# and two processes in one chunk, 4 problems each.
EVAL = ["--pair", "toy", "--bench", "toy", "--limit", "8", "--set", "batch_size=1"]
POLICIES = "static:0,static:1,conf"
TIMING = ("seconds",)  # wall time: the only record field that may differ between runs
RESULT_TIMING = ("seconds", "tokens_per_s", "speedup")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args_of, n: int = 2, program=("-m", "dami_jax.cli")) -> list[subprocess.Popen]:
    """n `dami` processes (or `program`s with its flags) on a loopback coordinator; args_of(i): process i's
    command line."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "DAMI_JAX_CACHE": "off",
           "TOKENIZERS_PARALLELISM": "false",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"}
    return [subprocess.Popen([sys.executable, *program, *args_of(i), "--coordinator", f"127.0.0.1:{port}",
                              "--num-processes", str(n), "--process-id", str(i)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(n)]


def _finish(procs, timeout: int = 600) -> list[str]:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return outs


def _wait_for_lines(procs, path, n: int) -> None:
    deadline = time.monotonic() + 300
    while not (path.exists() and path.read_text().endswith("\n") and len(path.read_text().splitlines()) >= n):
        assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()[0][-3000:]
        time.sleep(0.05)


def _kill_process_1_then_the_job(procs) -> None:
    procs[1].send_signal(signal.SIGKILL)
    time.sleep(1)
    procs[0].kill()  # as a launcher tears the job down (JAX would stop it after its heartbeat timeout)
    for p in procs:
        p.communicate()


def _records(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _by_key(records) -> dict:
    return {(r["policy"], r["id"], r["sample"]): {k: v for k, v in r.items() if k not in TIMING} for r in records}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process eval every multi-process run must reproduce."""
    out = tmp_path_factory.mktemp("one")
    assert main(["eval", *EVAL, "--policies", POLICIES, "--out", str(out)]) == 0
    return out


def test_shard_deals_whole_blocks_and_unshard_inverts_it():
    items = list(range(11))
    assert [distributed.shard(items, i, 3) for i in range(3)] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    parts = [distributed.shard(items, i, 2, block=4) for i in range(2)]
    assert parts == [[0, 1, 2, 3, 8, 9, 10], [4, 5, 6, 7]]
    assert distributed.unshard(parts, block=4) == items
    for count, block in ((3, 1), (4, 2), (2, 5), (5, 3)):
        assert distributed.unshard([distributed.shard(items, i, count, block) for i in range(count)], block) == items


@pytest.mark.parametrize("flags, env, match", [
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], {},
     "process id 2 is outside 0..1"),
    (["--coordinator", "127.0.0.1:1234"], {}, "--num-processes, --process-id missing"),
    (["--num-processes", "2", "--process-id", "0", "--coordinator", "nohost"], {}, "'nohost' is not HOST:PORT"),
    ([], {"JAX_NUM_PROCESSES": "2"}, "JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID missing"),
    ([], {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "0", "JAX_PROCESS_ID": "0"},
     "number of processes must be >= 1"),
])
def test_mismatched_process_flags_are_refused(flags, env, match, monkeypatch, capsys, tmp_path):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["eval", *EVAL, "--policies", "static:0", "--out", str(tmp_path), *flags]) == 2
    assert match in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_a_silent_coordinator_times_out_with_its_address(capsys, tmp_path):
    address = f"127.0.0.1:{_free_port()}"  # nobody listens there
    t0 = time.monotonic()
    assert main(["calibrate", "conf", "--out", str(tmp_path / "cal.json"), "--coordinator", address,
                 "--num-processes", "2", "--process-id", "1", "--init-timeout", "2"]) == 2
    assert time.monotonic() - t0 < 30
    err = capsys.readouterr().err
    assert f"the coordinator {address} did not answer" in err and "--init-timeout" in err


@pytest.mark.slow
def test_two_processes_eval_like_one_even_after_killing_process_1(one_process, tmp_path):
    """Killed midway (process 1, then the job) and rerun: every record once, as one process makes it."""
    outs = {i: tmp_path / f"out{i}" for i in range(2)}  # each process its own --out: only process 0 may write
    path = outs[0] / "records_toy.jsonl"
    procs = _launch(lambda i: ["eval", *EVAL, "--policies", POLICIES, "--out", str(outs[i])])
    _wait_for_lines(procs, path, 1)  # static:0's chunk is written
    _kill_process_1_then_the_job(procs)
    first = path.read_text()
    assert 0 < len(first.splitlines()) < 24, "the kill came too late to test a resume"

    _finish(_launch(lambda i: ["eval", *EVAL, "--policies", POLICIES, "--out", str(outs[i])]))
    assert not outs[1].exists()
    assert path.read_text().startswith(first)  # finished records kept as they were, not generated again
    records = _records(path)
    assert len(records) == len(_by_key(records)) == 24  # none lost, none twice
    assert _by_key(records) == _by_key(_records(one_process / "records_toy.jsonl"))
    results = [json.loads(p.read_text()) for p in (outs[0] / "results.json", one_process / "results.json")]
    assert [[{k: v for k, v in r.items() if k not in RESULT_TIMING} for r in rows] for rows in results] == [
        [{k: v for k, v in r.items() if k not in RESULT_TIMING} for r in results[1]]] * 2


@pytest.mark.slow
def test_two_processes_calibrate_like_one(tmp_path):
    from dami_jax.eval.run import toy_benchmark

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": p.question}) + "\n" for p in toy_benchmark(per_k=3, seed=3)))
    cal = ["calibrate", "conf", "--pair", "toy", "--prompts", str(prompts), "--set", "conf.batch_size=4"]
    assert main([*cal, "--out", str(tmp_path / "one.json")]) == 0
    outs = {i: tmp_path / f"two{i}.json" for i in range(2)}
    _finish(_launch(lambda i: [*cal, "--out", str(outs[i])]))
    assert not outs[1].exists()
    one, two = (json.loads(p.read_text()) for p in (tmp_path / "one.json", outs[0]))
    assert one["n"] == 18 and len(set(one["scores"])) > 1  # 3 problems per k = 1..6: 5 batches, 3 on process 0
    assert two == one


ROLLOUTS = textwrap.dedent("""
    import argparse
    from dami_jax import distributed
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    distributed.add_process_args(parser)
    args = parser.parse_args()
    distributed.init_from_args(args)
    from test_multihost import collect_toy_rollouts
    collect_toy_rollouts(args.path)
""")


def collect_toy_rollouts(path):
    """Pref rollouts on 12 toy problems (chat prompts, Math-Verify grades): 6 units of 2 prompts over a
    2-point λ grid, sampled."""
    from dami_jax.eval.problem_sets import toy_problems
    from dami_jax.generate.chat import chat_prompt
    from dami_jax.generate.sampling import Sample
    from dami_jax.pair import load_pair
    from dami_jax.pref.pipeline import math_grader
    from dami_jax.pref.rollouts import collect_rollouts
    from dami_jax.toyworld import default_pair_dirs

    pair = load_pair(*default_pair_dirs())
    problems = toy_problems(12, seed=3)
    prompts = [chat_prompt(pair.tokenizer, p.question) for p in problems]
    return collect_rollouts(pair, prompts, math_grader(pair.tokenizer, problems), path, lams=[0.0, 1.0],
                            n_samples=1, sampling=Sample(0.6, 20, 0.95), max_new_tokens=12, batch=2, seed=5,
                            progress=False)


@pytest.mark.slow
def test_two_processes_roll_out_like_one_even_after_killing_process_1(tmp_path):
    one = collect_toy_rollouts(tmp_path / "one.jsonl")
    script = tmp_path / "worker.py"
    script.write_text(f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n" + ROLLOUTS)
    path, outs = tmp_path / "two.jsonl", {0: tmp_path / "two.jsonl", 1: tmp_path / "never.jsonl"}
    procs = _launch(lambda i: [str(outs[i])], program=(str(script),))
    _wait_for_lines(procs, path, 1 + 2 * 4)  # the header and the first round: 2 units of 2 prompts x 2 λ
    _kill_process_1_then_the_job(procs)
    first = path.read_text()
    assert len(first.splitlines()) < 1 + 6 * 4, "the kill came too late to test a resume"
    _finish(_launch(lambda i: [str(outs[i])], program=(str(script),)))
    assert not outs[1].exists()
    # the same file, line for line (same units, seeds and order), the first run's lines kept as they were
    assert path.read_text() == (tmp_path / "one.jsonl").read_text() and path.read_text().startswith(first)
    assert one.tokens.min() >= 1 and 0 < one.correct.mean() < 1


@pytest.mark.slow
def test_two_processes_generate_like_one(capsys):
    """Prompts dealt one engine batch (1 row) at a time: process 0 prints every answer, in input order."""
    from dami_jax.eval.problem_sets import toy_problems

    asks = [a for p in toy_problems(3, seed=11) for a in ("--prompt", p.question)]
    cmd = ["generate", "--pair", "toy", "--policy", "pref", "--max-new-tokens", "12", "--set", "batch_size=1", *asks]
    assert main(cmd) == 0
    one = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["prompt"] for x in one] == asks[1::2]
    outs = _finish(_launch(lambda i: cmd))
    answers = [[x for x in out.splitlines() if x.startswith('{"prompt"')] for out in outs]
    assert answers == [one, []]


# train-pref as tests/test_pref.py's toy pipeline, cut down: 12 prompts in 2 rollout units of 6 (one per
# process), a 2-point grid, 6 training steps on 8 devices (one process's 8, or 2 x 4), and a final
# greedy check on 8 problems in engine batches of 4 (one per process).
PREF = ["train-pref", "--config", os.path.join(ROOT, "configs", "pref_toy.yaml"), "--no-progress",
        "prompts.limit=12", "n_samples=1", "lam_grid=[0.0, 1.0]", "pair_overrides=[max_new_tokens=8, batch_size=4]",
        "rollout_batch=6", "steps=6", "batch_size=8", "log_every=2", "eval_every=3", "checkpoint_every=3",
        "eval_prompts.limit=8", "heldout_share=0.25", "target_drop=0.0"]


@pytest.mark.slow
def test_two_processes_train_pref_like_one(tmp_path):
    one = tmp_path / "one"
    assert main([*PREF, "--out", str(one)]) == 0
    outs = {i: tmp_path / f"two{i}" for i in range(2)}  # each its own --out; --work: one directory all see
    work = tmp_path / "work"
    _finish(_launch(lambda i: [*PREF, "--out", str(outs[i]), "--work", str(work)]))
    assert not outs[1].exists()
    two = outs[0]
    # the same rollouts (so the same preferences) and the same features, exactly
    assert (work / "rollouts.jsonl").read_text() == (one / "work" / "rollouts.jsonl").read_text()
    with np.load(work / "features.npz") as a, np.load(one / "work" / "features.npz") as b:
        assert str(a["key"]) == str(b["key"]) and np.array_equal(a["feats"], b["feats"])
    # the same reward model: 8 devices either way, only the collectives' summation order may differ
    with np.load(two / "params.npz") as a, np.load(one / "params.npz") as b:
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)
    reports = [json.loads((d / "report.json").read_text()) for d in (two, one)]
    for r in reports:
        r.pop("seconds")
    assert reports[0]["rollouts"] == reports[1]["rollouts"] and reports[0]["train_pairs"] == reports[1]["train_pairs"]
    assert reports[0]["eval"] == reports[1]["eval"] and reports[0]["eval"]["n"] == 8
    assert reports[0]["beta_calibration"]["beta"] == pytest.approx(reports[1]["beta_calibration"]["beta"], rel=1e-5)
    assert [json.loads(x)["step"] for x in (two / "metrics.jsonl").read_text().splitlines()] == [
        json.loads(x)["step"] for x in (one / "metrics.jsonl").read_text().splitlines()]


def _wait_for_health(procs, url: str, timeout: int = 600) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            assert p.poll() is None, f"a server process exited:\n{p.communicate()[0][-3000:]}"
        try:
            return httpx.get(url + "/health", timeout=5).json()
        except httpx.HTTPError:
            assert time.monotonic() < deadline, f"no answer from {url} within {timeout} s"
            time.sleep(0.5)


@pytest.mark.slow
def test_two_processes_serve_like_one():
    """Process 0 serves HTTP and deals requests to both processes' engines (2 rows each); greedy answers
    and Conf's λ are what one process computes; stopping process 0 stops process 1."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import openai

    from dami_jax.eval.pairs import open_pair, toy_pair_config
    from dami_jax.eval.problem_sets import toy_problems
    from dami_jax.generate.chat import chat_prompt
    from dami_jax.pair import generate_pair
    from dami_jax.policies import build_policy

    port = _free_port()
    procs = _launch(lambda i: ["serve", "--pair", "toy", "--port", str(port), "warmup=false", "max_rows=2"])
    questions = [p.question for p in toy_problems(6, seed=5)]
    try:
        url = f"http://127.0.0.1:{port}"
        assert _wait_for_health(procs, url)["processes"] == 2
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

        def ask(question):
            return client.chat.completions.create(model="dami-conf", messages=[{"role": "user", "content": question}],
                                                  max_tokens=24, temperature=0, extra_body={"return_token_ids": True})

        with ThreadPoolExecutor(len(questions)) as pool:
            answers = list(pool.map(ask, questions))
        health = httpx.get(url + "/health", timeout=5).json()
    finally:
        procs[0].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120)[0] for p in procs]  # process 1 returns once process 0 stops
    # uvicorn ends a graceful shutdown by re-raising the signal that asked for it
    assert procs[0].returncode in (0, -signal.SIGTERM) and procs[1].returncode == 0, "\n".join(o[-3000:] for o in outs)
    assert "Application shutdown complete" in outs[0], outs[0][-3000:]
    assert health["requests_per_process"][0] >= 1 and health["requests_per_process"][1] >= 1, health
    pair = open_pair(toy_pair_config())
    conf = build_policy(answers[0].model_extra["policy"], pair)  # the served spec: conf with the toy calibration
    for question, r in zip(questions, answers):
        prompt = chat_prompt(pair.tokenizer, question)
        lam = r.model_extra["lambda"]
        assert lam == pytest.approx(float(conf([prompt], pair).lam[0]), abs=1e-6), question
        ref = generate_pair(pair, [prompt], lam, 24, max_rows=2)
        assert r.choices[0].token_ids == ref.token_lists()[0], question


SERVE_TICKS = textwrap.dedent("""
    import argparse, json
    import numpy as np
    from dami_jax import distributed
    from dami_jax.serve.engine import Engine
    parser = argparse.ArgumentParser()
    distributed.add_process_args(parser)
    distributed.init_from_args(parser.parse_args())

    class Echo:  # a worker that reports the pixel inputs it was handed
        def apply(self, work):
            return [[s["key"], s["pixels"] and {k: [v.dtype.name, v.tolist()] for k, v in s["pixels"].items()}]
                    for s in work["admit"]]

    engine = Engine.__new__(Engine)  # the dispatch alone: its exchange of ticks, no model
    engine.worker, engine.processes = Echo(), distributed.process_count()
    if distributed.process_index() == 0:
        pixels = {"pixel_values": np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6),
                  "image_grid_thw": np.array([[1, 2, 2]], np.int64)}
        reports = engine._exchange([{"cancel": [], "admit": [{"key": 0, "pixels": None}]},
                                    {"cancel": [], "admit": [{"key": 1, "pixels": pixels}]}])
        reports += engine._exchange([{"cancel": [], "admit": [{"key": 2, "pixels": None}]}] * 2)  # no images
        engine._exchange(None)
        print("REPORTS", json.dumps(reports))
    else:
        engine.follow()
""")


def test_a_served_request_with_images_reaches_process_1_value_for_value():
    """Process 0's tick admits a request with pixel arrays to process 1: they arrive beside the JSON
    (distributed.broadcast_arrays), dtype and values unchanged; a tick without images sends none."""
    outs = _finish(_launch(lambda i: [], program=("-c", SERVE_TICKS)), timeout=300)
    reports = json.loads(outs[0].split("REPORTS ", 1)[1].splitlines()[0])
    values = np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6)
    assert reports[0] == [[0, None]] and reports[2:] == [[[2, None]], [[2, None]]]
    [[key, got]] = reports[1]
    assert key == 1 and got["image_grid_thw"] == ["int64", [[1, 2, 2]]] and got["pixel_values"][0] == "float32"
    np.testing.assert_array_equal(np.asarray(got["pixel_values"][1], np.float32), values)
