"""The toy world's language: chained mod-10 arithmetic, its traces and its grading.

A problem of difficulty k is a chain of k operations on single digits, evaluated
left to right mod 10: `3+4*7-2` means ((3+4)*7-2) mod 10 = 7. The question is
written in fixed-width slots (`3+4*7-2______`, MAX_OPS operator/operand pairs,
blank ones as `__`), so every prompt has the same length and the operand of step
i always sits at the same position: the model never has to search for it.

Two ways to answer, after the chat template's `<think>\\n`:
- direct (System 1):  `\\boxed{7}`
- thinking (System 2): one line per slot of the whole form, `a op b=c` (blank
  slots as `c__=c`: the value is unchanged), a blank line, then a verification
  pass that recomputes the k real steps once more, then `</think>`, a blank line
  and `\\boxed{7}`.

The first pass is deliberately indiscriminate: it walks all MAX_OPS slots, so it
costs as much for k=1 as for k=6. Thinking thus costs 6k + 44 tokens (EOS
included: 50 for k=1 ... 80 for k=6) against 4 for a direct answer, and the
waste is largest on easy problems, as with real thinking models; that is the
headroom a per-query λ has to find. Walking the fixed-width form first keeps
every line's lookup at a position that depends on the line number only (never
on k). With the verification pass over all slots placed after the k-line work
instead, its lines read k-dependent positions, and in a trial run that is where
the small model erred (it copied the wrong operand, then boxed the wrong answer).

A `World` names what differs between toy worlds (docs/toyworld_v2.md). v1 has the
two styles above. v2 adds a third, `work`: the form walk alone, then `</think>` and
the answer (43 tokens at every k): the trace without its re-check. And v2's
re-check slips on easy problems (k <= slip_max_k) whose last operation is a
subtraction: its last line reads the `-` as `+`, and the answer follows the
re-check (overthinking that talks itself out of a right answer).

Every token is one string of VOCAB, so token lists map to ids without a
tokenizer; `tokenizer.py` builds the equivalent Hugging Face tokenizer.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from dami_jax.thinking import THINK_END, THINK_START, split_thinking

MAX_OPS = 6
OPS = ("+", "-", "*")
BLANK = "_"
NEWLINE = "\n"
BOX_OPEN, BOX_CLOSE = "\\boxed{", "}"
THINK = THINK_START  # Qwen3's tags, so split_thinking and the budget cut apply to the toy pair
PAD, IM_START, IM_END, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"
ROLES = ("system", "user", "assistant")
EOS = IM_END

# Digit d has id d. Multi-character words and template tokens come after.
WORDS = tuple("0123456789") + OPS + ("=", BLANK, NEWLINE, BOX_OPEN, BOX_CLOSE) + ROLES + (THINK, THINK_END)
SPECIAL = (PAD, IM_START, IM_END, UNK)
VOCAB = WORDS + SPECIAL
TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}
PAD_ID, EOS_ID = TOKEN_ID[PAD], TOKEN_ID[EOS]


@dataclasses.dataclass(frozen=True)
class World:
    """What differs between toy worlds (their problems and grading are the same)."""

    name: str
    # The re-check of a problem with k <= slip_max_k whose last op is `-` reads it as `+` (0: never).
    slip_max_k: int = 0

    def __post_init__(self):
        if not 0 <= self.slip_max_k <= MAX_OPS:
            raise ValueError(f"world {self.name!r}: slip_max_k must be in 0..{MAX_OPS}, got {self.slip_max_k}")

    def slips(self, problem: Problem) -> bool:
        return problem.k <= self.slip_max_k and problem.ops[-1] == "-"


V1 = World("v1")
V2 = World("v2", slip_max_k=2)
WORLDS = {w.name: w for w in (V1, V2)}


def get_world(name: str) -> World:
    if name not in WORLDS:
        raise ValueError(f"unknown toy world {name!r}; expected one of {sorted(WORLDS)}")
    return WORLDS[name]


def apply_op(a: int, op: str, b: int) -> int:
    if op == "+":
        return (a + b) % 10
    if op == "-":
        return (a - b) % 10
    if op == "*":
        return (a * b) % 10
    raise ValueError(f"unknown operator {op!r}; expected one of {OPS}")


@dataclasses.dataclass(frozen=True)
class Problem:
    """operands a0..ak (digits) and ops op1..opk; difficulty k = len(ops)."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]

    def __post_init__(self):
        if not 1 <= len(self.ops) <= MAX_OPS or len(self.operands) != len(self.ops) + 1:
            raise ValueError(f"a problem needs 1..{MAX_OPS} ops and one more operand, got {self}")
        if any(not 0 <= a <= 9 for a in self.operands) or any(op not in OPS for op in self.ops):
            raise ValueError(f"operands must be digits and ops in {OPS}, got {self}")

    @property
    def k(self) -> int:
        return len(self.ops)

    def steps(self) -> list[tuple[int, str, int, int]]:
        """(value before, op, operand, value after) for each operation."""
        out, value = [], self.operands[0]
        for op, b in zip(self.ops, self.operands[1:]):
            new = apply_op(value, op, b)
            out.append((value, op, b, new))
            value = new
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]

    @property
    def text(self) -> str:
        """The fixed-width question, e.g. `3+4*7-2______`."""
        pairs = "".join(op + str(b) for op, b in zip(self.ops, self.operands[1:]))
        return str(self.operands[0]) + pairs + BLANK * 2 * (MAX_OPS - self.k)


def parse_problem(text: str) -> Problem:
    """Inverse of `Problem.text`; blanks and spaces are optional."""
    m = re.fullmatch(r"(\d)((?:[-+*]\d){1,%d})_*" % MAX_OPS, text.replace(" ", ""))
    if not m:
        raise ValueError(f"not a toy-world problem: {text!r}; expected e.g. '3+4*7-2' (digits, + - *)")
    rest = m.group(2)
    return Problem((int(m.group(1)),) + tuple(int(c) for c in rest[1::2]), tuple(rest[0::2]))


def sample_problem(rng: np.random.Generator, k: int) -> Problem:
    operands = tuple(int(x) for x in rng.integers(0, 10, k + 1))
    ops = tuple(OPS[int(i)] for i in rng.integers(0, len(OPS), k))
    return Problem(operands, ops)


def sample_problems(n: int, seed: int, ks=tuple(range(1, MAX_OPS + 1))) -> list[Problem]:
    """n problems, deterministic in seed; difficulties cycle through ks (balanced)."""
    rng = np.random.default_rng(seed)
    return [sample_problem(rng, ks[i % len(ks)]) for i in range(n)]


# ---------------------------------------------------------------------------
# Token lists (strings of VOCAB). Prompts match the chat template exactly.

def prompt_tokens(problem: Problem) -> list[str]:
    """The chat-templated user turn plus generation prompt (ends with `<think>\\n`)."""
    return [IM_START, "user", NEWLINE, *problem.text, IM_END, NEWLINE,
            IM_START, "assistant", NEWLINE, THINK, NEWLINE]


def _line(a: int, op: str, b: int | str, c: int) -> list[str]:
    return [str(a), op, str(b), "=", str(c), NEWLINE]


def boxed_tokens(answer: int) -> list[str]:
    return [BOX_OPEN, str(answer), BOX_CLOSE]


def direct_tokens(problem: Problem) -> list[str]:
    """System 1's completion: the boxed answer and EOS (never `</think>`)."""
    return boxed_tokens(problem.answer) + [EOS]


def form_tokens(problem: Problem) -> list[str]:
    """The form walk: one line per slot of the fixed-width form, blank slots as `c__=c`."""
    final = problem.answer
    blanks = [(final, BLANK, BLANK, final)] * (MAX_OPS - problem.k)
    return [t for s in problem.steps() + blanks for t in _line(*s)]


def _close(answer: int) -> list[str]:
    return [THINK_END, NEWLINE, NEWLINE] + boxed_tokens(answer) + [EOS]


def recheck_steps(problem: Problem, world: World = V1) -> list[tuple[int, str, int, int]]:
    """The re-check's lines: the real steps again, the last one slipped where the world slips."""
    steps = problem.steps()
    if world.slips(problem):
        a, _, b, _ = steps[-1]
        steps[-1] = (a, "+", b, apply_op(a, "+", b))
    return steps


def thinking_tokens(problem: Problem, world: World = V1) -> list[str]:
    """System 2's completion: the form walk, the real steps again (the re-check), the re-check's
    last value as the answer, EOS."""
    recheck = recheck_steps(problem, world)
    return (form_tokens(problem) + [NEWLINE] + [t for s in recheck for t in _line(*s)]
            + _close(recheck[-1][3]))


def work_tokens(problem: Problem) -> list[str]:
    """The trace without its re-check (v2): the form walk, then its last value as the answer."""
    return form_tokens(problem) + _close(problem.answer)


STYLES = ("direct", "work", "recheck")


def answer_tokens(problem: Problem, style: str, world: World = V1) -> list[str]:
    """The completion of one style: `direct`, `work` or `recheck` (= thinking_tokens)."""
    if style == "direct":
        return direct_tokens(problem)
    if style == "work":
        return work_tokens(problem)
    if style == "recheck":
        return thinking_tokens(problem, world)
    raise ValueError(f"unknown answer style {style!r}; expected one of {STYLES}")


def to_ids(tokens: list[str]) -> list[int]:
    return [TOKEN_ID[t] for t in tokens]


def decode(ids) -> str:
    """Token ids -> text; PAD is dropped (the output after EOS)."""
    return "".join(VOCAB[int(i)] for i in ids if int(i) != PAD_ID)


# ---------------------------------------------------------------------------
# Grading: only the part after the last `</think>` counts (DESIGN 2.3).

_BOXED = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")


def parse_answer(output_text: str) -> int | None:
    """The last `\\boxed{n}` after the last `</think>` (whole text if none), else None."""
    answer_part = split_thinking(output_text)[1]
    found = _BOXED.findall(answer_part)
    return int(found[-1]) if found else None


def grade(problem: Problem, output_text: str) -> bool:
    return parse_answer(output_text) == problem.answer
