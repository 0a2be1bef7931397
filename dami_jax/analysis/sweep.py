"""The static λ sweep that `frontier` and `think-ratio` read: a run's records, or a fresh sweep.

Records are `dami eval`/`dami sweep`'s (eval/records.py), one per (policy, id,
sample); only the `static:<λ>` policies are read, so an eval run that holds a
static sweep among other policies serves as well. A fresh sweep writes the same
records (`OUT/records_<bench>.jsonl`, resumed per λ), but generates each λ once:
`dami sweep` also times every policy after an untimed warm-up pass, which
doubles a toy sweep's work and is not needed here.
"""

from __future__ import annotations

import glob
import os

from tqdm.auto import tqdm

from dami_jax.errors import InputError
from dami_jax.eval.records import RecordStore, make_record

STATIC = "static:"


def static_lam(policy: str) -> float | None:
    """λ of a `static:<λ>` policy spec, None for any other policy."""
    return float(policy[len(STATIC):]) if policy.startswith(STATIC) else None


def static_records(records: list[dict], where: str) -> list[dict]:
    """The records of static policies; an error naming `where` when there are none."""
    out = [r for r in records if static_lam(r["policy"]) is not None]
    if not out:
        found = sorted({r["policy"] for r in records})
        raise InputError(f"{where}: no static:<λ> records (policies found: {found}); run `dami sweep` first")
    return out


def load_sweep(path: str) -> dict[str, list[dict]]:
    """{benchmark: static records} of a run directory (its records_<bench>.jsonl) or one records file."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "records_*.jsonl")))
        if not files:
            raise InputError(f"{path}: no records_<bench>.jsonl (expected a `dami sweep` or `dami eval` run)")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such run directory or records file")
    out = {}
    for f in files:
        bench = os.path.basename(f)[:-len(".jsonl")].removeprefix("records_")
        out[bench] = static_records(RecordStore(f).load(), f)
    return out


def run_sweep(pair, pair_cfg, benches: dict, lams: list[float], out_dir: str, *, seed: int = 0,
              progress: bool = True) -> dict[str, list[dict]]:
    """Greedy answers of every problem at every λ, graded, in `out_dir/records_<bench>.jsonl`
    (records as `dami sweep` writes them; λ already there are not generated again).
    benches: {name: problems}. Returns {bench: the static records of those λ}."""
    from dami_jax.eval.run import eval_prompts
    from dami_jax.pair import generate_pair

    os.makedirs(out_dir, exist_ok=True)
    out = {}
    for bench, problems in benches.items():
        store = RecordStore(os.path.join(out_dir, f"records_{bench}.jsonl"))
        done = store.done_keys()
        prompts = eval_prompts(pair, pair_cfg, problems)
        specs = {lam: f"{STATIC}{lam:g}" for lam in lams}
        todo = [lam for lam in lams if any((specs[lam], p.id, 0) not in done for p in problems)]
        for lam in tqdm(todo, desc=f"sweep {bench}", disable=not progress, leave=False):
            gen = generate_pair(pair, prompts, lam, pair_cfg.max_new_tokens, seed=seed, **pair_cfg.engine_size())
            texts = [pair.tokenizer.decode(ids, skip_special_tokens=True) for ids in gen.token_lists()]
            store.extend(make_record(specs[lam], p.id, 0, text, p.gold, int(n), lam=lam, finish_reason=reason)
                         for p, text, n, reason in zip(problems, texts, gen.lengths, gen.finish_reasons))
        wanted, ids = set(specs.values()), {p.id for p in problems}  # not other λ or problems of an earlier run
        out[bench] = [r for r in store.load() if r["policy"] in wanted and r["id"] in ids and r["sample"] == 0]
    return out
