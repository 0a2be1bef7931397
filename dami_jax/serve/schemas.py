"""Request bodies of the OpenAI API subset we serve, and errors in OpenAI's shape.

Types are strict (a string is not a number); unknown fields are ignored as
OpenAI-compatible servers do. Value checks that need the server's limits (λ
range, max_tokens, n, context length) are done by `check_common` and raise
`ApiError` (400) naming the field.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_validation(e: ValidationError) -> ApiError:
    """422 naming the first bad field."""
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or None
    msg = f"{where}: {err['msg']}" if where else err["msg"]
    if len(e.errors()) > 1:
        msg += f" (and {len(e.errors()) - 1} more error(s))"
    return ApiError(422, msg, where, code="invalid_value")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageUrl(_Strict):
    url: str  # a data: URL (base64), or http(s) when the server fetches images (ServeConfig.fetch_images)
    detail: Literal["auto", "low", "high"] | None = None  # accepted, not used: the processor sizes images


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Part], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def image_urls(self) -> list[str]:
        """The URLs of the message's image parts, in order."""
        return [p.image_url.url for p in self.content or () if isinstance(p, ImagePart)]


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    lam: float | None = Field(None, alias="lambda")
    user: str | None = None
    # Extensions (as in vLLM): generated ids per choice (`token_ids`, streamed too), no stop on EOS.
    return_token_ids: bool = False
    ignore_eos: bool = False

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def image_urls(self) -> list[str]:
        return [url for m in self.messages for url in m.image_urls()]


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False


def check_common(req: _Common, max_n: int, max_rows: int) -> None:
    """Field values, against the server's limits."""
    if req.lam is not None and (math.isnan(req.lam) or not 0.0 <= req.lam <= 1.0):
        raise ApiError(400, f"lambda must be a number in [0, 1], got {req.lam}", "lambda")
    mt = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if mt is not None and mt < 1:
        raise ApiError(400, f"max_tokens must be >= 1, got {mt}", "max_tokens")
    if req.temperature is not None and (not math.isfinite(req.temperature) or not 0 <= req.temperature <= 2):
        raise ApiError(400, f"temperature must be in [0, 2], got {req.temperature}", "temperature")
    if req.top_p is not None and (not math.isfinite(req.top_p) or not 0 < req.top_p <= 1):
        raise ApiError(400, f"top_p must be in (0, 1], got {req.top_p}", "top_p")
    if req.top_k is not None and req.top_k < -1:
        raise ApiError(400, f"top_k must be >= 0 (or -1 for off), got {req.top_k}", "top_k")
    limit = min(max_n, max_rows)  # a request's choices run side by side
    if not 1 <= req.n <= limit:
        raise ApiError(400, f"n must be in [1, {limit}] on this server, got {req.n}", "n")
    if len(req.stop_list()) > 4:
        raise ApiError(400, f"at most 4 stop sequences, got {len(req.stop_list())}", "stop")
    if req.seed is not None and not 0 <= req.seed < 2**32:  # jax.random.key keeps 32 bits
        raise ApiError(400, f"seed must be in [0, 2**32), got {req.seed}", "seed")


def parse_body(model, raw: bytes, max_n: int, max_rows: int):
    """Body bytes -> validated request (400 bad JSON, 422 bad fields, 400 bad values)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        raise from_validation(e) from None
    check_common(body, max_n, max_rows)
    return body
