"""Per-sample eval records as JSONL, with append, resume and re-scoring.

One line per (policy, id, sample). A record made by `make_record` stores the raw
`output` and the `gold`, so `rescore` can regrade a whole run (new grading rules,
another extraction mode) without generating again. Runs resume by skipping the
keys in `RecordStore.done_keys()`.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Iterable, Mapping

import numpy as np

from dami_jax.eval import grading
from dami_jax.errors import InputError

KEY_FIELDS = ("policy", "id", "sample")


def record_key(record: Mapping[str, Any]) -> tuple:
    missing = [f for f in KEY_FIELDS if f not in record]
    if missing:
        raise ValueError(f"record lacks key field(s) {missing}; a record is keyed by {KEY_FIELDS}")
    return tuple(record[f] for f in KEY_FIELDS)


def make_record(
    policy: str, id: str, sample: int, output: str, gold: str, tokens: int, *,
    mode: str = "strict", timeout_s: int | None = 5, choices=(), **extra: Any,
) -> dict[str, Any]:
    """Grade one output and build its record (extra fields such as `lam` or
    `finish_reason` are kept). A multiple-choice problem's `choices` are graded
    against and stored, so `rescore` grades it the same way."""
    g = grading.grade(output, gold, mode=mode, timeout_s=timeout_s, choices=choices)
    return {
        "policy": policy, "id": id, "sample": int(sample), "gold": gold, "output": output,
        "tokens": int(tokens), "correct": g.correct, "gradable": g.gradable, "pred": g.pred,
        "think": grading.has_thinking(output), **({"choices": list(choices)} if choices else {}), **extra,
    }


def rescore(
    records: Iterable[Mapping[str, Any]],
    golds: Mapping[str, str] | None = None,
    *,
    mode: str = "strict",
    timeout_s: int | None = 5,
) -> list[dict[str, Any]]:
    """Regrade stored outputs: new copies with `correct`, `gradable`, `pred` and
    `think` recomputed. The gold comes from `golds[id]` when given, else from the
    record's `gold` field."""
    out = []
    for i, r in enumerate(records):
        if "output" not in r:
            raise ValueError(f"record {i} (id={r.get('id')!r}) has no 'output' field; cannot rescore")
        if golds is not None and r.get("id") in golds:
            gold = golds[r["id"]]
        elif "gold" in r:
            gold = r["gold"]
        else:
            raise ValueError(f"record {i} (id={r.get('id')!r}) has no 'gold' field and no entry in golds")
        g = grading.grade(r["output"], gold, mode=mode, timeout_s=timeout_s, choices=r.get("choices") or ())
        out.append({**r, "gold": gold, "correct": g.correct, "gradable": g.gradable, "pred": g.pred,
                    "think": grading.has_thinking(r["output"])})
    return out


def _to_json(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"record value of type {type(value).__name__} is not JSON serializable")


class RecordStore:
    """Append-only JSONL store of records, keyed by (policy, id, sample)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def load(self) -> list[dict[str, Any]]:
        """All records, the last one winning for a repeated key. An unterminated
        last line (a run killed mid-write) is skipped with a warning."""
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        # After split, a file ending in "\n" leaves a final "", else the partial tail.
        tail, lines = lines[-1], lines[:-1]
        if tail.strip():
            warnings.warn(f"{self.path}: ignoring an unterminated last line (interrupted write)")
        by_key: dict[tuple, dict] = {}
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{self.path} line {lineno}: invalid JSON ({e.msg})") from None
            by_key[record_key(record)] = record
        return list(by_key.values())

    def done_keys(self) -> set[tuple]:
        return {record_key(r) for r in self.load()}

    def _repair_tail(self) -> None:
        """Cut an unterminated last line so the next record starts on its own line."""
        if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            keep = data.rfind(b"\n") + 1
            f.truncate(keep)
        warnings.warn(f"{self.path}: removed an unterminated last line ({len(data) - keep} bytes)")

    def extend(self, records: Iterable[Mapping[str, Any]]) -> None:
        lines = []
        for r in records:
            record_key(r)
            lines.append(json.dumps(dict(r), default=_to_json, ensure_ascii=False) + "\n")
        if not lines:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._repair_tail()
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()

    def append(self, record: Mapping[str, Any]) -> None:
        self.extend([record])
