"""A set of problems named by a small spec: a known benchmark (any split), a local `.jsonl`, or `toy`.

The spec is what `dami eval --bench` names, with the options a training run
needs on top (a train split, a field map, a size):

    toy                                    # the eval's 300 toy problems
    {name: toy, limit: 600, seed: 1234}    # 600 toy problems of another seed
    {name: gsm8k, split: train}            # GSM8K's train split (the eval uses test)
    {name: data/train.jsonl, fields: {question: problem, answer: solution, id: null}}
    {name: mathvista, path: data/MathVista}  # a local copy of a hub benchmark, read as the hub one
    {name: data/figures.jsonl, fields: {images: image, choices: options}}  # image paths beside the file

`ProblemSet.of(value)` reads a string or a mapping (unknown keys and options
that do not apply to the source are errors); `load_problem_set` loads it.
"""

from __future__ import annotations

import dataclasses

from dami_jax.config import ConfigError, from_dict
from dami_jax.eval.benchmarks import BENCHMARKS, FieldMap, Problem, load_benchmark

TOY = "toy"
TOY_SEED = 20261127  # the eval's toy problems


@dataclasses.dataclass(frozen=True)
class ProblemSet:
    name: str  # "toy", a key of BENCHMARKS, or a path to a .jsonl file
    split: str | None = None  # hub benchmarks: the split (None: the benchmark's eval split)
    limit: int | None = None  # the first rows (toy: how many problems, default 300)
    fields: FieldMap | None = None  # .jsonl (or hub override): which fields hold question, answer, id
    seed: int | None = None  # toy only: the problems' seed (default the eval's)
    path: str | None = None  # hub benchmarks: a local copy (its directory) read in place of the hub id

    def __post_init__(self):
        where = f"problem set {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"problem set: name must be 'toy', a benchmark {sorted(BENCHMARKS)} or a .jsonl path, "
                              f"got {self.name!r}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"{where}: limit must be >= 1 or null, got {self.limit}")
        is_toy, is_hub = self.name == TOY, self.name in BENCHMARKS
        if self.seed is not None and not is_toy:
            raise ConfigError(f"{where}: seed applies to the toy problems only")
        if self.split is not None and not is_hub:
            raise ConfigError(f"{where}: split applies to hub benchmarks {sorted(BENCHMARKS)} only")
        if self.path is not None and not is_hub:
            raise ConfigError(f"{where}: path (a local copy of a hub benchmark) applies to {sorted(BENCHMARKS)} only")
        if self.fields is not None and is_toy:
            raise ConfigError(f"{where}: the toy problems take no field map")
        if not (is_toy or is_hub or self.name.endswith(".jsonl")):
            raise ConfigError(f"unknown problem set {self.name!r}; expected 'toy', one of {sorted(BENCHMARKS)} "
                              "or a path ending in .jsonl")

    @classmethod
    def of(cls, value, where: str = "problem set") -> "ProblemSet":
        """A spec from a name, a mapping (see the module docstring) or a ProblemSet."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, dict):
            return from_dict(cls, value, where=where)
        raise ConfigError(f"{where}: expected a name or a mapping {{name, split, limit, fields, seed, path}}, "
                          f"got {value!r}")


def toy_problems(n: int, seed: int) -> list[Problem]:
    """n toy problems of every difficulty k = 1..6 (balanced), deterministic in seed."""
    from dami_jax.toyworld import language as L

    return [Problem(f"toy-k{p.k}-{i}", p.text, str(p.answer)) for i, p in enumerate(L.sample_problems(n, seed))]


def load_problem_set(spec) -> list[Problem]:
    """The problems a spec names (a string, a mapping or a ProblemSet)."""
    spec = ProblemSet.of(spec)
    if spec.name == TOY:
        return toy_problems(spec.limit or 300, TOY_SEED if spec.seed is None else spec.seed)
    return load_benchmark(spec.name, limit=spec.limit, fields=spec.fields, split=spec.split, data_path=spec.path)
