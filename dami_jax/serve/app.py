"""The ASGI app: routes, API key and body-size guard, OpenAI-shaped errors, engine lifecycle.

    app = create_app(load_serve_config(), pair_cfg=load_pair_config("configs/pair_qwen3_4b_2507.yaml"))
    uvicorn.run(app, host=cfg.host, port=cfg.port)
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from dami_jax import distributed
from dami_jax.config import ConfigError
from dami_jax.eval.pairs import MissingPairFile, PairConfig, check_policy, open_pair, toy_pair_config
from dami_jax.policies.base import build_policy
from dami_jax.serve import api
from dami_jax.serve.config import ServeConfig
from dami_jax.serve.engine import Engine
from dami_jax.serve.images import request_images
from dami_jax.serve.metrics import Metrics
from dami_jax.serve.schemas import ApiError, ChatRequest, CompletionRequest, error_body, parse_body

log = logging.getLogger("dami_jax.serve")
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


class Server:
    """Everything a request needs: config, pair, tokenizer, loaded policies, engine, metrics."""

    def __init__(self, cfg: ServeConfig, pair=None, pair_cfg: PairConfig | None = None, processor=None):
        """pair_cfg: the pair (models, dtype, mesh, tokenizer) and the artifacts plain `conf`, `routing`,
        `pref` and `budget` use (default: the shipped toy pair, with its calibration and reward model).
        pair: that pair already loaded; given alone, policies are built from their specs as they are.
        Every policy spec is checked before the pair loads. processor: a Qwen3-VL pair's (transformers'
        AutoProcessor), which lays out image prompts; default: loaded from where pair_cfg's tokenizer is."""
        self.cfg = cfg
        if pair is None and pair_cfg is None:
            pair_cfg = toy_pair_config()
        specs = self._servable(cfg.policies, lambda spec: self._check(spec, pair_cfg))
        if pair is None:
            pair = open_pair(pair_cfg)
        if pair.tokenizer is None:
            raise ConfigError("the server needs a tokenizer with a chat template (load_pair(..., tokenizer=...))")
        self.pair, self.tokenizer = pair, pair.tokenizer
        self.processor = processor if processor is not None else _vision_processor(pair, pair_cfg)
        self.processor_lock = threading.Lock()  # its tokenizer keeps padding settings between calls
        self.metrics = Metrics()
        self.policies = self._servable(specs, self._load)
        self.engine = Engine(pair, cfg.max_queue, self.metrics, self.policies.values(), **cfg.engine_kwargs(pair.cfg))
        self.default_model = cfg.default_model
        if self.default_model not in self.policies:
            self.default_model = next(iter(self.policies))
            log.warning("default_model %r is not served; requests naming no model get %r",
                        cfg.default_model, self.default_model)

    @staticmethod
    def _check(spec, pair_cfg):
        """The spec to serve, checked without the pair (expanded to the pair config's artifacts)."""
        if pair_cfg is None:
            build_policy(spec)
            return spec
        return check_policy(spec, pair_cfg)

    def _load(self, spec):
        policy = build_policy(spec, self.pair)
        if self.cfg.warmup:  # compile its scoring now, not on the first request
            policy([[0] * 8], self.pair)
        return policy

    def _servable(self, specs: dict, make) -> dict:
        """name -> make(spec); a failure stops startup unless `optional` lists the name (it is skipped)."""
        out = {}
        for name, spec in specs.items():
            try:
                out[name] = make(spec)
            except MissingPairFile:  # the pair config names a file that is not there: a typo, never optional
                raise
            except Exception as e:  # not servable here: no calibration, no trained model, another pair's, ...
                if name not in self.cfg.optional:
                    raise ConfigError(f"model {name!r} (policy {spec!r}) cannot be served: {e}. Fix it, remove "
                                      f"it from `policies`, or list it in `optional` to skip it") from e
                log.warning("optional model %s (policy %r) is not served: %s", name, spec, e)
        if not out:
            raise ConfigError(f"no policy of {sorted(self.cfg.policies)} loads; nothing to serve")
        return out

    def start(self) -> None:
        if self.cfg.warmup:
            self.engine.warmup()
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()  # the other processes stop following
        distributed.shutdown()  # uvicorn ends by re-raising its signal: leave them before that

    def follow(self) -> None:
        """Every process but 0: step this process's engine with process 0's until it stops."""
        if self.cfg.warmup:
            self.engine.warmup()
        self.engine.follow()


def _vision_processor(pair, pair_cfg: PairConfig | None):
    """A Qwen3-VL pair's processor, from the directory its tokenizer comes from; None for a text pair."""
    if getattr(pair.cfg, "vl", None) is None:
        return None
    if pair_cfg is None:
        raise ConfigError("a Qwen3-VL pair lays out image prompts with its processor: pass processor= "
                          "(dami_jax.multimodal.load_processor(checkpoint)) or pair_cfg")
    from dami_jax.checkpoint.hf import resolve_model_dir
    from dami_jax.multimodal import load_processor

    source = {"instruct": pair_cfg.instruct, "thinking": pair_cfg.thinking}.get(pair_cfg.tokenizer, pair_cfg.tokenizer)
    return load_processor(resolve_model_dir(source))


class Guard:
    """Pure ASGI middleware: metrics per route, Bearer key, body size limit (read before the app runs)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        started, status = time.perf_counter(), [500]
        metrics, cfg = self.server.metrics, self.server.cfg

        async def send_counted(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            elif msg["type"] == "http.response.body" and not msg.get("more_body"):
                metrics.request(route, status[0], started)
            await send(msg)

        headers = dict(scope["headers"])
        if cfg.api_key and route != "/health":
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(auth.encode(), f"Bearer {cfg.api_key}".encode()):
                return await _json(send_counted, 401, error_body(
                    "invalid or missing API key (send Authorization: Bearer KEY)", "authentication_error",
                    code="invalid_api_key"))
        limit = cfg.max_body_bytes
        too_big = error_body(f"request body exceeds {limit} bytes", "invalid_request_error", code="body_too_large")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _json(send_counted, 413, too_big)
        body, more = b"", scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > limit:
                return await _json(send_counted, 413, too_big)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send_counted)


async def _json(send, status: int, payload: dict, headers=()) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


async def _watch_disconnect(request: Request, flow) -> None:
    """A non-streamed request's client went away: free its rows."""
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            flow.client_gone()
            return


def create_app(cfg: ServeConfig, pair=None, server: Server | None = None,
               pair_cfg: PairConfig | None = None, processor=None) -> "Guard":
    """The ASGI app (a Guard around FastAPI); `.server` holds the engine, policies and metrics.
    pair_cfg, pair, processor: as `Server` takes them (neither pair: the shipped toy pair)."""
    server = server or Server(cfg, pair, pair_cfg, processor)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(server.start)
        yield
        await asyncio.to_thread(server.stop)

    app = FastAPI(title="dami_jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", code=str(e.status_code)),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    async def generate(request: Request, schema, chat: bool):
        body = parse_body(schema, await request.body(), server.cfg.max_n, server.engine.max_rows)
        images = await asyncio.to_thread(request_images, body, server.cfg) if chat and body.image_urls() else []
        if chat:
            if images:  # the processor works on them off the event loop
                prompt, pixels = await asyncio.to_thread(api.chat_prompt_inputs, server, body, images)
            else:
                prompt, pixels = api.chat_prompt_inputs(server, body)
            flow = api.Flow(server, body, [prompt], chat, pixels)
        else:
            flow = api.Flow(server, body, api.completion_prompt_ids(server, body), chat)
        flow.submit()
        timeout = server.cfg.request_timeout_s
        if body.stream:
            return StreamingResponse(flow.stream(timeout), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(_watch_disconnect(request, flow))
        try:
            return await flow.collect(timeout)
        except api.ClientGone:
            return Response(status_code=499)  # nobody reads it
        except asyncio.TimeoutError:
            raise ApiError(504, f"request timed out after {timeout:g} s", type="timeout", code="timeout") from None
        finally:
            watcher.cancel()
            flow.cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, ChatRequest, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, CompletionRequest, chat=False)

    @app.get("/v1/models")
    async def models():
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "dami_jax", "policy": p.spec}
                for name, p in server.policies.items()]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        e = server.engine
        return {"status": "ok", "processes": e.processes, "requests_per_process": e.requests_per_process,
                "max_rows": e.max_rows, "active": e.active(), "queue": e.queue_depth(), "pages_free": e.pages_free()}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    return Guard(app, server)
