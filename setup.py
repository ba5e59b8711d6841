"""tornado_sse: Server-Sent Events for Tornado."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "tornado_sse" / "__init__.py").read_text())[1]

EXTRAS = {
    "metrics": ["prometheus_client>=0.17"],
    "redis": ["redis>=5"],
    "jupyter": ["jupyter_server>=2.13", "jupyter_events>=0.6"],
    # PEM public keys (RS*, ES*, EdDSA) need cryptography; an HMAC secret does not.
    "jwt": ["PyJWT[crypto]>=2.8"],
    # the documentation site: make docs -> docs/_build/html
    "docs": ["sphinx>=7.3", "myst-parser>=3", "furo>=2024.1", "sphinx-click>=6"],
    "bench": [
        "matplotlib>=3.7",
        "psutil>=5.9",
        "sse-starlette>=2",
        "uvicorn>=0.30",
        "aiohttp>=3.9",
        "aiohttp-sse>=2.2",
        "uvloop>=0.19; platform_system != 'Windows'",
    ],
}
EXTRAS["test"] = sorted(
    {
        *EXTRAS["metrics"],
        *EXTRAS["redis"],
        *EXTRAS["jupyter"],
        *EXTRAS["jwt"],
        *EXTRAS["docs"],
        "pytest>=8",
        "pytest-tornado>=0.8",
        "pytest-timeout>=2.2",
        "pytest-jupyter[server]>=0.9",
        "hypothesis>=6.100",
        "httpx>=0.27",
        "httpx-sse>=0.4",
        "playwright>=1.45",
        "psutil>=5.9",
        "ruff>=0.6",
        "mypy>=1.11",
        "types-redis",
        "msgpack-types",
        "setuptools<81",
    }
)

setup(
    name="tornado-sse",
    version=VERSION,
    description="Server-Sent Events for Tornado: embeddable handler, hub, bridge, Redis, Jupyter",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    # Tornado 6.6 is the first release whose HTTP client awaits a coroutine streaming_callback
    # (the client's backpressure depends on it; 6.5 never runs it) and, since 6.5.6, it drops
    # Authorization and Cookie on cross-origin redirects. It needs Python 3.11.
    python_requires=">=3.11",
    # demo/ and bench/ sit at the top of the repository and install as tornado_sse.demo and
    # tornado_sse.bench (with their subpackages, such as tornado_sse.bench.peers), so that
    # `tornado-sse demo` and `tornado-sse bench` work from any install. tests/test_packaging.py
    # builds the wheel, installs it in a fresh virtualenv and imports every module.
    packages=[
        *find_packages(include=["tornado_sse", "tornado_sse.*"]),
        *(f"tornado_sse.{name}" for name in find_packages(include=["demo", "demo.*"])),
        *(f"tornado_sse.{name}" for name in find_packages(include=["bench", "bench.*"])),
    ],
    package_dir={"tornado_sse.demo": "demo", "tornado_sse.bench": "bench"},
    # Data files are listed here, and only here: include_package_data would take in everything
    # under version control or MANIFEST.in, and warns about data directories (demo/static).
    package_data={
        "tornado_sse": ["py.typed", "static/*.js"],
        "tornado_sse.demo": ["static/*", "templates/*"],
    },
    include_package_data=False,
    data_files=[
        (
            "etc/jupyter/jupyter_server_config.d",
            ["jupyter-config/jupyter_server_config.d/tornado_sse.json"],
        )
    ],
    install_requires=["tornado>=6.6", "msgpack>=1.0", "click>=8.1"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["tornado-sse=tornado_sse.cli:main"]},
    classifiers=[
        "Framework :: Tornado",
        "Programming Language :: Python :: 3",
        "Typing :: Typed",
    ],
)
