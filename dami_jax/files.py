"""Reports written whole or not at all: a reader (or a killed run) never sees half a JSON file."""

from __future__ import annotations

import json
import os
import tempfile


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
