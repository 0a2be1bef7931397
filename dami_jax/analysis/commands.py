"""`dami analyze frontier|cka|barrier|think-ratio`: each writes OUT/<name>.json and its figures.

Everything that can be wrong (the λ grid, the benchmarks, a texts file, the
paths) is checked before a pair loads. `frontier` and `think-ratio` read a
sweep (`--run`: a `dami sweep`/`dami eval` run directory or records file) or
run one into OUT/sweep, which a rerun or the other command reuses.
"""

from __future__ import annotations

import os
import time

import numpy as np

from dami_jax.errors import InputError
from dami_jax.files import read_jsonl


def _progress(args) -> bool:
    return not args.no_progress


def _grid(lams: list[float]) -> list[float]:
    """The λ grid sorted; the analyses compare against both endpoints, so it holds 0 and 1."""
    lams = sorted(lams)
    if lams[0] != 0.0 or lams[-1] != 1.0 or len(lams) < 3:
        raise InputError(f"--lams must include 0 and 1 and one λ between, got {lams}")
    return lams


def _problems(args) -> dict:
    from dami_jax.eval.run import load_problems

    return {b.strip(): load_problems(b.strip(), args.limit) for b in args.bench.split(",")}


def _open(args):
    from dami_jax.eval.pairs import load_pair_config, open_pair

    pair_cfg = load_pair_config(args.pair, args.set)
    return pair_cfg, lambda: open_pair(pair_cfg)


def _sweeps(args) -> tuple[str, dict[str, list[dict]]]:
    """(where the records are, {bench: static records}): the given run, or a fresh sweep in OUT/sweep."""
    from dami_jax.analysis.sweep import load_sweep, run_sweep

    if args.run:
        return args.run, load_sweep(args.run)
    lams = _grid(args.lams)
    benches = _problems(args)
    pair_cfg, load = _open(args)
    out_dir = os.path.join(args.out, "sweep")
    return out_dir, run_sweep(load(), pair_cfg, benches, lams, out_dir, seed=args.seed, progress=_progress(args))


def _write(args, name: str, report: dict, started: float) -> None:
    from dami_jax.files import write_json

    report["seconds"] = round(time.perf_counter() - started, 1)
    path = write_json(os.path.join(args.out, f"{name}.json"), report)
    print(f"wrote {path} [{report['seconds']:.0f} s]")


def frontier(args) -> None:
    from dami_jax.analysis.frontier import frontier_report, query_continuity, sweep_curve
    from dami_jax.analysis.plots import frontier_plot

    t0 = time.perf_counter()
    source, sweeps = _sweeps(args)
    report = {"source": source, "benchmarks": {}}
    for bench, records in sweeps.items():
        rep = frontier_report(sweep_curve(records), args.tol)
        rep["continuity"] = query_continuity(records)
        frontier_plot(rep, rep["continuity"], os.path.join(args.out, f"frontier_{bench}.png"), title=bench)
        report["benchmarks"][bench] = rep
        _print_frontier(bench, rep)
    _write(args, "frontier", report, t0)


def _print_frontier(bench: str, rep: dict) -> None:
    mono, cont = rep["monotone"], rep["continuity"]
    print(f"\n{bench}: {'lam':>5} {'accuracy':>9} {'tokens':>8} {'think':>6} {'hull_gap':>9} {'chord_gap':>10}")
    for p in rep["points"]:
        chord = "-" if p["chord_gap"] is None else f"{p['chord_gap']:+.3f}"
        print(f"{'':{len(bench) + 1}} {p['lam']:>5g} {p['accuracy']:>9.3f} {p['mean_tokens']:>8.1f} "
              f"{p['think_share']:>6.2f} {p['hull_gap']:>9.3f} {chord:>10}")
    print(f"monotone (tol {rep['tol']}): accuracy {mono['accuracy']['monotone']} (worst drop "
          f"{mono['accuracy']['worst_drop']:.3f} at λ={mono['accuracy']['at']:g}), tokens {mono['tokens']['monotone']}, "
          f"think share {mono['think_share']['monotone']}; convex {rep['convex']} (max hull gap "
          f"{rep['max_hull_gap']:.3f}); middle λ above/below chord {rep['middle_above_chord']}/"
          f"{rep['middle_below_chord']}; stages (thinking share reached at λ) "
          f"{ {k: None if v is None else round(v, 3) for k, v in rep['stages'].items()} }")
    print(f"per query: correctness monotone {cont['correct_monotone']:.3f} (non-decreasing "
          f"{cont['correct_nondecreasing']:.3f}), length monotone {cont['length_monotone']:.3f} (non-decreasing "
          f"{cont['length_nondecreasing']:.3f}); queries changing correctness 0 / 1 / >1 times: "
          f"{' / '.join(f'{v:.3f}' for v in cont['changes'].values())}")


def think_ratio(args) -> None:
    from dami_jax.analysis.plots import think_ratio_plot
    from dami_jax.analysis.think_ratio import think_ratio_report

    t0 = time.perf_counter()
    source, sweeps = _sweeps(args)
    report = {"source": source, **think_ratio_report(sweeps)}
    for bench, cells in report["benchmarks"].items():
        groups = {"all": cells, **report["difficulty"].get(bench, {})}
        think_ratio_plot(groups, os.path.join(args.out, f"think_ratio_{bench}.png"), title=bench)
        print(f"\n{bench}: thinking share (mean tokens) by λ")
        print(f"{'group':<8}" + "".join(f"{lam:>13}" for lam in cells))
        for name, by_lam in groups.items():
            print(f"{name:<8}" + "".join(f"{c['think_share']:>6.2f} ({c['mean_tokens']:>4.0f})" for c in by_lam.values()))
    _write(args, "think_ratio", report, t0)


def cka(args) -> None:
    import jax.numpy as jnp

    from dami_jax.analysis.cka import cka_along_lam
    from dami_jax.analysis.plots import cka_heatmaps
    from dami_jax.analysis.states import POOLINGS, layer_states
    from dami_jax.eval.run import eval_prompts

    t0 = time.perf_counter()
    lams = _grid(args.lams)
    if args.pooling not in POOLINGS:
        raise InputError(f"--pooling must be one of {POOLINGS}, got {args.pooling!r}")
    problems = [p for ps in _problems(args).values() for p in ps]
    pair_cfg, load = _open(args)
    pair = load()
    feats = layer_states(pair, eval_prompts(pair, pair_cfg, problems), lams, pooling=args.pooling,
                         batch=args.batch, progress=_progress(args))
    labels = [f"{lam:g}" for lam in lams]
    report = {"lams": lams, "layers": feats.shape[1], "pooling": args.pooling, "n": feats.shape[2],
              "bench": args.bench, "limit": args.limit}
    for form, debiased in (("biased", False), ("debiased", True)):
        maps = {k: np.asarray(v) for k, v in cka_along_lam(jnp.asarray(feats), debiased=debiased).items()}
        report[form] = {k: v.T.tolist() for k, v in maps.items()}  # [layer][λ]
        report[form]["summary"] = _cka_summary(lams, maps)
        cka_heatmaps({f"CKA vs Θ(0) ({form})": (labels, maps["vs_instruct"]),
                      f"CKA vs Θ(1) ({form})": (labels, maps["vs_thinking"]),
                      f"CKA λ_k vs λ_k+1 ({form})": ([f"{a:g}-{b:g}" for a, b in zip(lams, lams[1:])], maps["vs_next"])},
                     os.path.join(args.out, f"cka_{form}.png"))
        s = report[form]["summary"]
        print(f"CKA ({form}, {args.pooling} pooling, n={feats.shape[2]}): neighbours min {s['next_min']:.4f} "
              f"(layer {s['next_min_layer']}, λ {s['next_min_between']}); Θ(0.5) vs Θ(0) by layer "
              f"{[round(x, 3) for x in s['mid_vs_instruct']]}, vs Θ(1) {[round(x, 3) for x in s['mid_vs_thinking']]}")
    _write(args, "cka", report, t0)


def _cka_summary(lams: list[float], maps: dict[str, np.ndarray]) -> dict:
    """The smallest CKA between neighbouring λ (where the path changes fastest) and the middle
    λ's CKA against each endpoint, per layer."""
    nxt = maps["vs_next"]
    k, layer = np.unravel_index(np.nanargmin(nxt), nxt.shape)
    mid = int(np.argmin(np.abs(np.asarray(lams) - 0.5)))
    return {"next_min": float(nxt[k, layer]), "next_min_layer": int(layer),
            "next_min_between": [lams[k], lams[k + 1]], "next_mean": float(np.nanmean(nxt)), "mid_lam": lams[mid],
            "mid_vs_instruct": maps["vs_instruct"][mid].tolist(), "mid_vs_thinking": maps["vs_thinking"][mid].tolist()}


def _read_texts(path: str) -> list[dict]:
    """JSONL rows {"prompt", "response"} (the response scored after the chat prompt) or {"text"}
    (every token after the first scored)."""
    rows = []
    for lineno, row in read_jsonl(path):
        ok = isinstance(row, dict) and (isinstance(row.get("text"), str) and row["text"].strip() or
                                        isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str)
                                        and row["response"].strip())
        if not ok:
            raise InputError(f"{path} line {lineno}: expected a non-empty string 'text', or strings 'prompt' and "
                             f"a non-empty 'response'")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no texts")
    return rows


def _tokenized(pair, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    from dami_jax.generate.chat import chat_prompt

    out = []
    for row in rows:
        if "response" in row:
            out.append((chat_prompt(pair.tokenizer, row["prompt"]),
                        pair.tokenizer.encode(row["response"], add_special_tokens=False)))
        else:
            ids = pair.tokenizer.encode(row["text"], add_special_tokens=False)
            out.append((ids[:1], ids[1:]))
    return out


def _generated(pair, pair_cfg, problems, max_new_tokens: int | None, seed: int) -> dict[str, list]:
    """The Thinking model's (λ = 1) and the Instruct model's (λ = 0) greedy answers, generated as rows
    of one engine: {name: [(prompt, answer) token lists]}."""
    from dami_jax.eval.run import eval_prompts
    from dami_jax.pair import sweep

    prompts = eval_prompts(pair, pair_cfg, problems)
    thinking, instruct = sweep(pair, prompts, [1.0, 0.0], max_new_tokens or pair_cfg.max_new_tokens, seed=seed,
                               **pair_cfg.engine_size())
    return {name: list(zip(prompts, gen.token_lists())) for name, gen in (("thinking", thinking),
                                                                          ("instruct", instruct))}


def barrier(args) -> None:
    from dami_jax.analysis.barrier import barrier_profile, mean_nll
    from dami_jax.analysis.paths import PATHS, path_label, path_schedule
    from dami_jax.analysis.plots import barrier_plot

    t0 = time.perf_counter()
    lams = _grid(args.lams)
    paths = [p.strip() for p in args.paths.split(",")]
    for p in paths:
        if p not in PATHS and not os.path.isfile(p):
            raise InputError(f"unknown path {p!r}: expected one of {sorted(PATHS)} or a schedule YAML file")
    rows = _read_texts(args.texts) if args.texts else None
    problems = None if rows else [p for ps in _problems(args).values() for p in ps]
    pair_cfg, load = _open(args)
    pair = load()
    text_sets = ({os.path.basename(args.texts): _tokenized(pair, rows)} if rows
                 else _generated(pair, pair_cfg, problems, args.max_new_tokens, args.seed))
    schedules = {path_label(p): path_schedule(p, pair.cfg.num_layers) for p in paths}
    report = {"lams": lams, "texts": {}}
    losses = {}
    for texts, items in text_sets.items():
        report["texts"][texts] = {"n": len(items), "tokens": sum(len(c) for _, c in items), "paths": {}}
        losses[texts] = {}
        for name, schedule in schedules.items():
            loss = mean_nll(pair, items, lams, schedule=schedule, batch=args.batch, lam_chunk=args.lam_chunk,
                            progress=_progress(args))
            excess = barrier_profile(lams, loss)
            top = int(np.argmax(excess))
            losses[texts][name] = loss
            report["texts"][texts]["paths"][name] = {
                "loss": loss.tolist(), "excess": excess.tolist(), "barrier": float(excess[top]),
                "barrier_lam": lams[top], "loss_0": float(loss[0]), "loss_1": float(loss[-1]),
                "loss_max": float(loss.max()), "loss_max_lam": lams[int(np.argmax(loss))]}
            print(f"texts {texts} ({len(items)}), path {name}: L(0)={loss[0]:.4f} L(1)={loss[-1]:.4f} "
                  f"max L={loss.max():.4f} at λ={lams[int(np.argmax(loss))]:g}; barrier {excess[top]:.4f} "
                  f"at λ={lams[top]:g}")
    barrier_plot(lams, losses, os.path.join(args.out, "barrier.png"))
    _write(args, "barrier", report, t0)
