"""Benchmark loaders and prompts.

Every loader returns a list of `Problem(id, question, gold)`: `id` is a string
(unique within the benchmark), `gold` the reference answer as a string, ready
for `grading.grade`. Hub benchmarks are read through the `datasets` library,
imported lazily; any local JSONL file is read with a field mapping
(`FieldMap`). Both paths go through one function, `rows_to_problems`, so a
local JSONL copy of a hub benchmark loads exactly like the hub version:

    load_jsonl("gsm8k_test.jsonl", BENCHMARKS["gsm8k"].fields)

Multimodal benchmarks (MathVista, MathVerse, MATH-Vision) add images and options:
`FieldMap.images` names the field holding a problem's image(s) and `choices` the
field holding its options (a list, or the question text they are listed in).
A problem then carries its images as encoded bytes or file paths, decoded with
limits only when its prompt is built (`dami_jax.multimodal`), its options
written into the question, and its gold as the right option's letter. A local
copy of a hub benchmark (a directory laid out as on the hub, e.g. a
`snapshot_download`) loads through the same code with `data_path=`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Iterable, Mapping, Sequence

from dami_jax.errors import InputError
from dami_jax.eval import choices as mc
from dami_jax.files import read_jsonl

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = ("Please reason step by step, and put your final answer (the letter of the correct option) "
                      "within \\boxed{}.")

GOLD_FORMATS = ("plain", "gsm8k")


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    question: str  # options included, for a multiple-choice problem
    gold: str  # a multiple-choice problem's gold is its option letter
    images: tuple = ()  # encoded image bytes or file paths, in the order the question shows them
    choices: tuple[str, ...] = ()  # the options (A, B, ...) of a multiple-choice problem


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Which row fields hold the question, the answer and the id.

    `id=None` numbers the rows (`"<prefix>-<index>"`). `gold="gsm8k"` takes the
    answer after the `####` marker of a GSM8K solution; `"plain"` uses the field
    as is. `images`: the field with the image(s) (one or a list; an image, its
    bytes, or a path, relative to a JSONL file's folder). `choices`: the field
    with the options, a list (written into the question) or a text that lists
    them under a `Choices:` line (the question itself, as in MathVerse); a row
    without options is free-form.
    """

    question: str = "question"
    answer: str = "answer"
    id: str | None = "id"
    gold: str = "plain"
    images: str | None = None
    choices: str | None = None

    def __post_init__(self):
        if self.gold not in GOLD_FORMATS:
            raise InputError(f"FieldMap.gold must be one of {GOLD_FORMATS}, got {self.gold!r}")


@dataclasses.dataclass(frozen=True)
class HubBenchmark:
    path: str
    split: str
    fields: FieldMap
    config: str | None = None

    @property
    def multimodal(self) -> bool:
        return self.fields.images is not None


BENCHMARKS: dict[str, HubBenchmark] = {
    "gsm8k": HubBenchmark("openai/gsm8k", "test", FieldMap("question", "answer", None, "gsm8k"), "main"),
    "math500": HubBenchmark("HuggingFaceH4/MATH-500", "test", FieldMap("problem", "answer", "unique_id")),
    "aime24": HubBenchmark("HuggingFaceH4/aime_2024", "train", FieldMap("problem", "answer", "id")),
    "aime25": HubBenchmark("math-ai/aime25", "test", FieldMap("problem", "answer", "id")),
    "amc23": HubBenchmark("zwhe99/amc23", "test", FieldMap("question", "answer", "id")),
    # Multimodal math (image + question). MathVista's golds are option texts, the others' letters.
    "mathvista": HubBenchmark("AI4Math/MathVista", "testmini",
                              FieldMap("question", "answer", "pid", images="decoded_image", choices="choices")),
    "mathverse": HubBenchmark("AI4Math/MathVerse", "testmini",
                              FieldMap("question", "answer", "sample_index", images="image", choices="question"),
                              "testmini"),
    "mathvision": HubBenchmark("MathLLMs/MathVision", "test",
                               FieldMap("question", "answer", "id", images="decoded_image", choices="options")),
}


def problem_prompt(problem: Problem, instruction: bool = True) -> str:
    """The user message's text for a problem: `math_prompt` with the instruction for its kind
    (an option letter for a multiple-choice problem), or the bare question."""
    if not instruction:
        return problem.question
    return math_prompt(problem.question, CHOICE_INSTRUCTION if problem.choices else DEFAULT_INSTRUCTION)


def problem_messages(problem: Problem, instruction: bool = True) -> list[dict]:
    """The chat messages of a problem: one user turn, its images first, then its text (the layout
    Qwen-VL models are trained on). Text-only problems get a plain string content."""
    text = problem_prompt(problem, instruction)
    if not problem.images:
        return [{"role": "user", "content": text}]
    parts = [{"type": "image", "image": image} for image in problem.images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


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


def image_sources(value: Any, base_dir: str | None, where: str) -> tuple:
    """A row's image field -> a tuple of bytes or paths (PIL images kept as they are)."""
    if value is None:
        raise InputError(f"{where}: the image field is null")
    out = []
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, Mapping) and ("bytes" in item or "path" in item):  # datasets' undecoded Image
            item = item.get("bytes") or item.get("path")
        if isinstance(item, str) and base_dir and not os.path.isabs(item) and ":" not in item[:12]:
            item = os.path.join(base_dir, item)
        if not item:
            raise InputError(f"{where}: an image entry is empty")
        out.append(item)
    return tuple(out)


def _choices(row: Mapping[str, Any], fields: FieldMap, question: str, where: str) -> tuple[tuple[str, ...], str]:
    """(options, question with its options shown): a list field is written into the question, a
    text field is read for a `Choices:` list (shown already when it is the question)."""
    if fields.choices is None:
        return (), question
    value = row[fields.choices]
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return (), question
    if isinstance(value, str):
        options = mc.parse_from_text(value)
        return options, question if fields.choices == fields.question else mc.render(question, options)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int, float)) for v in value):
        raise InputError(f"{where}: field {fields.choices!r} (the options) must be a list of strings or a text")
    options = tuple(str(v) for v in value)
    return options, mc.render(question, options)


def rows_to_problems(rows: Iterable[Mapping[str, Any]], fields: FieldMap, source: str,
                     base_dir: str | None = None) -> list[Problem]:
    """Map raw rows (dicts) to problems; `source` names the data in errors and id prefixes;
    relative image paths are taken from `base_dir`."""
    problems, seen = [], set()
    for index, row in enumerate(rows):
        where = f"{source} row {index}"
        if not isinstance(row, Mapping):
            raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
        wanted = [fields.question, fields.answer] + ([fields.id] if fields.id else [])
        wanted += [f for f in (fields.images, fields.choices) if f]
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
        options, question = _choices(row, fields, question, where)
        if options:
            gold = mc.gold_letter(gold, options, where)
        images = image_sources(row[fields.images], base_dir, where) if fields.images else ()
        problems.append(Problem(pid, question, gold, images, options))
    return problems


def local_fields(rows: Sequence[Mapping[str, Any]]) -> FieldMap:
    """A local file's fields when none are given: `FieldMap()` (question, answer, id), plus
    `image` (a path or a list, relative to the file) and `choices` (a list of options) when its
    first row has them, so `dami eval --bench FILE.jsonl` runs image problems as written."""
    first = rows[0] if rows and isinstance(rows[0], Mapping) else {}
    return FieldMap(images="image" if "image" in first else None, choices="choices" if "choices" in first else None)


def load_jsonl(path: str | os.PathLike, fields: FieldMap | None = None, limit: int | None = None) -> list[Problem]:
    """Problems from a local JSONL file, one JSON object per line (blank lines skipped);
    fields: default `local_fields`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"benchmark file not found: {path}")
    rows = [row for _, row in read_jsonl(path)]
    fields = local_fields(rows) if fields is None else fields
    problems = rows_to_problems(rows, fields, path, base_dir=os.path.dirname(os.path.abspath(path)))
    return problems[:limit] if limit is not None else problems


def load_benchmark(
    name: str | os.PathLike,
    *,
    limit: int | None = None,
    fields: FieldMap | None = None,
    split: str | None = None,
    cache_dir: str | None = None,
    data_path: str | os.PathLike | None = None,
) -> list[Problem]:
    """Problems of a known benchmark (see `BENCHMARKS`) or of a local `.jsonl` file.

    For a local file `fields` is the field mapping (default `local_fields`); for a
    hub benchmark it overrides the built-in mapping. `limit` keeps the first rows.
    `data_path`: a local copy of a hub benchmark (its directory), read in place of the hub id.
    """
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1 or None, got {limit}")
    name = os.fspath(name)
    if name.endswith(".jsonl") or os.path.isfile(name):
        return load_jsonl(name, fields, limit)
    if name not in BENCHMARKS:
        raise InputError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)} or a path to a .jsonl file")
    spec = BENCHMARKS[name]
    try:
        import datasets  # lazy: only hub loading needs it
    except ImportError as e:
        raise ImportError("loading hub benchmarks needs `datasets`: pip install 'dami_jax[eval]'") from e
    fields = fields or spec.fields
    path = os.fspath(data_path) if data_path is not None else spec.path
    data = datasets.load_dataset(path, spec.config, split=split or spec.split, cache_dir=cache_dir)
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    if fields.images and isinstance(data.features.get(fields.images), datasets.Image):
        # encoded bytes, decoded with limits when the prompt is built (and 1,000 decoded images never held)
        data = data.cast_column(fields.images, datasets.Image(decode=False))
    return rows_to_problems(data, fields, name)


def known_benchmarks() -> Sequence[str]:
    return sorted(BENCHMARKS)
