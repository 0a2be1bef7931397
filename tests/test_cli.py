"""The `dami` command: every DESIGN 2 subcommand exists and has --help, bad input exits 2 with a
message naming the problem, train_pref.py is `dami train-pref`, and a real `dami sweep` on the
shipped toy pair."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dami_jax.cli import build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREF_TOY = os.path.join(ROOT, "configs", "pref_toy.yaml")
DESIGN_COMMANDS = {"convert", "merge", "sweep", "eval", "demo", "train-pref", "serve"}
PAIR_COMMANDS = {"eval", "sweep", "calibrate", "generate", "serve"}


def _commands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)


def _exit_code(argv) -> int:
    """main's return value, or the code argparse (or serve.py's parser) exits with."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_every_design_command_is_there():
    assert DESIGN_COMMANDS <= set(_commands()), DESIGN_COMMANDS - set(_commands())


@pytest.mark.parametrize("command", _commands())
def test_help(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    assert _exit_code([command, "--help"]) == 0
    out = capsys.readouterr().out
    # serve hands --help to serve.py's own parser: its options show that the arguments got there
    expected = {"serve": "usage: serve.py", "sweep": "--lams", "train-pref": "--config CONFIG",
                "eval": "--policies"}.get(command, f"usage: dami {command}")
    assert expected in out, out
    if command == "serve":
        assert "--api-key" in out
    if command in PAIR_COMMANDS:  # one pair config for every command that loads a pair
        assert "--pair PAIR" in out and "--set KEY=VALUE" in out, out


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--lams", "0,abc"], "argument --lams: 'abc' is not a number"),
    (["sweep", "--lams", "0,1.5"], "argument --lams: λ=1.5 is outside [0, 1]"),
    (["sweep", "--lams", "nan"], "argument --lams: λ=nan is outside [0, 1]"),
    (["sweep", "--lams", "0.5,0.50"], "argument --lams: duplicate λ"),
    (["sweep", "--limit", "0"], "argument --limit: expected a whole number >= 1, got '0'"),
    (["sweep", "--pair", "no/such/pair.yaml"], "dami sweep: error: [Errno 2] No such file or directory: "
                                               "'no/such/pair.yaml'"),
    (["train-pref"], "the following arguments are required: --config"),
    (["train-pref", "--config", PREF_TOY, "eps=0.1"], "dami train-pref: error: " + PREF_TOY + ": unknown key(s) ['eps']"),
    (["train-pref", "--config", "no/such.yaml"], "No such file or directory: 'no/such.yaml'"),
    (["serve", "--port", "abc"], "argument --port: invalid int value: 'abc'"),
    (["serve", "bogus=1"], "unknown key(s) ['bogus']"),
    (["serve", "instruct=a"], "The model pair is a pair config now: --pair"),
    (["calibrate", "conf", "--out", "unused.json", "--set", "conf.bogus=1"], "unknown key(s) ['bogus']"),
    (["generate", "--prompt", "q", "--temperature", "-1"], "argument --temperature: -1 is outside [0, inf]"),
    (["generate", "--prompt", "q", "--top-p", "0"], "argument --top-p: 0 is outside (0, 1]"),
    (["generate", "--set", "instruct=no/such/dir", "--policy", "static:0", "--prompt", "q"],
     "dami generate: error: no/such/dir: not a model directory or a hub id"),
    (["eval", "--bench", "nosuch", "--policies", "static:0"], "dami eval: error: unknown benchmark 'nosuch'"),
])
def test_bad_input_exits_2_naming_the_problem(argv, message, capsys):
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_train_pref_py_is_dami_train_pref(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.syspath_prepend(ROOT)
    import train_pref

    with pytest.raises(SystemExit) as e:
        train_pref.main(["--help"])
    assert e.value.code == 0
    script_help = capsys.readouterr().out
    assert _exit_code(["train-pref", "--help"]) == 0
    assert script_help == capsys.readouterr().out and "--work WORK" in script_help
    # as a script: bad input is exit code 2 and a message, not a traceback
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_pref.py"), "--config", PREF_TOY, "steps=0"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr
    assert "steps" in proc.stderr and "must be > 0" in proc.stderr and "Traceback" not in proc.stderr


def test_sweep_on_the_shipped_toy_pair(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--pair", "toy", "--lams", "0,0.5,1", "--limit", "6", "--out", str(out)]) == 0
    assert "static:0.5" in capsys.readouterr().out  # the printed table
    rows = {r["policy"]: r for r in json.loads((out / "results.json").read_text())}
    assert list(rows) == ["static:0", "static:0.5", "static:1"]
    lam0, lam1 = rows["static:0"], rows["static:1"]
    assert all(r["n_items"] == 6 and r["bench"] == "toy" for r in rows.values())
    assert [r["lam_mean"] for r in rows.values()] == [0.0, 0.5, 1.0]
    # Instruct answers at once, Thinking thinks first (toy: <= 4 vs ~65 tokens) and is right on every problem
    assert lam0["mean_tokens"] <= 4 < 40 < lam1["mean_tokens"]
    assert lam0["think_share"] == 0.0 and lam1["think_share"] == 1.0
    assert lam1["accuracy"] == 1.0 >= rows["static:0.5"]["accuracy"] >= lam0["accuracy"]
    assert lam1["token_ratio"] == 1.0 and lam0["token_ratio"] < 0.1
    assert len((out / "records_toy.jsonl").read_text().splitlines()) == 18
    assert (out / "pareto_toy.png").stat().st_size > 0
    # A rerun on the same directory reuses the records (eval's resume): nothing is generated again.
    assert main(["sweep", "--pair", "toy", "--lams", "0,1", "--limit", "6", "--out", str(out)]) == 0
    assert len((out / "records_toy.jsonl").read_text().splitlines()) == 18
    again = {r["policy"]: r for r in json.loads((out / "results.json").read_text())}
    assert list(again) == ["static:0", "static:1"] and again["static:1"]["accuracy"] == 1.0


def test_calibrate_with_conf_overrides(tmp_path, capsys):
    """`dami calibrate conf --set conf.*`: the pair config's Conf settings shape μ, τ and are saved
    with the calibration; both signals' statistics are printed (D measured although w_D = 0)."""
    from dami_jax.policies.calibrate import Calibration

    out = tmp_path / "cal.json"
    assert main(["calibrate", "conf", "--pair", "toy", "--seed", "3", "--out", str(out),
                 "--set", "conf.rho=0.6", "--set", "conf.tau_per_iqr=0.2"]) == 0
    printed = capsys.readouterr().out
    assert "w_entropy=1, w_js=0, rho=0.6, tau_per_iqr=0.2" in printed
    rows = {line.split("  ")[0].strip(): line.split()[-9:] for line in printed.splitlines()
            if line.startswith(("entropy A", "JS D", "max-prob M"))}
    assert set(rows) == {"entropy A", "JS D", "max-prob M"}
    for name, cells in rows.items():
        mean, std = float(cells[0]), float(cells[1])
        assert 0 < mean < 1 and std > 0, (name, cells)
    assert float(rows["entropy A"][5]) == pytest.approx(1.0)  # s is A alone on the toy pair
    cal = Calibration.load(out)
    s = np.asarray(cal.scores)
    assert len(s) == 300 and cal.conf.rho == 0.6 and cal.conf.tau_per_iqr == 0.2 and cal.conf.w_js == 0.0
    q25, q40, q75 = np.quantile(s, [0.25, 0.4, 0.75])  # μ at the 1 - ρ quantile
    assert cal.mu == pytest.approx(q40, abs=1e-9) and cal.tau == pytest.approx(0.2 * (q75 - q25), abs=1e-9)


def test_calibrate_with_labels_prints_each_signals_auroc(tmp_path, capsys):
    """Prompts carrying instruct_wrong labels: the summary adds each signal's AUROC on them."""
    from dami_jax.eval.pairs import open_pair, toy_pair_config
    from dami_jax.generate.chat import chat_prompt
    from dami_jax.policies.calibrate import auroc
    from dami_jax.policies.conf import score_prompts
    from dami_jax.toyworld import language as L

    problems = L.sample_problems(12, seed=5)
    wrong = [int(p.k >= 3) for p in problems]  # a stand-in label with both classes
    prompts = tmp_path / "calib.jsonl"
    prompts.write_text("".join(json.dumps({"question": p.text, "instruct_wrong": w}) + "\n"
                               for p, w in zip(problems, wrong)))
    assert main(["calibrate", "conf", "--prompts", str(prompts), "--out", str(tmp_path / "cal.json")]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[1].split()[-1] == "auroc_wrong"
    got = {line.split("  ")[0].strip(): float(line.split()[-1]) for line in printed.splitlines()
           if line.startswith(("entropy A", "JS D", "max-prob M"))}
    toy = toy_pair_config()
    pair = open_pair(toy)
    out = score_prompts(pair, [chat_prompt(pair.tokenizer, p.text) for p in problems], toy.conf, with_js=True)
    for name, key in (("entropy A", "entropy"), ("JS D", "js"), ("max-prob M", "maxprob")):
        assert got[name] == pytest.approx(auroc(out[key], np.array(wrong, bool)), abs=1e-4), name


def _subparser(command: str):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[command]


def test_bad_input_errors_share_one_base():
    import dami_jax as dj

    for error in (dj.ConfigError, dj.CheckpointError, dj.PairMismatchError):
        assert issubclass(error, dj.InputError)
    assert issubclass(dj.InputError, ValueError)  # callers catching ValueError still do


def test_an_internal_error_is_not_reported_as_bad_input(monkeypatch, capsys):
    """Only InputError (ConfigError, CheckpointError, ...) and a missing path are bad input."""
    from dami_jax import cli

    def bug(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(cli, "_demo", bug)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        main(["demo"])
    assert "error" not in capsys.readouterr().err


def test_debug_shows_the_traceback_of_bad_input(capsys):
    argv = ["sweep", "--pair", "no/such/pair.yaml"]
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "FileNotFoundError" in err
    assert err.rstrip().endswith("dami sweep: error: [Errno 2] No such file or directory: 'no/such/pair.yaml'")
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_defaults_follow_the_library():
    import inspect

    from dami_jax.checkpoint.merge import OUT_DTYPES
    from dami_jax.pair import generate_pair

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    gen = _subparser("generate").parse_args(["--prompt", "q"])
    assert gen.mode == default(generate_pair, "mode") == "delta"
    assert gen.pair == "toy" and gen.policy == "conf" and gen.max_new_tokens is None  # None: the pair's
    merge = next(a for a in _subparser("merge")._actions if a.dest == "dtype")
    assert sorted(merge.choices) == sorted(OUT_DTYPES) and merge.default is None  # None: the inputs' dtype


# ---------------------------------------------------------------------------
# Every command that loads a pair checks its input first: a typo costs a second, not a model load.

@pytest.fixture
def no_pair_load(monkeypatch):
    """Make loading a pair fail the test: what is checked must be checked before."""
    from dami_jax.eval import pairs
    from dami_jax.serve import app

    def refuse(pair_cfg):
        raise AssertionError("the pair was loaded before the input was checked")

    monkeypatch.setattr(pairs, "open_pair", refuse)
    monkeypatch.setattr(app, "open_pair", refuse)


def _files(tmp_path) -> dict:
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"problem": "1+1", "solution": "2"}\n')
    pair_typo = tmp_path / "pair.yaml"
    pair_typo.write_text("instruct: a\nthinking: b\ndtpye: float32\n")
    no_question = tmp_path / "calib.jsonl"
    no_question.write_text('{"question": "1+1"}\n{"prompt": "2+2"}\n')
    part_labels = tmp_path / "labels.jsonl"
    part_labels.write_text('{"question": "1+1", "instruct_wrong": 1}\n{"question": "2+2"}\n')
    return dict(bad_rows=str(bad_rows), pair_typo=str(pair_typo), no_question=str(no_question),
                part_labels=str(part_labels))


PRE_LOAD = [
    (["eval", "--bench", "toy,nosuch"], "unknown benchmark 'nosuch'"),
    (["eval", "--bench", "no/such.jsonl"], "benchmark file not found: no/such.jsonl"),
    (["eval", "--bench", "{bad_rows}"], "row 0: missing field(s) ['question', 'answer', 'id']"),
    (["eval", "--policies", "static:0,bogus"], "unknown policy 'bogus'; known policies: budget, conf, deer, pref"),
    (["eval", "--policies", "static:0,static:0"], "policy spec(s) ['static:0'] given twice"),
    (["eval", "--policies", "routing:0.5:1:2"], "no Conf calibration at 1:2"),
    (["eval", "--policies", "budget:x"], "policy spec 'budget:x'"),
    (["eval", "--policies", "conf", "--set", "conf_calibration=/no/cal.json"],
     "policy 'conf': the pair config's conf_calibration '/no/cal.json' does not exist; make it with "
     "`dami calibrate conf"),
    (["eval", "--policies", "pref", "--set", "pref_model=/no/rm"],
     "the pair config's pref_model '/no/rm' does not exist"),
    (["eval", "--pair", "{pair_typo}"], "unknown key(s) ['dtpye']"),
    (["eval", "--set", "thinking_budget=0"], "thinking_budget must be >= 1"),
    (["sweep", "--bench", "nosuch"], "unknown benchmark 'nosuch'"),
    (["calibrate", "conf", "--out", "x.json", "--prompts", "no/such.jsonl"], "No such file or directory"),
    (["calibrate", "conf", "--out", "x.json", "--prompts", "{no_question}"],
     "line 2: expected a non-empty string field 'question', got fields ['prompt']"),
    (["calibrate", "conf", "--out", "x.json", "--prompts", "{part_labels}"],
     "1 of 2 prompts carry instruct_wrong; label all or none"),
    (["calibrate", "conf", "--pair", "{pair_typo}"], "unknown key(s) ['dtpye']"),
    (["calibrate", "conf", "--set", "conf_calibration=null"], "give --out PATH"),
    (["generate", "--policy", "static:2", "--prompt", "q"], "static policy: lam=2.0 is outside [0, 1]"),
    (["generate", "--policy", "conf", "--set", "conf_calibration=/no/cal.json", "--prompt", "q"],
     "conf_calibration '/no/cal.json' does not exist"),
    (["serve", "--set", "conf_calibration=/no/cal.json"], "conf_calibration '/no/cal.json' does not exist"),
    (["serve", "policies.dami-x=static:2"], "model 'dami-x' (policy 'static:2') cannot be served"),
]


@pytest.mark.parametrize("argv, message", PRE_LOAD, ids=[" ".join(a) for a, _ in PRE_LOAD])
def test_input_is_checked_before_the_pair_loads(argv, message, no_pair_load, tmp_path, capsys):
    files = _files(tmp_path)
    argv = [a.format(**files) for a in argv]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert message.format(**files) in err, err
    assert "Traceback" not in err and "AssertionError" not in err


def test_generate_answers_with_a_policy_and_prints_its_lambda(capsys):
    """`dami generate --pair toy --policy conf`: each answer carries the λ Conf chose for its prompt;
    the pair config's mesh (8 simulated devices) changes neither the λ nor the answers."""
    from dami_jax.eval.pairs import expand_policy, open_pair, toy_pair_config
    from dami_jax.generate.chat import chat_prompt
    from dami_jax.policies import build_policy
    from dami_jax.toyworld import language as L

    problems = L.sample_problems(4, seed=11)
    questions = [p.text for p in problems]
    argv = ["generate", "--pair", "toy", "--policy", "conf"] + [a for q in questions for a in ("--prompt", q)]
    runs = []
    for mesh in ([], ["--set", "mesh=[2,2,2]"]):
        assert main(argv + mesh) == 0
        runs.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    rows, sharded = runs
    toy = toy_pair_config()
    pair = open_pair(toy)
    policy = build_policy(expand_policy("conf", toy), pair)
    lam = policy([chat_prompt(pair.tokenizer, q) for q in questions], pair).lam
    assert [r["prompt"] for r in rows] == questions
    assert all(r["policy"] == policy.spec == f"conf:{toy.conf_calibration}" for r in rows)
    assert [r["lam"] for r in rows] == pytest.approx(lam.tolist(), abs=1e-4)
    assert all(r["finish_reason"] == "stop" for r in rows)
    # the toy answer is \boxed{digit}, the stop token left out
    assert [L.parse_answer(r["answer"]) is not None and r["answer"].endswith("}") for r in rows] == [True] * 4
    assert [(r["lam"], r["answer"], r["thinking"]) for r in sharded] == [(r["lam"], r["answer"], r["thinking"])
                                                                          for r in rows]
