"""`split_thinking`, the one parser of thinking and answer (DESIGN 2.3), and who uses it."""

from __future__ import annotations

import pytest

import dami_jax as dj
from dami_jax.thinking import THINK_END, THINK_START, split_thinking


@pytest.mark.parametrize(
    "text, thinking, answer",
    [
        ("Let me add 2 and 2.</think>\n\nThe answer is 4.", "Let me add 2 and 2.", "The answer is 4."),
        # no </think>: no thinking, the whole (stripped) text is the answer
        ("Just 4.", None, "Just 4."),
        ("  plain answer \n", None, "plain answer"),
        ("", None, ""),
        ("<think>only an opening tag", None, "<think>only an opening tag"),  # cut off while thinking
        # several </think>: the last one splits, the earlier ones stay in the thinking
        ("a</think>b</think> c ", "a</think>b", "c"),
        (r"\boxed{1}</think>\boxed{2}</think>\boxed{3}", r"\boxed{1}</think>\boxed{2}", r"\boxed{3}"),
        # a stray leading <think> (a template that does not insert it) is not thinking text
        ("<think>\nhmm</think>4", "hmm", "4"),
        ("  <think>  hmm  </think>  4  ", "hmm", "4"),
        ("x <think>hmm</think>4", "x <think>hmm", "4"),  # only a leading one
        # whitespace around each part is trimmed; empty parts stay empty strings
        ("</think>4", "", "4"),
        ("\n\n</think>\n\n", "", ""),
        ("still thinking</think>", "still thinking", ""),
    ],
)
def test_split_thinking(text, thinking, answer):
    assert split_thinking(text) == (thinking, answer)


def test_one_split_thinking_everywhere():
    from dami_jax.eval import grading
    from dami_jax.generate import split_thinking as from_generate
    from dami_jax.policies import budget
    from dami_jax.serve import text
    from dami_jax.toyworld import language

    assert dj.split_thinking is from_generate is grading.split_thinking is text.split_thinking is split_thinking
    assert grading.THINK_END is budget.THINK_END is language.THINK_END is text.THINK_END is THINK_END
    assert (language.THINK, THINK_START, THINK_END) == ("<think>", "<think>", "</think>")
    # grading and the toy grader read the answer part split_thinking gives
    assert grading.answer_text(" <think>a</think>b</think> c ") == "c"
    assert language.parse_answer(r"\boxed{1}</think>\boxed{2} ") == 2
    assert language.parse_answer(r"\boxed{1}</think>") is None
