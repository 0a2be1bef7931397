"""Files in and out: reports written whole or not at all (a reader, or a killed run, never sees half a
JSON file), and JSON Lines read with the line of any bad row named."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator

from dami_jax.errors import InputError


def write_json(path: str | os.PathLike, data, indent: int = 1) -> str:
    """Write `data` as indented JSON to a temporary file beside `path`, then rename it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=indent)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, value) of each non-blank line of a JSON Lines file; InputError naming the
    line that is not JSON."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{os.fspath(path)} line {lineno}: invalid JSON ({e.msg})") from None
