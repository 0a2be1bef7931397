"""Benchmark loaders and prompts.

Every loader returns a list of `Problem(id, question, gold)`: `id` is a string
(unique within the benchmark), `gold` the reference answer as a string, ready
for `grading.grade`. Hub benchmarks are read through the `datasets` library,
imported lazily; any local JSONL file is read with a field mapping
(`FieldMap`). Both paths go through one function, `rows_to_problems`, so a
local JSONL copy of a hub benchmark loads exactly like the hub version:

    load_jsonl("gsm8k_test.jsonl", BENCHMARKS["gsm8k"].fields)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

from dami_jax.errors import InputError

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

GOLD_FORMATS = ("plain", "gsm8k")


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    question: str
    gold: str


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Which row fields hold the question, the answer and the id.

    `id=None` numbers the rows (`"<prefix>-<index>"`). `gold="gsm8k"` takes the
    answer after the `####` marker of a GSM8K solution; `"plain"` uses the field
    as is.
    """

    question: str = "question"
    answer: str = "answer"
    id: str | None = "id"
    gold: str = "plain"

    def __post_init__(self):
        if self.gold not in GOLD_FORMATS:
            raise InputError(f"FieldMap.gold must be one of {GOLD_FORMATS}, got {self.gold!r}")


@dataclasses.dataclass(frozen=True)
class HubBenchmark:
    path: str
    split: str
    fields: FieldMap
    config: str | None = None


BENCHMARKS: dict[str, HubBenchmark] = {
    "gsm8k": HubBenchmark("openai/gsm8k", "test", FieldMap("question", "answer", None, "gsm8k"), "main"),
    "math500": HubBenchmark("HuggingFaceH4/MATH-500", "test", FieldMap("problem", "answer", "unique_id")),
    "aime24": HubBenchmark("HuggingFaceH4/aime_2024", "train", FieldMap("problem", "answer", "id")),
    "aime25": HubBenchmark("math-ai/aime25", "test", FieldMap("problem", "answer", "id")),
    "amc23": HubBenchmark("zwhe99/amc23", "test", FieldMap("question", "answer", "id")),
}


def math_prompt(question: str, instruction: str | None = DEFAULT_INSTRUCTION) -> str:
    """The user message for a math question: the question, then the instruction
    on its own line (no instruction when `instruction` is None or empty). The
    chat template is applied by the caller."""
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"math_prompt: question must be a non-empty string, got {question!r}")
    if not instruction:
        return question.strip()
    return f"{question.strip()}\n{instruction}"


_GSM8K_GOLD = re.compile(r"####\s*(.+?)\s*$", re.S)


def extract_gsm8k_answer(solution: str) -> str:
    """`'... #### 1,234'` -> `'1234'` (thousands separators and `$` removed)."""
    match = _GSM8K_GOLD.search(str(solution))
    if match is None:
        raise InputError(f"GSM8K answer has no '#### <answer>' marker: {str(solution)[-80:]!r}")
    answer = match.group(1).replace(",", "").replace("$", "").strip()
    if not answer:
        raise InputError(f"GSM8K answer is empty after '####': {str(solution)[-80:]!r}")
    return answer


def _gold_str(value: Any) -> str:
    """Numbers to strings without a spurious `.0` (AMC golds are floats on the hub)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def rows_to_problems(rows: Iterable[Mapping[str, Any]], fields: FieldMap, source: str) -> list[Problem]:
    """Map raw rows (dicts) to problems; `source` names the data in errors and id prefixes."""
    problems, seen = [], set()
    for index, row in enumerate(rows):
        where = f"{source} row {index}"
        if not isinstance(row, Mapping):
            raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
        wanted = [fields.question, fields.answer] + ([fields.id] if fields.id else [])
        missing = [name for name in wanted if name not in row]
        if missing:
            raise InputError(
                f"{where}: missing field(s) {missing}; the row has fields {sorted(row)}. "
                f"Pass a FieldMap(question=..., answer=..., id=...) naming the right fields."
            )
        answer = row[fields.answer]
        if answer is None:
            raise InputError(f"{where}: field {fields.answer!r} (the answer) is null")
        gold = extract_gsm8k_answer(answer) if fields.gold == "gsm8k" else _gold_str(answer)
        pid = str(row[fields.id]) if fields.id else f"{os.path.basename(source)}-{index}"
        if pid in seen:
            raise InputError(f"{where}: duplicate id {pid!r} in field {fields.id!r}; ids must be unique")
        seen.add(pid)
        question = row[fields.question]
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"{where}: field {fields.question!r} (the question) must be a non-empty string")
        problems.append(Problem(pid, question, gold))
    return problems


def load_jsonl(path: str | os.PathLike, fields: FieldMap = FieldMap(), limit: int | None = None) -> list[Problem]:
    """Problems from a local JSONL file, one JSON object per line (blank lines skipped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"benchmark file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
    problems = rows_to_problems(rows, fields, path)
    return problems[:limit] if limit is not None else problems


def load_benchmark(
    name: str | os.PathLike,
    *,
    limit: int | None = None,
    fields: FieldMap | None = None,
    split: str | None = None,
    cache_dir: str | None = None,
) -> list[Problem]:
    """Problems of a known benchmark (see `BENCHMARKS`) or of a local `.jsonl` file.

    For a local file `fields` is the field mapping (default `FieldMap()`); for a
    hub benchmark it overrides the built-in mapping. `limit` keeps the first rows.
    """
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1 or None, got {limit}")
    name = os.fspath(name)
    if name.endswith(".jsonl") or os.path.isfile(name):
        return load_jsonl(name, fields or FieldMap(), limit)
    if name not in BENCHMARKS:
        raise InputError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)} or a path to a .jsonl file")
    spec = BENCHMARKS[name]
    try:
        import datasets  # lazy: only hub loading needs it
    except ImportError as e:
        raise ImportError("loading hub benchmarks needs `datasets`: pip install 'dami_jax[eval]'") from e
    data = datasets.load_dataset(spec.path, spec.config, split=split or spec.split, cache_dir=cache_dir)
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return rows_to_problems(data, fields or spec.fields, name)


def known_benchmarks() -> Sequence[str]:
    return sorted(BENCHMARKS)
