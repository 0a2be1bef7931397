"""A chat request's images: decoded under the server's limits before anything else, so a broken,
oversized or decompression-bomb image is a 400 naming the image and the limit, never a crash.

`data:` URLs only by default. With `ServeConfig.fetch_images` the server downloads http(s) URLs
itself: one timeout per image, at most `max_image_bytes` read, redirects only to http(s).
"""

from __future__ import annotations

import urllib.error
import urllib.request

from dami_jax.multimodal.images import ImageError, load_image
from dami_jax.serve.schemas import ApiError, ChatRequest


def request_images(body: ChatRequest, cfg) -> list:
    """The request's images as RGB PIL images, in message order (400 on a bad one)."""
    urls = body.image_urls()
    if len(urls) > cfg.max_images:
        raise ApiError(400, f"{len(urls)} images in the request; this server takes at most {cfg.max_images}",
                       "messages", code="too_many_images")
    limits = cfg.image_limits()
    fetch = _fetcher(cfg.fetch_timeout_s) if cfg.fetch_images else None
    try:
        return [load_image(url, limits, fetch=fetch, where=f"image {i}") for i, url in enumerate(urls)]
    except ImageError as e:
        if not cfg.fetch_images and "remote image URLs" in str(e):
            e = ImageError(f"{e} (this server does not fetch image URLs)")
        raise ApiError(400, str(e), "messages", code="invalid_image") from None


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):
            raise ImageError(f"image URL redirects to {newurl[:60]!r}; only http(s) is followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetcher(timeout_s: float):
    opener = urllib.request.build_opener(_HttpOnlyRedirects)

    def fetch(url: str, max_bytes: int) -> bytes:
        return fetch_url(opener, url, max_bytes, timeout_s)

    return fetch


def fetch_url(opener, url: str, max_bytes: int, timeout_s: float) -> bytes:
    """The body of `url`, refused past `max_bytes` (announced or read) or `timeout_s` per read."""
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "dami_jax"}), timeout=timeout_s) as r:
            size = r.headers.get("Content-Length")
            if size is not None and size.isdigit() and int(size) > max_bytes:
                raise ImageError(f"{url[:80]}: {size} bytes; the limit is {max_bytes} bytes")
            data = r.read(max_bytes + 1)
    except ImageError:
        raise
    except TimeoutError:
        raise ImageError(f"{url[:80]}: timed out after {timeout_s:g} s") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise ImageError(f"{url[:80]}: timed out after {timeout_s:g} s") from None
        raise ImageError(f"{url[:80]}: could not be fetched ({reason})") from None
    if len(data) > max_bytes:
        raise ImageError(f"{url[:80]}: more than {max_bytes} bytes; the limit is {max_bytes} bytes")
    return data
