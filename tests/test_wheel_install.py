"""The package as a user gets it: a wheel installed in a fresh venv, used from an empty folder.

The library must not depend on the repository around it (configs/ or anything else): the
wheel is built from a copy of the package sources, installed without its dependencies into
a new venv, and the venv borrows this interpreter's installed dependencies through a .pth
line (a .pth line adds the directory without running that directory's own .pth files, so an
editable install of dami_jax there stays inactive: the venv imports the wheel's copy).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

pytestmark = pytest.mark.slow


def _run(cmd, cwd, env, timeout=600):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(bin dir, env, empty work folder) of a fresh venv holding the built wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # build from a copy: the build leaves nothing in the repository
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "dami_jax"), src / "dami_jax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(JAX_PLATFORMS="cpu", DAMI_JAX_CACHE=str(tmp / "xla"), PYTHONDONTWRITEBYTECODE="1")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
          str(src)], cwd=tmp, env=env)
    wheels = list((tmp / "dist").glob("dami_jax-*.whl"))
    assert len(wheels) == 1, wheels
    _run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], cwd=tmp, env=env)
    bin_dir = tmp / "venv" / "bin"
    _run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "-q", "--no-deps",
          str(wheels[0])], cwd=tmp, env=env)
    site = _run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=tmp, env=env).strip()
    with open(os.path.join(site, "outer_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp / "work"
    work.mkdir()
    return bin_dir, env, work


def test_the_venv_imports_the_wheel_not_the_repository(venv):
    bin_dir, env, work = venv
    where = _run([str(bin_dir / "python"), "-c", "import dami_jax, os; print(os.path.realpath(dami_jax.__file__))"],
                 cwd=work, env=env).strip()
    assert where.startswith(os.path.realpath(bin_dir.parent)), where
    assert not where.startswith(os.path.realpath(ROOT) + os.sep), where


def test_demo_and_eval_from_an_empty_folder(venv):
    bin_dir, env, work = venv
    # 3 per k: the refined λ grid's 72 rows then fill the engine's 64-row shape like the main grid's,
    # so both grids run one set of compiled programs (2 per k compiled a second set for 48 rows)
    out = _run([str(bin_dir / "dami"), "demo", "--per-k", "3"], cwd=work, env=env)
    assert "held-out problems" in out, out
    _run([str(bin_dir / "dami"), "eval", "--pair", "toy", "--bench", "toy", "--limit", "12", "--out",
          str(work / "eval")], cwd=work, env=env)
    with open(work / "eval" / "results.json") as f:
        rows = {r["policy"]: r for r in json.load(f)}
    assert {"static:0", "static:1", "conf", "routing"} <= set(rows), sorted(rows)
    # plain `conf` found the shipped calibration: λ varies per query and beats the Instruct model
    assert 0.0 < rows["conf"]["lam_mean"] < 1.0 and rows["conf"]["accuracy"] > rows["static:0"]["accuracy"]


def test_server_starts_and_lists_conf(venv):
    bin_dir, env, work = venv
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(bin_dir / "dami"), "serve", "--port", str(port), "warmup=false", "max_rows=2"],
                            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, models = time.time() + 300, None
        while models is None:
            assert proc.poll() is None, f"the server exited:\n{proc.stdout.read()[-3000:]}"
            assert time.time() < deadline, "the server did not answer within 300 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    models = {m["id"]: m["policy"] for m in json.load(r)["data"]}
            except OSError:
                time.sleep(0.5)
        assert {"dami-conf", "dami-routing", "dami-static-0.8"} <= set(models), models
        assert models["dami-conf"].endswith("conf_calibration.json")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
