"""The OpenAI-compatible server, driven by the official `openai` client over loopback.

A tiny random Instruct/Thinking pair (two independent inits, the toy world's
tokenizer and chat template) is served by uvicorn in a thread, on the paged engine
(`dj.Engine`). Greedy and seeded outputs are compared token for token with
`generate_pair` (and `generate_budget`), also when a small KV pool forces preemptions.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import threading
import time

import jax
import numpy as np
import pytest

import dami_jax as dj
from dami_jax.models import qwen3
from dami_jax.pair import generate_pair, load_pair
from mm_helpers import data_url, png_bytes, png_header_only, random_image

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

CONTEXT = 512
BUDGET = 5
# DEER on a word this random pair says often (it rarely writes a line break), with a low bar: it exits.
DEER = {"name": "deer", "trigger": "6", "inducer": "\\boxed{", "answer_end": "6", "threshold": 0.05, "probe_tokens": 4}
POOL_PAGES = 40  # usable KV pages of 16 tokens: one CONTEXT-long sequence (32) fits; four 220-token rows do not
QUESTIONS = ["3+4*7", "9-2", "1+1+1+1", "8*8-3", "2*3", "5-5+5"]
IMAGE_LIMITS = dict(max_images=2, max_image_bytes=20_000, max_image_pixels=10_000)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from dami_jax.toyworld import language as L
    from dami_jax.toyworld.tokenizer import save_tokenizer

    cfg = dj.ModelConfig(vocab_size=len(L.VOCAB), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, max_position_embeddings=CONTEXT)
    root = tmp_path_factory.mktemp("serve-pair")
    shapes = qwen3.abstract_params(cfg)
    for name, seed in (("instruct", 0), ("thinking", 1)):  # std 0.04 (not 0.02): varied, non-degenerate outputs
        rng = np.random.default_rng(seed)
        params = jax.tree.map(lambda s: rng.normal(0.0, 0.04, s.shape).astype(np.float32) if len(s.shape) > 1
                              else np.ones(s.shape, np.float32), shapes)
        dj.save_hf(cfg, params, root / name, generation_ids=dj.GenerationIds(eos=(L.EOS_ID,)))
        save_tokenizer(root / name)
    return load_pair(root / "instruct", root / "thinking")


@pytest.fixture(scope="module")
def calibration(pair, tmp_path_factory):
    from dami_jax.generate.chat import chat_prompt
    from dami_jax.policies import calibrate_conf

    path = tmp_path_factory.mktemp("cal") / "conf.json"
    calibrate_conf(pair, [chat_prompt(pair.tokenizer, q) for q in QUESTIONS]).save(path)
    return str(path)


def _kv_gb(cfg, usable_pages: int) -> float:
    """kv_gb of a pool of `usable_pages` pages of 16 tokens (float32), plus the null page."""
    page_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * 16 * cfg.head_dim * 4
    return (usable_pages + 1.5) * page_bytes / 1e9


def _engine_knobs(pair) -> dict:
    """The engine settings of every server here (four rows: more requests than rows), so one
    compile serves them all."""
    return dict(max_rows=4, page_size=16, kv_gb=_kv_gb(pair.cfg, POOL_PAGES), max_seq_len=CONTEXT)


def _sized_as_served(pair) -> dict:
    """generate_pair's / generate_budget's engine keywords for the servers' rows and pool: the
    reference then runs the programs the servers compiled (same tokens whatever the sizes)."""
    from dami_jax.serve import ServeConfig

    kw = ServeConfig(**_engine_knobs(pair)).engine_kwargs(pair.cfg)
    return dict(max_rows=kw["max_rows"], kv_bytes=kw["kv_bytes"])


@contextlib.contextmanager
def serving(app):
    """`app` on a free local port in a thread while the block runs; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 600  # startup compiles the engine's shapes (warmup): slow on a busy machine
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(pair, calibration):
    from dami_jax.serve import ServeConfig, create_app

    policies = {"dami-instruct": "static:0", "dami-static-0.8": "static:0.8", "dami-thinking": "static:1",
                "dami-conf": f"conf:{calibration}", "dami-routing": f"routing:0.5:{calibration}", "dami-pref": "pref",
                "dami-budget": f"budget:{BUDGET}", "dami-deer": DEER}
    cfg = ServeConfig(**_engine_knobs(pair), max_queue=64, policies=policies, max_body_bytes=64 << 10,
                      optional=("dami-pref",), **IMAGE_LIMITS)
    app = create_app(cfg, pair=pair)
    with serving(app) as url:
        yield app.server, url


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _ids(pair, question):
    from dami_jax.generate.chat import chat_prompt

    return chat_prompt(pair.tokenizer, question)


def _reference(pair, prompt, lam, n, **kw):
    return generate_pair(pair, [prompt], lam, n, **_sized_as_served(pair), **kw).token_lists()[0]


def _chat(client, question, lam=None, model="dami-static-0.8", extra_body=None, **kw):
    extra = {"return_token_ids": True, **({} if lam is None else {"lambda": lam}), **(extra_body or {})}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          extra_body=extra, **kw)


# ---------------------------------------------------------------------------

def test_models_list_only_loadable_policies(client):
    models = {m.id: m.policy for m in client.models.list().data}
    assert {"dami-instruct", "dami-static-0.8", "dami-thinking", "dami-conf", "dami-routing"} <= set(models)
    assert "dami-pref" not in models  # optional, and no reward model trained on this pair: skipped
    assert models["dami-static-0.8"] == "static:0.8"


@pytest.mark.parametrize("lam", [0.0, 0.35, 1.0])
def test_chat_greedy_matches_generate_pair(client, pair, lam):
    r = _chat(client, "3+4*7", lam, max_tokens=24, temperature=0, seed=5)
    choice = r.choices[0]
    ref = _reference(pair, _ids(pair, "3+4*7"), lam, 24, seed=5)
    assert choice.token_ids == ref
    assert r.model_extra["lambda"] == lam and choice.model_extra["lambda"] == lam
    assert r.usage.completion_tokens == len(ref)
    assert choice.finish_reason == ("stop" if ref[-1] in pair.stop_tokens else "length")
    text = pair.tokenizer.decode([t for t in ref if t not in pair.stop_tokens], skip_special_tokens=True)
    reasoning, content = dj.split_thinking(text)
    assert choice.message.content == content and choice.message.model_extra["reasoning_content"] == reasoning


def test_completions_sampled_n2_match_generate_pair(client, pair):
    prompt = _ids(pair, "8*8-3")
    r = client.completions.create(model="dami-thinking", prompt=prompt, max_tokens=20, n=2, temperature=0.8,
                                  top_p=0.9, seed=11, extra_body={"top_k": 12, "return_token_ids": True})
    sampling = dj.Sample(temperature=0.8, top_k=12, top_p=0.9)
    ref = generate_pair(pair, [prompt, prompt], 1.0, 20, sampling=sampling, seed=11,
                        **_sized_as_served(pair)).token_lists()
    assert [c.token_ids for c in sorted(r.choices, key=lambda c: c.index)] == ref
    assert r.model_extra["policy"] == "static:1"
    greedy = client.completions.create(model="dami-instruct", prompt="1+2=", max_tokens=6, temperature=0,
                                       extra_body={"return_token_ids": True, "ignore_eos": True}).choices[0]
    assert len(greedy.token_ids) == 6 and greedy.finish_reason == "length"
    assert greedy.text == pair.tokenizer.decode(greedy.token_ids, skip_special_tokens=True)
    stop = greedy.text[2:4]  # a stop string ends the text before its first occurrence
    assert stop, greedy.text
    cut = client.completions.create(model="dami-instruct", prompt="1+2=", max_tokens=6, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.text == greedy.text[: greedy.text.find(stop)]


def test_each_policy_serves(client, served, pair):
    for model in [m.id for m in client.models.list().data]:
        r = _chat(client, "9-2", model=model, max_tokens=4, temperature=0)
        lam = r.model_extra["lambda"]
        assert 0.0 <= lam <= 1.0, model
        policy = served[0].policies[model]  # (deer's spec names its threshold; the rest is the server's config)
        assert r.model_extra["policy"] == policy.spec
        expected = float(policy([_ids(pair, "9-2")], pair).lam[0])
        assert lam == pytest.approx(expected, abs=1e-6), model
        if model == "dami-routing":
            assert lam in (0.0, 1.0)


@pytest.mark.parametrize("max_tokens", [24, BUDGET + 1])
def test_budget_model_cuts_thinking_as_generate_budget_does(client, pair, max_tokens):
    from dami_jax.policies.budget import generate_budget, think_end_ids

    _, forced = think_end_ids(pair.tokenizer)
    for q, ignore_eos in (("3+4*7", False), ("8*8-3", False), ("9-2", True), ("2*3", True)):
        r = _chat(client, q, model="dami-budget", max_tokens=max_tokens, temperature=0,
                  extra_body={"return_token_ids": True, "ignore_eos": ignore_eos})
        ref = generate_budget(pair, [_ids(pair, q)], BUDGET, max_tokens, stop_tokens=[] if ignore_eos else None,
                              **_sized_as_served(pair))
        ids = r.choices[0].token_ids
        assert ids == ref.token_lists()[0], q
        assert r.choices[0].finish_reason == ref.finish_reasons[0]
        assert r.model_extra["lambda"] == 1.0 and r.model_extra["policy"] == f"budget:{BUDGET}"
        if ignore_eos:  # this random Thinking model does not close its thinking itself: the cut did
            assert len(ids) == max_tokens and ids[BUDGET:BUDGET + len(forced)] == forced[:max_tokens - BUDGET]


def test_deer_model_exits_as_generate_deer_does(client, pair):
    """Served `deer` streams and answers with the tokens of generate_deer (its probes forked from
    the served rows), the trigger held back until each probe decides."""
    from dami_jax.policies import build_policy
    from dami_jax.policies.deer import generate_deer

    rule = build_policy(DEER, pair).early_exit
    exits = 0
    for q in ("3+4*7", "8*8-3", "9-2"):
        ref, [probes] = generate_deer(pair, [_ids(pair, q)], 24, rule, stop_tokens=[], **_sized_as_served(pair))
        exits += any(p.exited for p in probes)
        r = _chat(client, q, model="dami-deer", max_tokens=24, temperature=0,
                  extra_body={"return_token_ids": True, "ignore_eos": True})
        assert r.choices[0].token_ids == ref.token_lists()[0], q
        assert r.model_extra["lambda"] == 1.0 and r.model_extra["policy"] == "deer:0.05"
        chunks = list(client.chat.completions.create(
            model="dami-deer", messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        assert chunks[-1].usage.completion_tokens == len(ref.token_lists()[0])  # no held-back trigger slipped out
        content = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
        reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks[:-1])
        head, tag, tail = pair.tokenizer.decode(ref.token_lists()[0], skip_special_tokens=True).partition("</think>")
        assert (reasoning, content) == ((head.strip(), tail.strip()) if tag else (head.strip(), "")), q
    assert exits, "no row exited: the test says little"


def test_serve_pair_toy_serves_every_policy_of_the_toy_pair(monkeypatch):
    """`dami serve --pair toy` with the default models: static, conf, routing, pref and budget all
    load (conf/routing on the toy pair's shipped calibration, pref on its shipped reward model,
    budget at its thinking budget), are listed, and answer with the λ their policy gives."""
    from dami_jax.cli import main
    from dami_jax.eval.pairs import expand_policy, toy_pair_config
    from dami_jax.policies import build_policy
    from dami_jax.serve.config import DEFAULT_POLICIES

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    assert main(["serve", "--pair", "toy", "--port", "8123", "max_rows=2", "warmup=false"]) == 0
    app = started["app"]
    assert started["port"] == 8123
    with serving(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        models = {m.id: m.policy for m in c.models.list().data}
        assert set(models) == set(DEFAULT_POLICIES)
        assert {spec.split(":")[0] for spec in models.values()} == {"static", "conf", "routing", "pref", "budget",
                                                                    "deer"}
        toy, pair = toy_pair_config(), app.server.pair
        assert models["dami-budget"] == f"budget:{toy.thinking_budget}"
        assert models["dami-pref"] == f"pref:{toy.pref_model}"
        assert models["dami-deer"] == f"deer:{toy.deer.threshold:g}"
        prompt = [5, 6, 7]
        for name in ("dami-conf", "dami-routing", "dami-pref", "dami-budget", "dami-deer", "dami-static-0.5"):
            policy = build_policy(expand_policy(DEFAULT_POLICIES[name], toy), pair)
            assert models[name] == policy.spec
            r = c.completions.create(model=name, prompt=prompt, max_tokens=2, temperature=0)
            assert r.model_extra["lambda"] == pytest.approx(float(policy([prompt], pair).lam[0]), abs=1e-6), name


def test_a_model_that_cannot_load_stops_startup_unless_optional(pair, caplog):
    import logging

    from dami_jax.config import ConfigError
    from dami_jax.serve import ServeConfig, Server

    policies = {"m": "static:0.5", "broken": "conf:/no/such/calibration.json"}
    cfg = dict(max_rows=2, max_seq_len=CONTEXT, warmup=False, policies=policies)
    with pytest.raises(ConfigError, match=r"model 'broken' .*no Conf calibration at /no/such.*optional"):
        Server(ServeConfig(**cfg), pair)
    with caplog.at_level(logging.WARNING, logger="dami_jax.serve"):
        server = Server(ServeConfig(**cfg, optional=("broken",)), pair)
    assert list(server.policies) == ["m"]
    assert "optional model broken (policy 'conf:/no/such/calibration.json') is not served" in caplog.text
    with pytest.raises(ConfigError, match="optional names .'typo'. are not in policies"):
        ServeConfig(**cfg, optional=("typo",))


@pytest.mark.parametrize("lam", [0.2, 0.9])
def test_stream_adds_up_to_the_whole_response(client, served, pair, lam):
    kw = dict(max_tokens=30, temperature=0, seed=2)
    whole = _chat(client, "2*3", lam, **kw).choices[0]
    stream = client.chat.completions.create(
        model="dami-static-0.8", messages=[{"role": "user", "content": "2*3"}], stream=True,
        stream_options={"include_usage": True}, extra_body={"lambda": lam}, **kw)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(whole.token_ids)
    assert chunks[-2].choices[0].finish_reason == whole.finish_reason
    assert all(c.model_extra["lambda"] == lam for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks[:-1])
    # The streaming rule: λ >= reasoning_lambda (0.5) streams reasoning up to the first `</think>`.
    text = pair.tokenizer.decode([t for t in whole.token_ids if t not in pair.stop_tokens], skip_special_tokens=True)
    head, tag, tail = text.partition("</think>")
    expected = ("", text.strip()) if lam < 0.5 else (head.strip(), tail.strip()) if tag else (text.strip(), "")
    assert (reasoning, content) == expected
    if lam >= 0.5 and text.count("</think>") == 1:  # then it is split_thinking's answer
        assert (reasoning, content) == (whole.message.model_extra["reasoning_content"], whole.message.content)
    raw = httpx.post(served[1] + "/v1/completions", json={"prompt": "1+", "max_tokens": 3, "stream": True})
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_sixteen_concurrent_requests_match_alone(client):
    jobs = [(QUESTIONS[i % len(QUESTIONS)], round(i / 15, 3), 7 + i) for i in range(16)]

    def ask(job):
        q, lam, seed = job
        return _chat(client, q, lam, max_tokens=16, temperature=0.7 if seed % 2 else 0, seed=seed).choices[0].token_ids

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, jobs))
    alone = [ask(j) for j in jobs]
    assert together == alone
    assert len({tuple(t) for t in together}) > 4  # the λ mix really gives different outputs


def test_rows_out_of_pages_are_preempted_and_keep_their_tokens(client, served):
    """Four rows of ~220 tokens need more than the pool's 40 pages: the youngest rows are preempted
    and recomputed (the server's mode), and every choice still gets the tokens it gets alone."""
    server, _ = served
    jobs = [(QUESTIONS[i], round(i / 5, 3), 3 + i) for i in range(6)]

    def ask(job):
        q, lam, seed = job
        return _chat(client, q, lam, max_tokens=200, temperature=0.7 if seed % 2 else 0, seed=seed,
                     extra_body={"ignore_eos": True}).choices[0].token_ids

    def preemptions():
        return server.metrics.registry.get_sample_value("dami_preemptions_total")

    before = preemptions()
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(ask, jobs))
    after = preemptions()
    assert after > before
    alone = [ask(j) for j in jobs]
    assert preemptions() == after  # one row alone fits the pool
    assert together == alone and all(len(t) == 200 for t in together)


def test_a_pool_without_room_for_one_sequence_is_refused(pair):
    from dami_jax.config import ConfigError
    from dami_jax.serve import ServeConfig, Server

    cfg = ServeConfig(max_seq_len=64, kv_gb=_kv_gb(pair.cfg, 3), policies={"m": "static:0.5"}, warmup=False)
    with pytest.raises(ConfigError, match=r"3 usable pages of 16 tokens .* cannot hold one sequence of "
                                          r"max_seq_len = 64 tokens \(4 pages\): raise kv_gb or lower max_seq_len"):
        Server(cfg, pair)


def test_disconnect_mid_stream_frees_the_rows(served):
    server, url = served
    before = server.metrics.registry.get_sample_value("dami_completion_tokens_total")
    body = {"model": "dami-thinking", "messages": [{"role": "user", "content": "1+1"}], "max_tokens": 480,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert [next(lines) for _ in range(6)]  # a few tokens arrived; then the client goes away
    _wait_idle(url)
    assert server.metrics.registry.get_sample_value("dami_completion_tokens_total") - before < 480
    assert httpx.get(url + "/health").json()["pages_free"] == server.engine.worker.engine.sched.alloc.num_usable


def _wait_idle(url, seconds=20):
    deadline = time.time() + seconds
    while httpx.get(url + "/health").json()["active"]:
        assert time.time() < deadline, "the rows were not freed"
        time.sleep(0.05)


def test_client_gone_before_a_whole_response_frees_the_rows(served):
    server, url = served
    before = server.metrics.registry.get_sample_value("dami_completion_tokens_total")
    body = {"model": "dami-thinking", "messages": [{"role": "user", "content": "1+1"}], "max_tokens": 480,
            "temperature": 0, "ignore_eos": True}
    # The client gives up long before 480 tokens can exist (a whole response arrives at once).
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.05))
    _wait_idle(url)
    assert server.metrics.registry.get_sample_value("dami_completion_tokens_total") - before < 480


def test_request_timeout(pair):
    from dami_jax.serve import ServeConfig, create_app

    cfg = ServeConfig(**_engine_knobs(pair), request_timeout_s=0.1, policies={"m": "static:0.5"})
    with serving(create_app(cfg, pair=pair)) as url:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 480, "ignore_eos": True}
        r = httpx.post(url + "/v1/chat/completions", json=body)
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": True})
        events = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert '"timeout"' in events[-2] and events[-1] == "data: [DONE]"
        _wait_idle(url)


BAD = [  # (name, body or raw bytes, status, param, words in the message)
    ("bad json", b'{"model": "dami-instruct", "messages": [', 400, None, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, None, "JSON object"),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "does not exist"),
    ("lambda out of range", {"messages": [{"role": "user", "content": "hi"}], "lambda": 1.5}, 400, "lambda", "[0, 1]"),
    ("lambda NaN", b'{"messages": [{"role": "user", "content": "hi"}], "lambda": NaN}', 400, "lambda", "nan"),
    ("negative max_tokens", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "max_tokens", ">= 1"),
    ("prompt too long", {"messages": [{"role": "user", "content": "1" * 600}]}, 400, "messages", "context"),
    ("max_tokens past context", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 600}, 400, "max_tokens", "context"),
    ("n too large", {"messages": [{"role": "user", "content": "hi"}], "n": 50}, 400, "n", "n must be"),
    ("wrong type", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 422, "temperature", "number"),
    ("missing messages", {"model": "dami-instruct"}, 422, "messages", "required"),
    ("empty messages", {"messages": []}, 422, "messages", "at least 1"),
    ("bad role", {"messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages.0.role", "user"),
    ("body too large", {"messages": [{"role": "user", "content": "x" * (80 << 10)}]}, 413, None, "exceeds"),
]


@pytest.mark.parametrize("name,body,status,param,words", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_openai_error_and_server_keeps_serving(served, name, body, status, param, words):
    url = served[1]
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(url + "/v1/chat/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and words in err["message"], err
    assert err["param"] == param
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        _chat(client, "hi", model="nope")
    with pytest.raises(openai.BadRequestError, match="lambda"):
        _chat(client, "hi", lam=-0.1)


def test_api_key_and_full_queue(pair):
    from dami_jax.serve import ServeConfig, create_app

    cfg = ServeConfig(**_engine_knobs(pair), max_queue=0, api_key="s3cret", policies={"m": "static:0.5"})
    with serving(create_app(cfg, pair=pair)) as url:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/health").status_code == 200  # liveness needs no key
        c = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["m"]
        with pytest.raises(openai.RateLimitError) as e:  # max_queue=0: every request is refused
            c.chat.completions.create(**body)
        assert e.value.response.headers["retry-after"] == "1"


def test_refuses_public_bind_without_key(capsys):
    from dami_jax.config import ConfigError
    from dami_jax.serve import ServeConfig, main

    with pytest.raises(ConfigError, match="API key"):
        ServeConfig(host="0.0.0.0").check_bind()
    ServeConfig(host="0.0.0.0", api_key="k").check_bind()
    with pytest.raises(SystemExit) as exit_:
        main(["--host", "0.0.0.0"])
    assert exit_.value.code == 2
    assert "API key" in capsys.readouterr().err


def test_metrics_expose_the_serving_figures(client, served):
    _chat(client, "1+1", 0.25, max_tokens=3, temperature=0)
    text = httpx.get(served[1] + "/metrics").text
    for name in ("dami_requests_total", "dami_completion_tokens_total", "dami_lambda_bucket", "dami_queue_depth",
                 "dami_time_to_first_token_seconds_bucket", "dami_batch_occupancy_bucket", "dami_kv_pages_free",
                 "dami_preemptions_total"):
        assert name in text, name
    assert 'dami_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


def test_stream_text_splits_like_split_thinking(pair):
    from dami_jax.serve.text import ChoiceText
    from dami_jax.toyworld import language as L

    tok = pair.tokenizer
    ids = [L.TOKEN_ID[t] for t in ["\n", "1", "+", "2", "\n", "\n", L.THINK_END, "\n", "\n", L.BOX_OPEN, "3", "}"]]
    for think_first in (True, False):
        text = ChoiceText(tok, think_first=think_first)
        parts = [text.deltas() for t in ids if not text.add(t)] + [text.deltas(final=True)]
        got = ("".join(p[0] for p in parts) or None, "".join(p[1] for p in parts))
        whole = dj.split_thinking(tok.decode(ids))
        assert got == whole if think_first else got[1].endswith(whole[1])
    stop = ChoiceText(tok, stops=["+2"], split=False)
    assert [stop.add(t) for t in ids[:4]] == [False, False, False, True] and stop.text == "\n1"


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_incremental_detokenization_equals_full_decode(kind):
    """The streamed text after each token equals decoding all ids so far (whenever that decode is
    not waiting on a partial UTF-8 character): real multi-byte text and random id sequences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from dami_jax.serve.text import ChoiceText

    corpus = ["naïve café, 中文测试 🙂 über straße", "the quick brown fox: 12+30=42", "ça va? ☃ — fin"] * 20
    if kind == "byte_level":  # Qwen's scheme: bytes as symbols, a character may span tokens
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:  # SentencePiece's scheme: the decoder strips the leading space of the first token
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<eos>", "<unk>"])
    tok.train_from_iterator(corpus, trainer)
    eos = tok.token_to_id("<eos>")
    rng = np.random.default_rng(0)
    sequences = [tok.encode(s).ids for s in ("über 中文 🙂 café", " twelve  spaces\n and ☃")]
    sequences += [rng.integers(0, tok.get_vocab_size(), 40).tolist() for _ in range(10)]
    sequences[-1][5] = eos  # a special token inside the text decodes to nothing
    checked, total = 0, sum(map(len, sequences))
    for ids in sequences:
        text = ChoiceText(tok)
        for i, t in enumerate(ids):
            text.add(t)
            full = tok.decode(ids[: i + 1], skip_special_tokens=True)
            if not full.endswith("\ufffd"):
                assert text.text == full, (ids[: i + 1], text.text, full)
                checked += 1
    assert checked >= total // 2  # not vacuous: most prefixes end on a whole character


# --- images (OpenAI image_url parts) ---------------------------------------------------------------

def _image_message(*urls, text="what is in the picture?"):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


def test_an_image_request_on_a_text_only_pair_is_refused_with_400(client, served):
    with pytest.raises(openai.BadRequestError, match="no vision tower") as e:
        client.chat.completions.create(model="dami-instruct", messages=_image_message(data_url(random_image(16, 16))))
    assert e.value.status_code == 400 and e.value.body["code"] == "vision_not_supported"
    assert _chat(client, "9-2", max_tokens=2, temperature=0).choices[0].finish_reason  # still serving
    text_parts = [{"role": "user", "content": [{"type": "text", "text": "9-"}, {"type": "text", "text": "2"}]}]
    r = client.chat.completions.create(model="dami-instruct", messages=text_parts, max_tokens=3, temperature=0,
                                       extra_body={"return_token_ids": True})
    alone = _chat(client, "9-2", model="dami-instruct", max_tokens=3, temperature=0)
    assert r.choices[0].token_ids == alone.choices[0].token_ids  # text parts join into one string


_SMALL = data_url(random_image(8, 8))
BAD_IMAGES = [  # (name, image URLs, words in the message)
    ("not base64", ["data:image/png;base64,@@@@"], "not valid base64"),
    ("not an image", [data_url(b"these bytes are no image")], "not a readable image"),
    ("truncated", [data_url(png_bytes(random_image(40, 40))[:200])], "not a readable image"),
    ("too many bytes", [data_url(random_image(90, 90))], "the limit is 20000 bytes"),
    ("too many pixels", [data_url(random_image(101, 100).convert("1"))], "the limit is 10000 pixels"),
    ("bomb", [data_url(png_header_only(5000, 5000))], "25000000 pixels; the limit is 10000 pixels"),
    ("pil bomb guard", [data_url(png_header_only(100_000, 100_000))], "decompression bomb"),
    ("remote url", ["https://example.com/cat.png"], "does not fetch image URLs"),
    ("other scheme", ["file:///etc/passwd"], "scheme 'file' is not supported"),
    ("too many images", [_SMALL] * 3, "3 images in the request; this server takes at most 2"),
]


@pytest.mark.parametrize("name, urls, words", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_bad_images_get_400_and_the_server_stays_up(client, served, name, urls, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="dami-instruct", messages=_image_message(*urls), max_tokens=2)
    assert e.value.status_code == 400 and words in e.value.body["message"], e.value.body
    assert e.value.body["param"] == "messages" and e.value.body["code"] in ("invalid_image", "too_many_images")
    assert httpx.get(served[1] + "/health").json()["status"] == "ok"


def test_an_unknown_content_part_is_a_422(served):
    body = {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": ""}}]}]}
    r = httpx.post(served[1] + "/v1/chat/completions", json=body)
    assert r.status_code == 422 and "messages.0.content" in r.json()["error"]["param"]


@pytest.fixture(scope="module")
def image_host():
    """A local HTTP server: /ok.png (a small PNG), /big.png (over the byte limit), /slow.png
    (answers after 2 s), /away (redirects to an ftp: URL, which urllib itself would follow)."""
    import http.server

    ok, big = png_bytes(random_image(8, 8)), png_bytes(random_image(120, 120))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/away":
                self.send_response(302)
                self.send_header("Location", "ftp://127.0.0.1/x.png")
                self.end_headers()
                return
            if self.path == "/slow.png":
                time.sleep(2)
            data = big if self.path == "/big.png" else ok
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.handle_error = lambda request, address: None  # the client that timed out closed its socket
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_remote_images_are_fetched_only_when_enabled(image_host):
    from dami_jax.serve import ServeConfig
    from dami_jax.serve.images import request_images
    from dami_jax.serve.schemas import ApiError, ChatRequest

    def fetched(path, **cfg):
        body = ChatRequest.model_validate({"messages": _image_message(image_host + path)})
        return request_images(body, ServeConfig(**IMAGE_LIMITS, **cfg))

    with pytest.raises(ApiError, match="does not fetch image URLs"):
        fetched("/ok.png")
    on = dict(fetch_images=True, fetch_timeout_s=0.5)
    images = fetched("/ok.png", **on)
    assert len(images) == 1 and images[0].size == (8, 8) and images[0].mode == "RGB"
    for path, words in (("/big.png", "bytes; the limit is 20000 bytes"), ("/slow.png", "timed out after 0.5 s"),
                        ("/away", r"only http\(s\) is followed")):
        with pytest.raises(ApiError, match=words) as e:
            fetched(path, **on)
        assert e.value.status == 400 and e.value.code == "invalid_image"
    body = ChatRequest.model_validate({"messages": _image_message("http://127.0.0.1:1/x.png")})  # nobody listens
    with pytest.raises(ApiError, match="could not be fetched"):
        request_images(body, ServeConfig(**IMAGE_LIMITS, **on))


def test_image_limits_in_the_config():
    from dami_jax.config import ConfigError
    from dami_jax.serve import ServeConfig

    cfg = ServeConfig()
    assert (cfg.max_images, cfg.fetch_images) == (4, False)
    limits = ServeConfig(max_image_bytes=5000, max_image_pixels=100).image_limits()
    assert (limits.max_bytes, limits.max_pixels) == (5000, 100)
    with pytest.raises(ConfigError, match="fetch_timeout_s must be > 0"):
        ServeConfig(fetch_timeout_s=0)

