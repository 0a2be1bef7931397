"""Grading of model outputs against gold answers with Math-Verify.

Only the answer part of an output is graded: the text after the last `</think>`
(the whole output when it has no `</think>`), so a wrong answer boxed while
thinking never counts. The gold is parsed first, then the prediction, then
`verify(gold, pred)`.

Extraction modes:
- `"strict"` (default, the prompt asks for `\\boxed{}`): the answer must be in
  `\\boxed{...}` or stated as "final answer is $...$". An output without one is
  *ungradable* (`gradable=False`, `correct=False`).
- `"lenient"`: Math-Verify's defaults; also takes the last LaTeX or plain
  expression anywhere in the answer part (e.g. "The answer is 42.").

Timeouts: Math-Verify times out with `signal.alarm`, which only works in the
main thread. `timeout_s` (whole seconds) bounds the parse of the prediction and
the comparison separately. Off the main thread no timeout is applied (Math-Verify
is called with `parsing_timeout=None`, `timeout_seconds=None`); run grading from
the main thread, or in worker *processes*, when outputs may be adversarial.
A timed-out parse counts as ungradable, a timed-out comparison as wrong.

Multiple choice (`grade(..., choices=options)`, the gold an option letter): the answer is the
last `\\boxed{}` (lenient: also "the answer is X" or the last "(X)"), right when it names the
gold's letter (`B`, `(B)`, `B. 35°`) or states the gold option's value (`35°`, `\\frac{1}{2}`
against an option `0.5`, by Math-Verify). `Grade.pred` is then the letter it chose.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import threading

from dami_jax.eval.choices import LETTERS
from dami_jax.thinking import THINK_END, split_thinking

MODES = ("strict", "lenient")


@dataclasses.dataclass(frozen=True)
class Grade:
    """`pred` is the canonical form of the parsed answer (SymPy's `str`, so
    `\\frac{1}{2}` and `1/2` agree); it is the key of majority voting. None when
    nothing could be parsed."""

    correct: bool
    gradable: bool
    pred: str | None


def answer_text(output: str) -> str:
    """The part of an output that is graded (`split_thinking`'s answer)."""
    return split_thinking(output)[1]


def has_thinking(output: str) -> bool:
    return THINK_END in output


def _math_verify():
    try:
        import math_verify
    except ImportError as e:
        raise ImportError("grading needs `math-verify`: pip install 'dami_jax[eval]'") from e
    return math_verify


@functools.lru_cache(maxsize=4)
def _extraction_config(mode: str):
    mv = _math_verify()
    if mode == "strict":
        return (mv.LatexExtractionConfig(try_extract_without_anchor=False, boxed_match_priority=0),)
    return (mv.LatexExtractionConfig(), mv.ExprExtractionConfig())


def _timeout(timeout_s: int | None) -> int | None:
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or timeout_s < 1:
        raise ValueError(f"timeout_s must be a whole number of seconds >= 1 or None, got {timeout_s!r}")
    in_main = threading.current_thread() is threading.main_thread()
    return timeout_s if in_main else None


@functools.lru_cache(maxsize=4096)
def _parse_gold_cached(gold: str, timeout: int | None) -> tuple:
    mv = _math_verify()
    # The gold is one answer: read it as a whole boxed expression first.
    candidates = [gold] if "\\boxed" in gold else [f"\\boxed{{{gold}}}", f"${gold}$", gold]
    for text in candidates:
        parsed = mv.parse(text, parsing_timeout=timeout)
        if parsed:
            return tuple(parsed)
    return ()


def parse_gold(gold: str, timeout_s: int | None = 5) -> list:
    """Math-Verify's parse of a gold answer (`"0.5"`, `"\\frac{1}{2}"`, `"(1,2)"`);
    an empty list when it cannot be parsed."""
    if not isinstance(gold, str) or not gold.strip():
        raise ValueError(f"gold must be a non-empty string, got {gold!r}")
    return list(_parse_gold_cached(gold.strip(), _timeout(timeout_s)))


def grade(output: str, gold: str, *, mode: str = "strict", timeout_s: int | None = 5,
          choices=()) -> Grade:
    """Grade one model output against one gold answer; never raises on bad outputs.

    An unparseable gold also gives `gradable=False` (fix the data: see `parse_gold`).
    `choices`: the options of a multiple-choice question, whose gold is then an option letter.
    """
    if mode not in MODES:
        raise ValueError(f"grade: mode must be one of {MODES}, got {mode!r}")
    if not isinstance(output, str):
        raise TypeError(f"grade: output must be a str, got {type(output).__name__}")
    if choices:
        return grade_choice(output, gold, choices, mode=mode, timeout_s=timeout_s)
    timeout = _timeout(timeout_s)
    mv = _math_verify()
    gold_parsed = parse_gold(gold, timeout_s)
    try:
        pred_parsed = mv.parse(
            answer_text(output), extraction_config=_extraction_config(mode), parsing_timeout=timeout
        )
    except Exception:  # Math-Verify catches its own errors; this guards the rest
        pred_parsed = []
    if not pred_parsed:
        return Grade(correct=False, gradable=False, pred=None)
    pred = str(pred_parsed[0])
    if not gold_parsed:
        return Grade(correct=False, gradable=False, pred=pred)
    try:
        correct = bool(mv.verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:
        correct = False
    return Grade(correct=correct, gradable=True, pred=pred)


_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+)", re.I)
_LETTER = re.compile(r"^\(?([A-Z])\)?(?:$|[.:)]|\s)")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}")


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (nested braces kept), None when there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1: j]
    return None


def _choice_answer(answer: str, mode: str) -> str | None:
    """The stated choice: the last boxed content; lenient also "the answer is X" or the last "(X)"."""
    found = last_boxed(answer)
    if found is None and mode == "lenient":
        said = _ANSWER_IS.findall(answer)
        letters = re.findall(r"\(([A-Z])\)", answer)
        found = said[-1].splitlines()[0] if said else (letters[-1] if letters else None)
    if found is None:
        return None
    found = _TEXT_WRAP.sub(r"\1", found).replace("$", "").strip().rstrip(".").strip()
    return found or None


def _plain(value: str) -> str:
    """An option's text for exact comparison: no spaces, `$`, degree or percent marks."""
    for mark in ("^\\circ", "^{\\circ}", "\\circ", "°", "\\%", "%", "$", " "):
        value = value.replace(mark, "")
    return value.lower()


def _same_value(stated: str, option: str, timeout: int | None) -> bool:
    if _plain(stated) == _plain(option):
        return True
    mv = _math_verify()
    gold = _parse_gold_cached(option.strip(), timeout) if option.strip() else ()
    try:
        pred = mv.parse(f"\\boxed{{{stated}}}", parsing_timeout=timeout)
        return bool(gold and pred and mv.verify(list(gold), pred, timeout_seconds=timeout))
    except Exception:
        return False


def grade_choice(output: str, gold: str, choices, *, mode: str = "strict", timeout_s: int | None = 5) -> Grade:
    """Grade a multiple-choice answer: by the option letter it names, else by the option value it
    states (see the module docstring). `gold` is the right option's letter."""
    if mode not in MODES:
        raise ValueError(f"grade_choice: mode must be one of {MODES}, got {mode!r}")
    letters = LETTERS[: len(choices)]
    if gold not in letters:
        raise ValueError(f"grade_choice: gold must be one of the option letters {letters!r}, got {gold!r}")
    stated = _choice_answer(answer_text(output), mode)
    if stated is None:
        return Grade(correct=False, gradable=False, pred=None)
    match = _LETTER.match(stated)
    if match and match.group(1) in letters:
        pred = match.group(1)
    else:
        timeout = _timeout(timeout_s)
        pred = next((letters[i] for i, c in enumerate(choices) if _same_value(stated, str(c), timeout)), None)
    return Grade(correct=pred == gold, gradable=True, pred=pred)
