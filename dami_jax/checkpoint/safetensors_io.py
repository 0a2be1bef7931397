"""Minimal memory-mapped safetensors reader and streaming writer.

We read the format ourselves (8-byte header length, JSON header, raw data)
because numpy has no bfloat16 and the `safetensors` numpy API cannot return
one; `ml_dtypes` (a JAX dependency) gives us the dtype and `mmap` gives
zero-copy views. Pages are released after each tensor is consumed so peak RSS
stays near one tensor above the loaded params.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

from dami_jax.errors import InputError

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_PAGE = mmap.PAGESIZE


class CheckpointError(InputError):
    """A checkpoint file is missing, truncated, or holds unexpected tensors."""


class SafetensorsFile:
    """Read-only, memory-mapped view of one .safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise CheckpointError(f"{self.path}: truncated safetensors file (header of {n} bytes)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from e
            self.metadata = header.pop("__metadata__", {}) or {}
            self._entries = header
            self._base = 8 + n
            end = max((e["data_offsets"][1] for e in header.values()), default=0)
            if self._base + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated safetensors file: header needs {self._base + end} bytes, "
                    f"file has {size}"
                )
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self._entries[name]["dtype"]
        if code not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        return DTYPES[code]

    def get(self, name: str) -> np.ndarray:
        """A zero-copy read-only view; valid until `release(name)` or `close()`."""
        start, stop = self._entries[name]["data_offsets"]
        dtype, shape = self.dtype(name), self.shape(name)
        if (stop - start) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(f"{self.path}: tensor {name!r} byte range does not match shape {shape}")
        return np.frombuffer(self._mm, dtype, count=int(np.prod(shape)), offset=self._base + start).reshape(shape)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process (they are file-backed: re-readable)."""
        start, stop = self._entries[name]["data_offsets"]
        lo = (self._base + start) // _PAGE * _PAGE
        hi = self._base + stop
        if hi > lo and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive; the GC closes it later
                pass
            self._mm = None


def encode_header(tensors: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
                  metadata: dict[str, str] | None = None) -> bytes:
    """The head of a file holding (name, dtype, shape) tensors back to back in this order.

    The 8-byte length, then the JSON header padded with spaces so the data starts
    8-byte aligned. Known from shapes alone, so a writer can stream the data after it.
    """
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in tensors:
        dtype = np.dtype(dtype)
        if dtype not in _NAMES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {dtype}")
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> int:
    """Write (name, array) pairs to `path`; returns the bytes of tensor data written."""
    tensors = [(name, np.ascontiguousarray(a)) for name, a in tensors]
    head = encode_header([(name, a.dtype, a.shape) for name, a in tensors], metadata)
    with open(path, "wb") as f:
        f.write(head)
        for _, a in tensors:
            f.write(a.reshape(-1).view(np.uint8).data)  # no extra copy
    return sum(a.nbytes for _, a in tensors)
