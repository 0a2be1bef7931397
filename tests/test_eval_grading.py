"""Grading (Math-Verify), prompts and benchmark loaders on local JSONL fixtures."""

import importlib.util
import json
import threading

import pytest

from dami_jax.eval import benchmarks as B
from dami_jax.eval import grading as G

requires_mv = pytest.mark.skipif(importlib.util.find_spec("math_verify") is None, reason="math-verify not installed")


# ---------------------------------------------------------------- grading


@requires_mv
@pytest.mark.parametrize(
    "output, gold",
    [
        (r"So the result is \boxed{1/2}.", "0.5"),
        (r"\boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{\dfrac{14}{3}}", r"\frac{14}{3}"),
        (r"\boxed{x=3}", "3"),
        (r"\boxed{1,234}", "1234"),
        (r"\boxed{1{,}234}", "1234"),
        (r"\boxed{(1, 2)}", "(1,2)"),
        (r"\boxed{3\sqrt{13}}", r"3\sqrt{13}"),
        (r"\boxed{18.90}", r"\$18.90"),
        (r"\boxed{27}", "27.0"),
        ("Therefore, the final answer is $42$.", "42"),
    ],
)
def test_equivalent_answers_are_correct(output, gold):
    g = G.grade(output, gold)
    assert g == G.Grade(correct=True, gradable=True, pred=g.pred)
    assert g.pred is not None


@requires_mv
def test_wrong_answer_is_gradable_but_wrong():
    g = G.grade(r"\boxed{1235}", "1234")
    assert (g.correct, g.gradable, g.pred) == (False, True, "1235")


@requires_mv
def test_gsm8k_gold_extracted_and_graded():
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 1,072"
    gold = B.extract_gsm8k_answer(solution)
    assert gold == "1072"
    assert G.grade(r"She sold \boxed{1072} clips.", gold).correct
    assert G.grade(r"\boxed{1,072}", gold).correct
    assert not G.grade(r"\boxed{1071}", gold).correct


@requires_mv
def test_no_boxed_answer_strict_is_ungradable_lenient_reads_it():
    # Documented choice: strict mode (default) needs \boxed{} or "final answer is $...$".
    out = "The answer is 42."
    assert G.grade(out, "42") == G.Grade(correct=False, gradable=False, pred=None)
    assert G.grade(out, "42", mode="lenient") == G.Grade(correct=True, gradable=True, pred="42")


@requires_mv
@pytest.mark.parametrize("output", ["", "I do not know.", r"\boxed{", "\x00\x01 }}}{{{ \\frac{", "</think>"])
def test_unparseable_outputs_never_crash(output):
    g = G.grade(output, "3")
    assert g == G.Grade(correct=False, gradable=False, pred=None)


@requires_mv
def test_thinking_before_last_think_end_is_ignored():
    wrong_in_thought = r"Maybe \boxed{7}? No, let me recheck.</think>The answer is \boxed{42}."
    assert G.grade(wrong_in_thought, "42").correct
    right_in_thought = r"I get \boxed{42}.</think>Final: \boxed{7}"
    g = G.grade(right_in_thought, "42")
    assert (g.correct, g.gradable, g.pred) == (False, True, "7")
    # Only the part after the *last* </think> counts.
    two = r"\boxed{1}</think>\boxed{2}</think>\boxed{3}"
    assert G.grade(two, "3").correct and not G.grade(two, "2").correct
    # Truncated thinking without </think> and without a boxed answer: ungradable.
    assert not G.grade("Let me think about 42 and", "42").gradable


def test_has_thinking():
    # split_thinking itself is pinned in test_thinking.py
    assert G.has_thinking("x</think>") and not G.has_thinking("<think>x")


@requires_mv
def test_grading_off_main_thread_runs_without_signal_timeout():
    results = []
    t = threading.Thread(target=lambda: results.append(G.grade(r"\boxed{\frac{1}{2}}", "0.5", timeout_s=2)))
    t.start()
    t.join(timeout=60)
    assert results == [G.Grade(correct=True, gradable=True, pred="1/2")]


@requires_mv
def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        G.grade(r"\boxed{1}", "1", mode="fuzzy")
    with pytest.raises(ValueError, match="timeout_s"):
        G.grade(r"\boxed{1}", "1", timeout_s=0.5)
    with pytest.raises(ValueError, match="gold must be a non-empty string"):
        G.grade(r"\boxed{1}", "  ")


# ---------------------------------------------------------------- prompts


def test_math_prompt():
    p = B.math_prompt("What is 1+1?")
    assert p == "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert B.math_prompt("Q?", instruction="Answer briefly.") == "Q?\nAnswer briefly."
    assert B.math_prompt("Q?", instruction=None) == "Q?"
    with pytest.raises(ValueError, match="non-empty"):
        B.math_prompt("")


# ---------------------------------------------------------------- loaders


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_local_jsonl_with_field_mapping(tmp_path):
    path = _write_jsonl(tmp_path / "mine.jsonl", [
        {"uid": "a", "problem": "What is 2+2?", "final": 4},
        {"uid": "b", "problem": "Half of 1?", "final": "\\frac{1}{2}"},
    ])
    fields = B.FieldMap(question="problem", answer="final", id="uid")
    problems = B.load_benchmark(str(path), fields=fields)
    assert problems == [B.Problem("a", "What is 2+2?", "4"), B.Problem("b", "Half of 1?", "\\frac{1}{2}")]
    assert B.load_jsonl(path, fields, limit=1) == problems[:1]
    with pytest.raises(Exception):  # frozen
        problems[0].gold = "5"


def test_local_jsonl_numbers_rows_without_id_field(tmp_path):
    path = _write_jsonl(tmp_path / "noid.jsonl", [{"question": "q1", "answer": 27.0}, {"question": "q2", "answer": 3}])
    problems = B.load_jsonl(path, B.FieldMap(id=None))
    assert [p.id for p in problems] == ["noid.jsonl-0", "noid.jsonl-1"]
    assert [p.gold for p in problems] == ["27", "3"]  # float golds lose the spurious .0


def test_gsm8k_fixture_through_builtin_field_map(tmp_path):
    path = _write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Tom has 3 apples and buys 39 more. How many?", "answer": "3+39=42\n#### 42"},
        {"question": "Big sum?", "answer": "work\n#### 1,234"},
    ])
    problems = B.load_jsonl(path, B.BENCHMARKS["gsm8k"].fields)
    assert [p.gold for p in problems] == ["42", "1234"]
    assert problems[0].id == "gsm8k.jsonl-0"


def test_builtin_benchmarks_cover_the_issue():
    assert B.known_benchmarks() == ["aime24", "aime25", "amc23", "gsm8k", "math500", "mathverse", "mathvision",
                                    "mathvista"]
    assert B.BENCHMARKS["gsm8k"].path == "openai/gsm8k" and B.BENCHMARKS["gsm8k"].config == "main"
    assert B.BENCHMARKS["math500"].path == "HuggingFaceH4/MATH-500"


def test_missing_field_error_names_field_and_row(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "1", "id": 0}, {"question": "q", "id": 1}])
    with pytest.raises(ValueError, match=r"bad.jsonl row 1: missing field\(s\) \['answer'\]; the row has fields \['id', 'question'\]"):
        B.load_jsonl(path)


def test_loader_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown benchmark 'gsm9k'; known: \['aime24', 'aime25', 'amc23', 'gsm8k', "
                                         r"'math500', 'mathverse'"):
        B.load_benchmark("gsm9k")
    with pytest.raises(FileNotFoundError, match="benchmark file not found"):
        B.load_benchmark(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"question": "q", "answer": "1", "id": 1}\n{not json\n')
    with pytest.raises(ValueError, match="broken.jsonl line 2: invalid JSON"):
        B.load_jsonl(bad)
    dup = _write_jsonl(tmp_path / "dup.jsonl", [{"question": "q", "answer": "1", "id": 1}] * 2)
    with pytest.raises(ValueError, match="duplicate id '1'"):
        B.load_jsonl(dup)
    with pytest.raises(ValueError, match="no '#### <answer>' marker"):
        B.extract_gsm8k_answer("no marker here")
    with pytest.raises(ValueError, match="FieldMap.gold must be one of"):
        B.FieldMap(gold="mmlu")
