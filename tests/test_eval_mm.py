"""Multimodal math benchmarks: MathVista, MathVerse and MATH-Vision loaded from tiny local copies
in their hub schemas (through the hub code path), a local JSONL with image paths, multiple-choice
grading by option letter or value, and the prompt a problem becomes (tiny offline processor)."""

from __future__ import annotations

import importlib.util
import io
import json

import numpy as np
import pytest

from mm_helpers import png_bytes, random_image, save_tiny_processor

from dami_jax.errors import InputError
from dami_jax.eval import benchmarks as B
from dami_jax.eval import choices as C
from dami_jax.eval import grading as G
from dami_jax.eval.problem_sets import ProblemSet, load_problem_set
from dami_jax.eval.records import make_record, rescore

datasets = pytest.importorskip("datasets")
requires_mv = pytest.mark.skipif(importlib.util.find_spec("math_verify") is None, reason="math-verify not installed")

IMAGES = [random_image(40, 60, 1), random_image(64, 32, 2), random_image(50, 50, 3)]


def _pixels(source) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(source) if isinstance(source, bytes) else source).convert("RGB"))


# --- tiny copies in the hub schemas (fields read from the dataset cards) ------------------------

def _write_hub_copy(root, columns: dict, features: dict, parquet: str, readme: str | None = None) -> str:
    root.mkdir(parents=True, exist_ok=True)
    data = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    (root / parquet).parent.mkdir(parents=True, exist_ok=True)
    data.to_parquet(str(root / parquet))
    if readme:
        (root / "README.md").write_text(readme)
    return str(root)


S, IMG = datasets.Value("string"), datasets.Image()


@pytest.fixture(scope="module")
def mathvista(tmp_path_factory):
    """AI4Math/MathVista: golds are option texts; free-form rows have no choices; `data/testmini-*`."""
    columns = {
        "pid": ["1", "2", "3"],
        "question": ["Which angle is larger?", "How many bars are there?", "Find y."],
        "image": ["images/1.jpg", "images/2.jpg", "images/3.jpg"],
        "decoded_image": IMAGES,
        "choices": [["30°", "60°"], None, ["1", "2", "3"]],
        "unit": [None, None, None],
        "precision": [None, None, 1.0],
        "answer": ["60°", "4", "3"],
        "question_type": ["multi_choice", "free_form", "multi_choice"],
        "answer_type": ["text", "integer", "text"],
        "query": [  # the official prompt: a hint, the question, its options
            "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n"
            "Question: Which angle is larger?\nChoices:\n(A) 30°\n(B) 60°",
            "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, "
            "3, at the end.\nQuestion: How many bars are there?",
            "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n"
            "Question: Find y.\nChoices:\n(A) 1\n(B) 2\n(C) 3"],
    }
    features = {"pid": S, "question": S, "image": S, "decoded_image": IMG, "choices": datasets.Sequence(S),
                "unit": S, "precision": datasets.Value("float64"), "answer": S, "question_type": S,
                "answer_type": S, "query": S}
    return _write_hub_copy(tmp_path_factory.mktemp("MathVista"), columns, features,
                           "data/testmini-00000-of-00001.parquet")


@pytest.fixture(scope="module")
def mathverse(tmp_path_factory):
    """AI4Math/MathVerse: config and split `testmini`; options live in the question text."""
    columns = {
        "sample_index": ["1", "2"],
        "problem_index": ["1", "2"],
        "problem_version": ["Text Dominant", "Vision Only"],
        "question": ["As shown in the figure, find the angle.\nChoices:\nA:35°\nB:55°\nC:65°\nD:75°",
                     "Find the length of AB."],
        "image": IMAGES[:2],
        "answer": ["B", "5"],
        "question_type": ["multi-choice", "free-form"],
        "query_wo": ["...", "..."],
        "query_cot": ["...", "..."],
    }
    features = {k: S for k in columns}
    features["image"] = IMG
    readme = ("---\nconfigs:\n- config_name: testmini\n  data_files:\n  - split: testmini\n"
              "    path: testmini.parquet\n---\n")
    return _write_hub_copy(tmp_path_factory.mktemp("MathVerse"), columns, features, "testmini.parquet", readme)


@pytest.fixture(scope="module")
def mathvision(tmp_path_factory):
    """MathLLMs/MathVision: golds are letters (or values when `options` is empty); `data/test-*`."""
    columns = {
        "id": ["1", "2"],
        "question": ["<image1>\nWhich figure comes next?", "<image1>\nHow many triangles?"],
        "options": [["A", "B", "C", "D", "E"], []],
        "image": ["images/1.jpg", "images/2.jpg"],
        "decoded_image": IMAGES[:2],
        "answer": ["C", "7"],
        "solution": [None, None],
        "level": [1, 2],
        "subject": ["logic", "counting"],
    }
    features = {"id": S, "question": S, "options": datasets.Sequence(S), "image": S, "decoded_image": IMG,
                "answer": S, "solution": S, "level": datasets.Value("int64"), "subject": S}
    return _write_hub_copy(tmp_path_factory.mktemp("MathVision"), columns, features,
                           "data/test-00000-of-00001.parquet")


def test_mathvista_local_copy_loads_through_the_hub_path(mathvista, tmp_path):
    problems = B.load_benchmark("mathvista", data_path=mathvista, cache_dir=str(tmp_path))
    assert [p.id for p in problems] == ["1", "2", "3"]
    mc, free, digits = problems
    assert mc.choices == ("30°", "60°") and mc.gold == "B"  # the gold's text -> its letter
    assert mc.question == "Which angle is larger?\nChoices:\n(A) 30°\n(B) 60°"
    assert free.choices == () and free.gold == "4" and free.question == "How many bars are there?"
    assert digits.gold == "C"  # an option text "3", not a letter
    for problem, image in zip(problems, IMAGES):
        assert len(problem.images) == 1 and isinstance(problem.images[0], bytes)  # encoded, decoded later
        np.testing.assert_array_equal(_pixels(problem.images[0]), np.asarray(image))


def test_mathvista_with_its_official_query_prompt(mathvista, tmp_path):
    """A field map override: the `query` as the question, its options read back out of it."""
    fields = B.FieldMap("query", "answer", "pid", images="decoded_image", choices="query")
    mc, free, digits = B.load_benchmark("mathvista", data_path=mathvista, fields=fields, cache_dir=str(tmp_path))
    assert mc.choices == ("30°", "60°") and mc.gold == "B" and mc.question.startswith("Hint: ")
    assert free.choices == () and free.gold == "4"
    assert digits.choices == ("1", "2", "3") and digits.gold == "C"


def test_mathverse_reads_the_options_from_the_question(mathverse, tmp_path):
    mc, free = B.load_benchmark("mathverse", data_path=mathverse, cache_dir=str(tmp_path))
    assert mc.id == "1" and mc.choices == ("35°", "55°", "65°", "75°") and mc.gold == "B"
    assert mc.question.endswith("D:75°") and mc.question.count("Choices") == 1  # shown once, as given
    assert free.choices == () and free.gold == "5"
    np.testing.assert_array_equal(_pixels(free.images[0]), np.asarray(IMAGES[1]))


def test_mathvision_letters_and_free_form(mathvision, tmp_path):
    mc, free = B.load_benchmark("mathvision", data_path=mathvision, cache_dir=str(tmp_path))
    assert mc.choices == tuple("ABCDE") and mc.gold == "C" and "(E) E" in mc.question
    assert free.choices == () and free.gold == "7"
    assert B.load_benchmark("mathvision", data_path=mathvision, cache_dir=str(tmp_path), limit=1) == [mc]


def test_problem_set_spec_with_a_local_copy(mathvision, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    spec = ProblemSet.of({"name": "mathvision", "path": mathvision, "limit": 1})
    assert [p.gold for p in load_problem_set(spec)] == ["C"]
    with pytest.raises(Exception, match="path .* applies to"):
        ProblemSet.of({"name": "toy", "path": mathvision})


def test_builtin_multimodal_benchmarks():
    for name, hub in (("mathvista", "AI4Math/MathVista"), ("mathverse", "AI4Math/MathVerse"),
                      ("mathvision", "MathLLMs/MathVision")):
        assert B.BENCHMARKS[name].path == hub and B.BENCHMARKS[name].multimodal
    assert B.BENCHMARKS["mathvista"].split == "testmini" and B.BENCHMARKS["mathverse"].config == "testmini"
    assert not B.BENCHMARKS["gsm8k"].multimodal


# --- local JSONL with image paths ---------------------------------------------------------------

def test_local_jsonl_with_image_paths(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes(IMAGES[0]))
    rows = [{"id": "a", "question": "Which?", "image": "img/a.png", "options": ["1", "2"], "answer": "B"},
            {"id": "b", "question": "Two?", "image": ["img/a.png", "img/a.png"], "options": [], "answer": "2"}]
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    fields = B.FieldMap("question", "answer", "id", images="image", choices="options")
    a, b = B.load_benchmark(str(path), fields=fields)
    assert a.images == (str(tmp_path / "img" / "a.png"),) and a.gold == "B" and a.choices == ("1", "2")
    assert len(b.images) == 2 and b.choices == ()
    spec = ProblemSet.of({"name": str(path), "fields": {"images": "image", "choices": "options"}})
    assert load_problem_set(spec) == [a, b]
    with pytest.raises(InputError, match="neither an option letter"):
        B.rows_to_problems([{**rows[0], "answer": "3"}], fields, "x")
    with pytest.raises(InputError, match="missing field"):
        B.rows_to_problems([{"id": "c", "question": "q", "answer": "1"}], fields, "x")


# --- options ----------------------------------------------------------------------------------

def test_choices_render_parse_and_gold_letters():
    shown = C.render("Q?", ["1", "x+1"])
    assert shown == "Q?\nChoices:\n(A) 1\n(B) x+1"
    assert C.parse_from_text(shown) == ("1", "x+1")
    assert C.parse_from_text("Q\nChoices:\nA. one\nB. two\n\nmore text") == ("one", "two")
    assert C.parse_from_text("Q\nChoices:\nA: one\nC: three") == ("one",)  # letters without gaps
    assert C.parse_from_text("no options here") == ()
    assert C.gold_letter("(b)", ["1", "2"], "w") == "B" and C.gold_letter("2", ["1", "2"], "w") == "B"
    with pytest.raises(InputError, match="neither an option letter"):
        C.gold_letter("C", ["1", "2"], "row 3")


@requires_mv
@pytest.mark.parametrize("output, correct, pred", [
    (r"\boxed{B}", True, "B"),
    (r"so \boxed{(B)}.", True, "B"),
    (r"\boxed{\text{B}}", True, "B"),
    (r"\boxed{B. 55°}", True, "B"),
    (r"\boxed{55^\circ}", True, "B"),  # the option's value, not its letter
    (r"\boxed{55}", True, "B"),
    (r"\boxed{\frac{1}{2}}", False, "C"),  # the value of option C (0.5)
    (r"\boxed{A}", False, "A"),
    (r"\boxed{99}", False, None),  # a value of no option: gradable, wrong
    (r"I boxed \boxed{B} while thinking</think> the answer is \boxed{A}", False, "A"),
])
def test_multiple_choice_graded_by_letter_or_value(output, correct, pred):
    options = ("35°", "55°", "0.5", "x+1")
    assert G.grade(output, "B", choices=options) == G.Grade(correct, True, pred)


@requires_mv
def test_multiple_choice_strict_and_lenient():
    options = ("1", "2")
    assert G.grade("The answer is (B).", "B", choices=options) == G.Grade(False, False, None)
    assert G.grade("The answer is (B).", "B", choices=options, mode="lenient") == G.Grade(True, True, "B")
    assert G.grade("Answer: 2", "B", choices=options, mode="lenient") == G.Grade(True, True, "B")
    with pytest.raises(ValueError, match="option letters"):
        G.grade(r"\boxed{A}", "C", choices=options)


@requires_mv
def test_records_keep_the_options_so_rescoring_grades_alike():
    record = make_record("static:1", "p1", 0, r"\boxed{55°}", "B", 5, choices=("35°", "55°"))
    assert record["correct"] and record["pred"] == "B" and record["choices"] == ["35°", "55°"]
    assert rescore([record])[0]["correct"]
    plain = make_record("static:1", "p2", 0, r"\boxed{4}", "4", 5)
    assert "choices" not in plain and plain["correct"]


# --- the prompt a problem becomes -----------------------------------------------------------

def test_problem_messages_through_the_processor(mathvista, tmp_path):
    from dami_jax.multimodal import encode_chats, load_processor

    processor = load_processor(save_tiny_processor(tmp_path / "processor"))
    mc, free, _ = B.load_benchmark("mathvista", data_path=mathvista, cache_dir=str(tmp_path))
    messages = B.problem_messages(mc)
    assert [p["type"] for p in messages[0]["content"]] == ["image", "text"]
    assert messages[0]["content"][1]["text"] == mc.question + "\n" + B.CHOICE_INSTRUCTION
    assert B.problem_messages(free, instruction=False)[0]["content"][1]["text"] == free.question
    features = encode_chats(processor, [messages, B.problem_messages(free)])
    grid = features["image_grid_thw"]
    assert grid.shape == (2, 3)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (features["input_ids"] == image_pad).sum() == np.prod(grid, 1).sum() // 4


def test_text_problems_keep_a_plain_message():
    problem = B.Problem("1", "2+2?", "4")
    assert B.problem_messages(problem) == [{"role": "user", "content": "2+2?\n" + B.DEFAULT_INSTRUCTION}]
    assert B.problem_prompt(problem, instruction=False) == "2+2?"


def test_eval_prompts_refuse_image_problems_clearly():
    from dami_jax.eval.pairs import toy_pair_config
    from dami_jax.eval.run import eval_prompts

    with pytest.raises(InputError, match=r"problems \['v1'\] have images"):
        eval_prompts(None, toy_pair_config(), [B.Problem("v1", "q", "1", images=(b"png",))])
