"""Import boundaries, checked in fresh interpreters (as Tornado's own ``import_test.py`` does).

* ``tornado_sse.protocol`` is sans-I/O: importing it loads the standard library and nothing else,
  in particular not Tornado.
* ``import tornado_sse`` loads only the runtime dependencies: no optional extra (Redis, Jupyter,
  Prometheus, the test and bench tools).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

OPTIONAL = [
    "redis",
    "jwt",
    "cryptography",
    "jupyter_server",
    "jupyter_events",
    "jupyter_core",
    "traitlets",
    "prometheus_client",
    "httpx",
    "httpx_sse",
    "playwright",
    "psutil",
    "matplotlib",
    "uvicorn",
    "aiohttp",
    "sse_starlette",
    "uvloop",
]


def new_top_level_modules(statement: str) -> set[str]:
    """Top-level modules that running *statement* in a fresh interpreter adds to sys.modules."""
    script = "\n".join(
        [
            "import json, sys",
            'before = {name.partition(".")[0] for name in sys.modules}',
            statement,
            'after = {name.partition(".")[0] for name in sys.modules}',
            "print(json.dumps(sorted(after - before)))",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_helper_sees_imports() -> None:
    """The probe itself can fail: it does report a third-party import."""
    assert "tornado" in new_top_level_modules("import tornado.web")


def test_protocol_does_not_import_tornado() -> None:
    assert "tornado" not in new_top_level_modules("import tornado_sse.protocol")


#: ours, plus multiprocessing's alias of ``__main__`` (made when anything imports it)
NOT_FOREIGN = {"tornado_sse", "__mp_main__"}


def test_protocol_imports_only_the_standard_library() -> None:
    loaded = new_top_level_modules("import tornado_sse.protocol")
    foreign = loaded - set(sys.stdlib_module_names) - NOT_FOREIGN
    assert not foreign, f"tornado_sse.protocol pulled in non-stdlib modules: {sorted(foreign)}"


def test_errors_import_only_the_standard_library() -> None:
    loaded = new_top_level_modules("import tornado_sse.errors")
    assert not loaded - set(sys.stdlib_module_names) - NOT_FOREIGN


def test_package_imports_no_optional_dependency() -> None:
    loaded = new_top_level_modules("import tornado_sse")
    assert "tornado_sse" in loaded
    assert not loaded & set(OPTIONAL), f"import tornado_sse loaded {sorted(loaded & set(OPTIONAL))}"


def test_public_names_import_no_optional_dependency() -> None:
    """Touching every public name (some may load lazily) still loads no optional extra."""
    loaded = new_top_level_modules(
        "import tornado_sse\nfor n in tornado_sse.__all__: getattr(tornado_sse, n)"
    )
    assert "tornado" in loaded
    assert not loaded & set(OPTIONAL), f"public names loaded {sorted(loaded & set(OPTIONAL))}"


def test_every_public_name_resolves() -> None:
    import tornado_sse

    missing = [name for name in tornado_sse.__all__ if not hasattr(tornado_sse, name)]
    assert not missing
    assert set(tornado_sse.__all__) <= set(dir(tornado_sse))
