"""Decoding untrusted images with limits: bytes, pixels, count.

Every image a prompt carries (a PIL image, raw bytes, a `data:` URL, a local
path, or an http(s) URL when the caller hands in a fetcher) becomes an RGB
`PIL.Image` here, or an `ImageError` naming what was wrong and the limit:

    limits = ImageLimits(max_bytes=8 << 20, max_pixels=32_000_000, max_images=4)
    images = load_images(["data:image/png;base64,...", "figure.jpg"], limits)

The pixel limit is checked on the header, before any pixel is decoded, so a
decompression bomb (a tiny file that claims a huge canvas) costs nothing.
Remote URLs are never fetched here: `load_image` refuses them unless the
caller passes `fetch(url, max_bytes) -> bytes` (the server does when its
config allows it), so a library user never opens a socket by accident.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import warnings
from typing import Callable, Sequence

from dami_jax.errors import InputError

# Raster formats worth a model's look; anything else (PSD, EPS, ICO, ...) is refused by name.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class ImageError(InputError):
    """An image that cannot be used: unreadable, of a refused kind, or over a limit."""


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 8 << 20  # encoded size of one image
    max_pixels: int = 32_000_000  # width × height of one image, read from the header
    max_images: int = 8  # images per prompt

    def __post_init__(self):
        for name in ("max_bytes", "max_pixels", "max_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"ImageLimits.{name} must be a whole number >= 1, got {value!r}")


Fetch = Callable[[str, int], bytes]  # (url, max_bytes) -> the body, at most max_bytes long


def load_images(sources: Sequence, limits: ImageLimits = ImageLimits(), *, fetch: Fetch | None = None) -> list:
    """`load_image` of each source, after checking their count against `limits.max_images`."""
    if len(sources) > limits.max_images:
        raise ImageError(f"{len(sources)} images given; the limit is {limits.max_images} per prompt")
    return [load_image(s, limits, fetch=fetch, where=f"image {i}") for i, s in enumerate(sources)]


def load_image(source, limits: ImageLimits = ImageLimits(), *, fetch: Fetch | None = None, where: str = "image"):
    """One RGB PIL image from a PIL image, bytes, a `data:` URL, a local path or (with `fetch`) a URL."""
    from PIL import Image

    if isinstance(source, Image.Image):
        _check_pixels(source.size, limits, where)
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray)):
        return decode_image(bytes(source), limits, where)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise ImageError(f"{where}: expected a PIL image, bytes, a data: URL or a file path, got "
                         f"{type(source).__name__}")
    scheme = source.split(":", 1)[0].lower() if ":" in source[:12] else ""
    if scheme == "data":
        return decode_image(data_url_bytes(source, limits, where), limits, where)
    if scheme in ("http", "https"):
        if fetch is None:
            raise ImageError(f"{where}: remote image URLs are not fetched here; send the image inline as a "
                             "data: URL (base64)")
        return decode_image(fetch(source, limits.max_bytes), limits, where)
    if scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive
        raise ImageError(f"{where}: URL scheme {scheme!r} is not supported; use a data: URL or a file path")
    return decode_image(_read_file(source, limits, where), limits, where)


def data_url_bytes(url: str, limits: ImageLimits, where: str = "image") -> bytes:
    """The bytes of a base64 `data:image/...;base64,...` URL, refused before decoding when too long."""
    head, sep, payload = url.partition(",")
    if not sep or not head.lower().startswith("data:image/") or not head.lower().endswith(";base64"):
        raise ImageError(f"{where}: a data URL must look like data:image/<type>;base64,<data>, got {head[:40]!r}")
    if len(payload) * 3 // 4 > limits.max_bytes + 2:  # base64 carries 3 bytes per 4 characters
        raise ImageError(f"{where}: about {len(payload) * 3 // 4} bytes; the limit is {limits.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{where}: the data URL's payload is not valid base64") from None


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), where: str = "image"):
    """Bytes -> RGB PIL image; the size and the header's canvas are checked before decoding."""
    from PIL import Image

    if len(data) > limits.max_bytes:
        raise ImageError(f"{where}: {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in FORMATS:
                raise ImageError(f"{where}: format {image.format} is not accepted; expected one of {FORMATS}")
            _check_pixels(image.size, limits, where)
            image.load()
            return image.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{where}: decompression bomb refused ({e})") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ... on broken files
        raise ImageError(f"{where}: not a readable image ({type(e).__name__}: {e})") from None


def _check_pixels(size: tuple[int, int], limits: ImageLimits, where: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"{where}: empty image ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageError(f"{where}: {width}x{height} = {width * height} pixels; the limit is "
                         f"{limits.max_pixels} pixels")


def _read_file(path: str, limits: ImageLimits, where: str) -> bytes:
    if not os.path.isfile(path):
        raise ImageError(f"{where}: file not found: {path}")
    size = os.path.getsize(path)
    if size > limits.max_bytes:
        raise ImageError(f"{where}: {path} has {size} bytes; the limit is {limits.max_bytes} bytes")
    with open(path, "rb") as f:
        return f.read()
