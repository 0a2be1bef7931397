"""The request flow: body -> prompt ids and λ source -> engine -> OpenAI response or SSE stream."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid

from dami_jax.generate.chat import chat_prompt
from dami_jax.serve.request import GenRequest, QueueFull
from dami_jax.serve.schemas import ApiError, ChatRequest, CompletionRequest, TextPart, _Common, error_body
from dami_jax.serve.text import ChoiceText

log = logging.getLogger("dami_jax.serve")


class ClientGone(Exception):
    """The client of a non-streamed request disconnected."""


class Flow:
    """One HTTP request: its GenRequests (one per prompt) and the text of each choice."""

    def __init__(self, server, body: _Common, prompts: list[list[int]], chat: bool, pixel_inputs: dict | None = None):
        """pixel_inputs: a chat prompt's images (transformers' keywords), from `chat_prompt_inputs`."""
        self.server, self.body, self.chat, self.n = server, body, chat, body.n
        self.pixel_inputs = pixel_inputs
        self.name = body.model or server.default_model
        if self.name not in server.policies:
            raise ApiError(404, f"The model {self.name!r} does not exist; available: {sorted(server.policies)}",
                           "model", code="model_not_found")
        self.policy = server.policies[self.name]
        limit = body.max_completion_tokens if chat and body.max_completion_tokens is not None else body.max_tokens
        _check_room(prompts, limit, server.engine.context, "messages" if chat else "prompt")
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seed = random.getrandbits(31) if body.seed is None else body.seed  # one for all prompts
        self.reqs = [self._request(i, p, limit) for i, p in enumerate(prompts)]
        self.texts = [ChoiceText(server.tokenizer, server.pair.stop_tokens, body.stop_list(), split=chat)
                      for _ in range(len(prompts) * body.n)]
        self.finish: dict[int, str] = {}
        self.ids: list[list[int]] = [[] for _ in self.texts]
        self.sent_ids = [0] * len(self.texts)  # streamed with return_token_ids
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _request(self, i: int, prompt: list[int], limit: int | None) -> GenRequest:
        cfg, body, size = self.server.cfg, self.body, self.server.engine.context
        if limit is None:  # OpenAI's default for completions; chat fills the context
            limit = min(16 if not self.chat else cfg.default_max_tokens or size, size - len(prompt))
        temp = cfg.temperature if body.temperature is None else body.temperature
        greedy = temp <= 0
        return GenRequest(
            prompt=prompt, max_tokens=limit,
            n=body.n, temperature=temp, seed=self.seed, row_base=i * body.n,
            top_k=0 if greedy else (cfg.top_k if body.top_k is None else max(body.top_k, 0)),
            top_p=1.0 if greedy else (cfg.top_p if body.top_p is None else body.top_p),
            lam=body.lam, policy=None if body.lam is not None else self.policy,
            thinking_budget=None if body.lam is not None else getattr(self.policy, "thinking_budget", None),
            stop_ids=() if body.ignore_eos else tuple(self.server.pair.stop_tokens), pixel_inputs=self.pixel_inputs,
            loop=asyncio.get_running_loop(), events=self.queue)

    def submit(self) -> None:
        try:
            self.server.engine.submit(self.reqs)
        except QueueFull as e:
            self.server.metrics.reject("queue_full")
            raise ApiError(429, f"server busy: {e}; retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.server.cfg.retry_after_s)}) from None

    def cancel(self) -> None:
        for r in self.reqs:
            r.cancel()

    def client_gone(self) -> None:
        """Free the rows and end the wait for tokens that will not come."""
        self.cancel()
        self.queue.put_nowait([("gone",)])

    def lam_of(self, index: int) -> float | None:
        return self.reqs[index // self.n].lam_used

    async def events(self, timeout_s: float):
        """Per batch of engine events (all that are waiting: a slow reader gets fewer, bigger
        chunks), {choice index: finish reason or None} of the choices that moved, until all ended.

        asyncio.TimeoutError when the whole request takes longer than `timeout_s`.
        """
        end = time.monotonic() + timeout_s
        while len(self.finish) < len(self.texts):
            batches = [await asyncio.wait_for(self.queue.get(), max(end - time.monotonic(), 0.0))]
            while not self.queue.empty():
                batches.append(self.queue.get_nowait())
            moved: dict[int, str | None] = {}
            for ev in (ev for batch in batches for ev in batch):
                if ev[0] == "gone":
                    raise ClientGone()
                if ev[0] == "error":
                    raise ApiError(500, ev[1], type="server_error", code="engine_error")
                idx = ev[1]
                if idx in self.finish:
                    continue
                if ev[0] == "finish":
                    self.finish[idx] = moved[idx] = ev[2]
                    continue
                moved[idx] = None
                self._token(idx, ev[2])
            yield moved

    def _token(self, idx: int, token: int) -> None:
        text = self.texts[idx]
        if not self.ids[idx]:  # λ is known now: decide how this choice streams
            text.think_first = self.chat and self.lam_of(idx) >= self.server.cfg.reasoning_lambda
        self.ids[idx].append(token)
        if text.add(token):  # a stop string: end this choice here
            self.reqs[idx // self.n].cancel(idx)
            self.finish[idx] = "stop"

    def usage(self) -> dict:
        prompt = sum(len(r.prompt) for r in self.reqs)
        done = sum(map(len, self.ids))
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def header(self) -> dict:
        lams = [r.lam_used for r in self.reqs]
        spec = "explicit" if self.body.lam is not None else self.policy.spec
        return {"id": self.id, "created": self.created, "model": self.name,
                "lambda": lams[0] if len(lams) == 1 else lams, "policy": spec}

    # -- whole response --------------------------------------------------------
    async def collect(self, timeout_s: float) -> dict:
        async for _ in self.events(timeout_s):
            pass
        choices = []
        for i, t in enumerate(self.texts):
            base = {"index": i, "finish_reason": self.finish[i], "lambda": self.lam_of(i)}
            if self.body.return_token_ids:
                base["token_ids"] = self.ids[i]
            if self.chat:
                reasoning, content = t.result()
                msg = {"role": "assistant", "content": content, "reasoning_content": reasoning,
                       "reasoning": reasoning}
                choices.append({**base, "message": msg, "logprobs": None})
            else:
                choices.append({**base, "text": t.result()[1], "logprobs": None})
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.header(), "object": kind, "choices": choices, "usage": self.usage()}

    # -- stream ------------------------------------------------------------------
    def _chunk(self, choices: list, usage=None) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        body = {**self.header(), "object": kind, "choices": choices}
        if self.body.stream_options and self.body.stream_options.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def _delta(self, idx: int, final: bool, reason=None) -> dict | None:
        reasoning, content = self.texts[idx].deltas(final)
        ids = []
        if self.body.return_token_ids:  # the ids not yet sent
            ids = self.ids[idx][self.sent_ids[idx]:]
            self.sent_ids[idx] = len(self.ids[idx])
        if not (reasoning or content or reason or ids):
            return None
        if not self.chat:
            out = {"index": idx, "text": content, "finish_reason": reason, "logprobs": None}
        else:
            delta = {"content": content} if content else {}
            if reasoning:
                delta.update(reasoning_content=reasoning, reasoning=reasoning)
            out = {"index": idx, "delta": delta, "finish_reason": reason, "logprobs": None}
        if ids:
            out["token_ids"] = ids
        return out

    async def stream(self, timeout_s: float):
        """SSE events, written once per batch of engine events (each write costs the server a
        send); the request is cancelled when the client goes away (the generator closes)."""
        started, end = set(), ""
        try:
            async for moved in self.events(timeout_s):
                parts = []
                for idx in moved:
                    reason = self.finish.get(idx)
                    if self.chat and idx not in started:
                        started.add(idx)
                        role = {"index": idx, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None, "logprobs": None}
                        parts.append(self._chunk([role]))
                    choice = self._delta(idx, final=reason is not None, reason=reason)
                    if choice is not None:
                        parts.append(self._chunk([choice]))
                if parts:
                    yield "".join(parts)
            if self.body.stream_options and self.body.stream_options.include_usage:
                end = self._chunk([], self.usage())
        except asyncio.TimeoutError:
            msg = error_body(f"request timed out after {timeout_s:g} s", "timeout", code="timeout")
            end = f"data: {json.dumps(msg)}\n\n"
        except ApiError as e:
            end = f"data: {json.dumps(e.body())}\n\n"
        finally:
            self.cancel()
        yield end + "data: [DONE]\n\n"


def chat_prompt_inputs(server, body: ChatRequest, images: list = ()) -> tuple[list[int], dict | None]:
    """The prompt's token ids and pixel inputs (None without images); `images`: the request's
    decoded images (serve.images.request_images), in the order of its image parts."""
    if images:
        return _vision_prompt_inputs(server, body, images)
    messages = [{"role": _role(m), "content": m.text()} for m in body.messages]
    try:
        return chat_prompt(server.tokenizer, messages), None
    except Exception as e:  # the template refused the conversation
        raise ApiError(400, f"messages: the chat template failed: {e}", "messages") from None


def _role(message) -> str:
    return "system" if message.role == "developer" else message.role


def _vision_prompt_inputs(server, body: ChatRequest, images: list) -> tuple[list[int], dict]:
    """transformers' processor of the pair lays out the prompt (its chat template's vision tokens,
    one placeholder per merged patch) and makes the pixel inputs."""
    from dami_jax.multimodal import encode_chats, prompt_ids, vision_kwargs

    if getattr(server.pair.cfg, "vl", None) is None:  # ModelConfig.vl: the vision config of a Qwen3-VL pair
        raise ApiError(400, "this server's model pair has no vision tower: image_url parts need a vision-language "
                       "pair (Qwen3-VL); send text only", "messages", code="vision_not_supported")
    left = iter(images)
    messages = [{"role": _role(m), "content": m.content if isinstance(m.content, str) else [
        {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image", "image": next(left)}
        for p in m.content or ()]} for m in body.messages]
    try:
        with server.processor_lock:
            features = encode_chats(server.processor, [messages], server.cfg.image_limits())
    except Exception as e:  # the template or the processor refused the conversation or an image
        raise ApiError(400, f"messages: the processor failed: {e}", "messages", code="invalid_image") from None
    return prompt_ids(features)[0], vision_kwargs(features)


def completion_prompt_ids(server, body: CompletionRequest) -> list[list[int]]:
    if body.echo:
        raise ApiError(400, "echo is not supported by this server", "echo")
    p = body.prompt
    if isinstance(p, str) or (p and isinstance(p[0], str)):
        texts = [p] if isinstance(p, str) else p
        return [server.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    ids = [p] if (not p or isinstance(p[0], int)) else p
    vocab = server.pair.cfg.vocab_size
    if any(not 0 <= t < vocab for row in ids for t in row):
        raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
    return ids


def _check_room(prompts: list[list[int]], limit: int | None, size: int, param: str) -> None:
    """400 when a prompt is empty, leaves no room in the context, or leaves less than max_tokens."""
    for p in prompts:
        if not p:
            raise ApiError(400, "the prompt is empty", param)
        if len(p) >= size:
            raise ApiError(400, f"prompt of {len(p)} tokens does not fit the context of {size} tokens "
                           "with room to generate", param, code="context_length_exceeded")
        if limit is not None and len(p) + limit > size:
            raise ApiError(400, f"this server's context is {size} tokens, but {len(p)} prompt tokens + "
                           f"max_tokens={limit} ask for {len(p) + limit}", "max_tokens", code="context_length_exceeded")
