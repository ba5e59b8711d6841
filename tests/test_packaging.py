"""The wheel, as a user gets it: built from the source tree, installed in a fresh virtualenv.

An editable install (the one the other tests use) finds every file of the source tree, so it
cannot tell that a package was left out of the wheel: ``tornado_sse.bench.peers`` was, and
``tornado-sse bench`` failed from any wheel (issue 12, item 12). Here the wheel is built with
``pip wheel --no-build-isolation`` (the setuptools and wheel of the test environment; no
download), installed with its runtime dependencies (from pip's index and cache) and the small
``metrics`` and ``redis`` extras into a virtualenv that does not see this one's packages, and
then every module is imported and every command answers ``--help``. Modules that need a heavy
extra (``jupyter``, ``bench``) are listed in `NEEDS_EXTRA`; importing them must fail only for
want of that extra's packages.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # about 30 s: a build, a virtualenv, an install

ROOT = Path(__file__).resolve().parent.parent

#: source directory -> the package it installs as
PACKAGES = {"tornado_sse": "tornado_sse", "demo": "tornado_sse.demo", "bench": "tornado_sse.bench"}

#: module -> (extra, the top-level packages its import may miss without that extra)
NEEDS_EXTRA = {
    "tornado_sse.jupyter.extension": ("jupyter", {"jupyter_server", "traitlets"}),
    "tornado_sse.jupyter.handlers": ("jupyter", {"jupyter_core", "jupyter_server"}),
    "tornado_sse.bench.peers.aiohttp_peer": ("bench", {"aiohttp", "aiohttp_sse"}),
    "tornado_sse.bench.peers.starlette_peer": ("bench", {"uvicorn", "sse_starlette", "starlette"}),
}

#: runs in the fresh virtualenv: import every module of the installed package, print failures
IMPORT_ALL = """
import importlib, pkgutil, sys
import tornado_sse
names = ["tornado_sse"] + [
    m.name for m in pkgutil.walk_packages(tornado_sse.__path__, "tornado_sse.", onerror=print)
]
for name in names:
    try:
        importlib.import_module(name)
        print("ok", name)
    except ModuleNotFoundError as exc:
        print("missing", name, exc.name.partition(".")[0])
    except Exception as exc:
        print("error", name, repr(exc))
"""

#: build warnings that mean the wheel is not what setup.py says (the byte-compiling notes of a
#: PYTHONDONTWRITEBYTECODE environment are not among them)
WARNINGS = ("Warning:", "is absent from the `packages` configuration", "would be ignored")


def run(*args: str | Path, cwd: Path | None = None, timeout: float = 120) -> str:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONWARNINGS": ""},
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _copy_source(target: Path) -> Path:
    """The source tree without build products, so the build leaves the checkout alone."""
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "docs"
    )
    source = target / "src"
    shutil.copytree(ROOT, source, ignore=ignore)
    return source


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(the wheel, the fresh virtualenv's bin directory, the build's output)."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = _copy_source(tmp)
    dist = tmp / "dist"
    build = run(
        sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
        "--wheel-dir", dist, source,
    )  # fmt: skip
    (wheel,) = dist.glob("tornado_sse-*.whl")
    venv = tmp / "venv"
    # no --system-site-packages: nothing leaks in; no pip of its own (ensurepip took 4.5 s):
    # this environment's pip installs into it
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    bin_dir = venv / "bin"
    run(
        sys.executable, "-m", "pip", "--python", bin_dir / "python",
        "install", "-q", f"{wheel}[metrics,redis]", timeout=300,
    )  # fmt: skip
    return wheel, bin_dir, build


def test_the_wheel_builds_without_warnings_and_holds_every_package(
    installed: tuple[Path, Path, str],
) -> None:
    wheel, _, build = installed
    warnings = [line for line in build.splitlines() if any(w in line for w in WARNINGS)]
    assert warnings == []
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{package.replace('.', '/')}/{path.relative_to(ROOT / top).as_posix()}"
        for top, package in PACKAGES.items()
        for path in (ROOT / top).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert {"tornado_sse/bench/peers/common.py", "tornado_sse/demo/static/chat.js"} <= expected
    assert expected - names == set()
    config = "etc/jupyter/jupyter_server_config.d/tornado_sse.json"
    assert any(name.endswith(f".data/data/{config}") for name in names)


def test_every_module_imports_from_the_installed_wheel(installed: tuple[Path, Path, str]) -> None:
    _, bin_dir, _ = installed
    lines = run(bin_dir / "python", "-I", "-c", IMPORT_ALL, cwd=bin_dir).splitlines()
    results = {line.split()[1]: line.split()[0::2] for line in lines}
    assert "tornado_sse.bench.peers.common" in results
    assert "tornado_sse.broker.redis" in results
    failures = {}
    for name, (status, *detail) in results.items():
        if status == "ok":
            continue
        extra = NEEDS_EXTRA.get(name)
        if status == "missing" and extra is not None and detail[0] in extra[1]:
            continue
        failures[name] = (status, *detail)
    assert failures == {}
    # The modules the test lets off must exist, or the list has gone stale.
    assert set(NEEDS_EXTRA) <= set(results)


def test_every_command_answers_help(installed: tuple[Path, Path, str]) -> None:
    _, bin_dir, _ = installed
    from tornado_sse.cli import COMMANDS

    assert "Commands:" in run(bin_dir / "tornado-sse", "--help", cwd=bin_dir)
    for command in COMMANDS:
        output = run(bin_dir / "tornado-sse", command, "--help", cwd=bin_dir)
        assert f"Usage: tornado-sse {command}" in output, output
    # every module the documentation runs with `python -m`
    cited = sorted(
        {
            match
            for doc in (ROOT / "README.md", *(ROOT / "docs").glob("*.md"))
            for match in re.findall(r"python -m (tornado_sse[\w.]*)", doc.read_text())
        }
    )
    assert "tornado_sse.bench.redis_channels" in cited
    for module in cited:
        output = run(bin_dir / "python", "-I", "-m", module, "--help", cwd=bin_dir)
        assert "usage" in output.lower(), (module, output)
