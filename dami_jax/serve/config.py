"""ServeConfig: the server's settings as a frozen dataclass, which holds every default.

configs/serve.yaml is an example of it; `load_serve_config(path, overrides)` reads one. The
model pair (checkpoints, dtype, mesh, tokenizer, calibration, reward model) is not here: it is
a PairConfig (`dami serve --pair toy|configs/pair_*.yaml`), as for every command.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os

from dami_jax.config import ConfigError, load_yaml

# Served model name -> policy spec (dami_jax.policies.build_policy). Plain `conf`,
# `routing`, `pref`, `budget` and `deer` use the pair config's calibration, reward model,
# thinking budget and early-exit settings (the toy pair ships both files; see
# dami_jax.eval.pairs.expand_policy).
DEFAULT_POLICIES = {
    "dami-instruct": "static:0",
    "dami-static-0.5": "static:0.5",
    "dami-static-0.8": "static:0.8",
    "dami-thinking": "static:1",
    "dami-conf": "conf",
    "dami-routing": "routing",
    "dami-pref": "pref",
    "dami-budget": "budget",
    "dami-deer": "deer",
}
# Models that need a per-pair artifact (the toy pair ships them; another pair may not):
# by default, a pair without one serves the rest and logs why these are missing.
DEFAULT_OPTIONAL = ("dami-conf", "dami-routing", "dami-pref")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    # Network and safety.
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # Bearer key; required when host is not a loopback address
    max_body_bytes: int = 1 << 20  # images arrive inline (base64): raise it with max_image_bytes
    request_timeout_s: float = 300.0
    # Images (OpenAI `image_url` parts; answered by a pair with a vision tower): data: URLs only,
    # unless fetch_images lets the server download http(s) URLs (it then reaches any host the
    # client names: enable it only where that is wanted).
    max_images: int = 4  # per request
    max_image_bytes: int = 8 << 20  # encoded size of one image
    max_image_pixels: int = 16_000_000  # width × height of one image, checked before decoding it
    fetch_images: bool = False
    fetch_timeout_s: float = 10.0  # per fetched image
    # Engine: one dj.Engine (paged KV cache, continuous batching); names and defaults are dj.Engine's.
    max_rows: int = 32  # rows (choices) generating at once
    max_tokens_per_step: int = 256  # tokens one step feeds: decode rows, then prefill chunks of prompts
    page_size: int = 16  # tokens per KV page
    kv_gb: float = 0.0  # KV pool (keys and values, all layers) in GB (1e9 bytes); 0: max_rows full-length rows
    decode_burst: int = 8  # decode steps per device call while no prompt is prefilling; 1: rows join every step
    max_seq_len: int = 0  # tokens per sequence (prompt + output); 0: the model's context, at most 4096
    max_queue: int = 64  # requests waiting for a row; more get 429
    retry_after_s: int = 1  # Retry-After header of a 429
    max_n: int = 4  # choices per request
    warmup: bool = True  # compile the engine's shapes and the policies' scoring before serving
    # Request defaults (OpenAI semantics: temperature 1, no top-k / top-p).
    default_max_tokens: int = 0  # 0: fill the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    reasoning_lambda: float = 0.5  # streaming: text before `</think>` is reasoning when λ >= this
    policies: dict[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_POLICIES))
    # Model names whose policy may fail to load (skipped with a warning); any other model's failure
    # stops startup. None: the names of DEFAULT_OPTIONAL that `policies` lists.
    optional: tuple[str, ...] | None = None
    default_model: str = "dami-static-0.8"  # used when a request names no model

    def __post_init__(self):
        if self.optional is None and isinstance(self.policies, dict):
            object.__setattr__(self, "optional", tuple(n for n in DEFAULT_OPTIONAL if n in self.policies))
        checks = [
            (self.max_rows >= 1, "max_rows must be >= 1"),
            (self.max_tokens_per_step >= 1, "max_tokens_per_step must be >= 1"),
            (self.page_size >= 1, "page_size must be >= 1"),
            (self.kv_gb >= 0 and math.isfinite(self.kv_gb), "kv_gb must be >= 0 (0: max_rows full-length sequences)"),
            (self.decode_burst >= 1, "decode_burst must be >= 1"),
            (self.max_seq_len >= 0, "max_seq_len must be >= 0 (0: the model's context, at most 4096)"),
            (self.max_queue >= 0, "max_queue must be >= 0"),
            (self.max_n >= 1, "max_n must be >= 1"),
            (self.max_body_bytes >= 1024, "max_body_bytes must be >= 1024"),
            (self.max_images >= 0, "max_images must be >= 0 (0: no image input)"),
            (self.max_image_bytes >= 1, "max_image_bytes must be >= 1"),
            (self.max_image_pixels >= 1, "max_image_pixels must be >= 1"),
            (self.fetch_timeout_s > 0, "fetch_timeout_s must be > 0"),
            (self.request_timeout_s > 0, "request_timeout_s must be > 0"),
            (0 < self.port < 65536, "port must be in 1..65535"),
            (self.temperature >= 0 and math.isfinite(self.temperature), "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.reasoning_lambda <= 1, "reasoning_lambda must be in [0, 1]"),
            (isinstance(self.policies, dict) and all(isinstance(k, str) and isinstance(v, (str, dict))
                                                     for k, v in self.policies.items()),
             "policies must map model names to policy specs"),
            (not set(self.optional) - set(self.policies),
             f"optional names {sorted(set(self.optional) - set(self.policies))} are not in policies "
             f"{sorted(self.policies) if isinstance(self.policies, dict) else self.policies}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"ServeConfig: {msg}")

    def image_limits(self):
        """The limits each request's images are decoded under (dami_jax.multimodal.ImageLimits)."""
        from dami_jax.multimodal.images import ImageLimits

        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels,
                           max_images=max(self.max_images, 1))

    def context(self, model_cfg) -> int:
        """Tokens per sequence: max_seq_len, or the model's context (at most 4096), never past the model's."""
        return min(model_cfg.max_position_embeddings, self.max_seq_len or 4096)

    def engine_kwargs(self, model_cfg) -> dict:
        """The keywords of dj.Engine these settings give for a model: the pool as kv_bytes, or
        (kv_gb 0) as the pages of max_rows sequences of the context, plus the null page."""
        context = self.context(model_cfg)
        pool = ({"kv_bytes": int(self.kv_gb * 1e9)} if self.kv_gb else
                {"num_pages": self.max_rows * -(-context // self.page_size) + 1})
        return dict(pool, page_size=self.page_size, max_rows=self.max_rows,
                    max_tokens_per_step=self.max_tokens_per_step, max_context=context, decode_burst=self.decode_burst)

    def check_bind(self) -> None:
        """Refuse to listen beyond loopback without an API key."""
        if self.api_key:
            return
        try:
            loopback = ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            loopback = self.host == "localhost"
        if not loopback:
            raise ConfigError(f"refusing to bind {self.host} without an API key: pass --api-key KEY "
                              "(or api_key in the config), or bind 127.0.0.1")


PAIR_FIELDS = ("instruct", "thinking", "dtype", "tokenizer")  # ServeConfig held these once


def load_serve_config(path: str | os.PathLike | None = None, overrides=()) -> ServeConfig:
    """A ServeConfig YAML (none: the dataclass defaults) + dotted overrides such as `max_rows=16`."""
    try:
        return load_yaml(ServeConfig, path, overrides)
    except ConfigError as e:
        unknown = str(e).partition("unknown key(s)")[2].partition("; expected")[0]
        if any(f"'{k}'" in unknown for k in PAIR_FIELDS):
            raise ConfigError(f"{e}. The model pair is a pair config now: --pair configs/pair_*.yaml "
                              "(instruct, thinking, dtype, tokenizer, mesh, ...) or --set KEY=VALUE") from None
        raise
