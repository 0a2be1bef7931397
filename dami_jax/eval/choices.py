"""Multiple-choice questions: option letters, options written into a question, options read back
out of one (MathVerse keeps them in the question text), and golds as letters.

Options are lettered A, B, C, ... in order. A gold is stored as its option's letter, whether the
data gives the letter (MATH-Vision, MathVerse) or the option's text (MathVista).
"""

from __future__ import annotations

import re
import string
from typing import Sequence

from dami_jax.errors import InputError

LETTERS = string.ascii_uppercase
# "A: 35°", "(B) 55", "C. 65": a letter, a closing mark, the option's text.
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])\s*[):.：]\s*(.+?)\s*$")
_CHOICES_HEAD = re.compile(r"(?im)^\s*(?:answer\s+)?(?:choices|options)\s*:?\s*$")


def letter(index: int) -> str:
    if not 0 <= index < len(LETTERS):
        raise InputError(f"option index {index} out of range: at most {len(LETTERS)} options")
    return LETTERS[index]


def render(question: str, choices: Sequence[str]) -> str:
    """The question with its options below it, one `(A) text` per line."""
    lines = [f"({letter(i)}) {c}" for i, c in enumerate(choices)]
    return question.rstrip() + "\nChoices:\n" + "\n".join(lines)


def parse_from_text(text: str) -> tuple[str, ...]:
    """The options listed under a `Choices:` line (`A: text`, `(B) text`, `C. text`), lettered
    from A without gaps; () when there is no such list."""
    head = _CHOICES_HEAD.search(text)
    if head is None:
        return ()
    options = []
    for line in text[head.end():].splitlines():
        match = _OPTION_LINE.match(line)
        if match is None:
            if line.strip():
                break
            continue
        if match.group(1) != letter(len(options)):
            break
        options.append(match.group(2))
    return tuple(options)


def gold_letter(gold: str, choices: Sequence[str], where: str) -> str:
    """The letter of the gold option: the gold is a letter of the options, or one option's text."""
    text = str(gold).strip()
    bare = text.strip("()").strip()
    if len(bare) == 1 and bare.upper() in LETTERS[: len(choices)]:
        return bare.upper()
    matches = [i for i, c in enumerate(choices) if str(c).strip() == text]
    if len(matches) != 1:
        raise InputError(f"{where}: the answer {text!r} is neither an option letter "
                         f"({LETTERS[:len(choices)]}) nor exactly one option's text of {list(choices)}")
    return letter(matches[0])
