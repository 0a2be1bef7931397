"""Eval harness pieces: benchmark loaders and prompts, Math-Verify grading,
metrics, resumable per-sample records and Pareto plots.

Heavy dependencies load lazily: `datasets` on the first hub benchmark,
`math_verify` on the first grade, matplotlib on the first plot.
"""

from dami_jax.eval.benchmarks import (
    BENCHMARKS,
    CHOICE_INSTRUCTION,
    DEFAULT_INSTRUCTION,
    FieldMap,
    HubBenchmark,
    Problem,
    extract_gsm8k_answer,
    known_benchmarks,
    load_benchmark,
    load_jsonl,
    math_prompt,
    problem_messages,
    problem_prompt,
    rows_to_problems,
)
from dami_jax.eval.grading import (
    THINK_END,
    Grade,
    answer_text,
    grade,
    grade_choice,
    has_thinking,
    parse_gold,
    split_thinking,
)
from dami_jax.eval.metrics import (
    RECORD_FIELDS,
    majority_vote,
    mean_accuracy,
    pass_at_k,
    speedup,
    summarize,
    summarize_by_policy,
    thinking_share,
    token_stats,
    tokens_per_second,
)
from dami_jax.eval.plots import pareto_front, pareto_plot
from dami_jax.eval.records import RecordStore, make_record, record_key, rescore

__all__ = [
    "BENCHMARKS", "CHOICE_INSTRUCTION", "DEFAULT_INSTRUCTION", "FieldMap", "HubBenchmark", "Problem",
    "extract_gsm8k_answer", "known_benchmarks", "load_benchmark", "load_jsonl", "math_prompt", "problem_messages",
    "problem_prompt", "rows_to_problems",
    "THINK_END", "Grade", "answer_text", "grade", "grade_choice", "has_thinking", "parse_gold", "split_thinking",
    "RECORD_FIELDS", "majority_vote", "mean_accuracy", "pass_at_k", "speedup", "summarize",
    "summarize_by_policy", "thinking_share", "token_stats", "tokens_per_second",
    "pareto_front", "pareto_plot", "RecordStore", "make_record", "record_key", "rescore",
]
