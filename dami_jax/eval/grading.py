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
"""

from __future__ import annotations

import dataclasses
import functools
import threading

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


def grade(output: str, gold: str, *, mode: str = "strict", timeout_s: int | None = 5) -> Grade:
    """Grade one model output against one gold answer; never raises on bad outputs.

    An unparseable gold also gives `gradable=False` (fix the data: see `parse_gold`).
    """
    if mode not in MODES:
        raise ValueError(f"grade: mode must be one of {MODES}, got {mode!r}")
    if not isinstance(output, str):
        raise TypeError(f"grade: output must be a str, got {type(output).__name__}")
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
