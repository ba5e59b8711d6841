"""Sphinx configuration of the tornado_sse documentation site: ``make docs`` -> docs/_build/html.

The guides are the Markdown pages of this directory (MyST); the reference is autodoc of the
package's docstrings (reST, Tornado's style), the CLI is click's own help (sphinx-click).

The build runs with ``-W`` and ``nitpicky``. In docstrings, `Name` is a reference (Tornado's
convention) and resolves as Tornado's `.Name` does: in the reference's class and its bases, else its
module, else the one definition of ours the others override. A reference that does not resolve
fails the build when it may name one of ours (a ``tornado_sse.`` path, a name we define, or a name
none of the modules of THIRD_PARTY defines): a renamed function, a stale cross-reference. It is
let through for private names (not documented), type variables and other projects' names: the
build stays offline (no intersphinx), and another project moving a page does not break it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, TypeVar

from docutils import nodes
from sphinx import addnodes
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util.nodes import make_refnode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tornado_sse  # noqa: E402

project = "tornado_sse"
author = "the tornado_sse authors"
copyright = "the tornado_sse authors"
version = release = tornado_sse.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx_click",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
# the pages are also read on GitHub, where a page may open at a second-level heading
suppress_warnings = ["myst.header"]

# docstrings follow Tornado's convention: `Name` and `.Name` are references to Python objects
default_role = "py:obj"
primary_domain = "py"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
# a package's re-exports are documented once, in the module that defines them
autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
autodoc_preserve_defaults = True
# an override without a docstring of its own is not documented again with Tornado's
autodoc_inherit_docstrings = False

nitpicky = True
# the modules whose names (and their classes' members) are other projects' (see the top)
THIRD_PARTY = """
builtins typing collections.abc asyncio socket ssl logging json concurrent.futures contextlib
dataclasses enum ipaddress os pathlib signal subprocess threading urllib.parse weakref selectors
types tornado.web tornado.httpserver tornado.ioloop tornado.iostream tornado.httpclient
tornado.simple_httpclient tornado.websocket tornado.http1connection tornado.httputil
tornado.netutil tornado.tcpserver tornado.process tornado.gen tornado.concurrent tornado.locks
tornado.queues tornado.escape tornado.log tornado.routing click msgpack jwt redis redis.asyncio
prometheus_client prometheus_client.core prometheus_client.registry traitlets jupyter_events
jupyter_events.logger jupyter_server.serverapp jupyter_server.base.handlers
jupyter_server.extension.application jupyter_server.auth
""".split()

html_theme = "furo"
html_title = f"tornado_sse {release}"
html_static_path: list[str] = []

#: modules documented on a page of their own rather than in the API reference
OWN_PAGE = {"tornado_sse.errors": "errors", "tornado_sse.metrics": "metrics"}


def api_modules() -> list[str]:
    """Every public module of tornado_sse (no leading underscore), the package first."""
    import pkgutil

    found = ["tornado_sse"]
    for info in pkgutil.walk_packages(tornado_sse.__path__, "tornado_sse."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        if info.name.startswith(("tornado_sse.demo", "tornado_sse.bench")):
            continue  # the demo and the load generator are programs, not API
        if info.name not in OWN_PAGE:
            found.append(info.name)
    return sorted(found)


def _generated_content(app: Any, docname: str, source: list[str]) -> None:
    """Append an ``automodule`` section for every public module to the API reference page; give
    the benchmark's generated tables (linked from benchmarks.md, in no table of contents) a
    title."""
    titles = {
        "benchmarks/results": "Benchmark results: every table of one run",
        "benchmarks/storm": "The restart storm: the table of one run",
    }
    if docname in titles:
        source[0] = f"---\norphan: true\n---\n# {titles[docname]}\n\n" + source[0]
    if docname != "api":
        return
    sections = []
    for name in api_modules():
        # the package's own names are documented in the modules that define them
        options = "   :no-members:\n" if name == "tornado_sse" else ""
        sections.append(f"\n## `{name}`\n\n```{{eval-rst}}\n.. automodule:: {name}\n{options}```\n")
    source[0] += "".join(sections)


def _third_party_names() -> set[str]:
    """Every name the modules of THIRD_PARTY and their classes define, and the modules' own."""
    import importlib

    names: set[str] = set()
    for module_name in THIRD_PARTY:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        names.update(module_name.split("."))
        for attr in dir(module):
            names.add(attr)
            value = getattr(module, attr, None)
            if isinstance(value, type):
                names.update(dir(value))
    return names


_THIRD_PARTY_NAMES: set[str] = set()


def _owner(name: str) -> type | None:
    """The class of ours that *name* (``module.Class.member``) is a member of, if any."""
    import importlib

    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            value: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:-1]:
            value = getattr(value, part, None)
        return value if isinstance(value, type) else None
    return None


def _missing_reference(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve a Python reference to one of our objects named by a suffix (``Name``,
    ``Class.method``, as Tornado's ``.Name``) from anywhere: in the class of the reference or its
    bases, else in its module, else the one definition of ours that the others override."""
    if node.get("refdomain") != "py":
        return None
    domain = env.get_domain("py")
    module, klass = node.get("py:module"), node.get("py:class")
    matches = domain.find_obj(env, module, klass, node["reftarget"], node["reftype"], 1)
    ours = {name: obj for name, obj in matches if name.startswith("tornado_sse.")}
    if not ours:
        return None
    owners = {name: _owner(name) for name in ours}
    context = _owner(f"{module}.{klass}.x") if module and klass else None
    chosen: list[str] = []
    if context is not None:
        in_mro = [n for n, o in owners.items() if o is not None and issubclass(context, o)]
        mro = context.__mro__
        chosen = sorted(in_mro, key=lambda n: mro.index(owners[n]))[:1]  # type: ignore[arg-type]
    if not chosen:
        chosen = [n for n in ours if module and n.startswith(module + ".")]
    if len(chosen) != 1:
        chosen = [
            n
            for n, o in owners.items()
            if not any(
                o is not None and p is not None and p is not o and issubclass(o, p)
                for p in owners.values()
            )
        ]
    if len(chosen) != 1:
        return None
    obj = ours[chosen[0]]
    return make_refnode(app.builder, node["refdoc"], obj.docname, obj.node_id, contnode, chosen[0])


def _warn_missing_reference(app: Any, domain: Any, node: Any) -> bool | None:
    """Silence a reference that did not resolve unless it names (or may name) our own object:
    private names (not documented), type variables and other projects' names are silenced."""
    if domain.name != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    parts = target.split(".")
    if any(part.startswith("_") for part in parts):
        return True
    if parts[0] != "tornado_sse" and len(parts) > 1:
        import importlib.util

        if importlib.util.find_spec(parts[0]) is not None:
            return True  # another project's module: time.monotonic, tornado.process...
    if parts[0] == "tornado_sse":
        import importlib

        module, _, attr = target.rpartition(".")
        try:
            value = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            value = None
        if isinstance(value, TypeVar):
            return True
        return None
    ours = {name.rsplit(".", 1)[-1] for name in domain.objects if name.startswith("tornado_sse.")}
    if parts[0] in ours or parts[-1] in ours:
        return None
    if not _THIRD_PARTY_NAMES:
        _THIRD_PARTY_NAMES.update(_third_party_names())
    if parts[0] in _THIRD_PARTY_NAMES and parts[-1] in _THIRD_PARTY_NAMES:
        return True
    return None


_NAME = re.compile(r"(?:tornado_sse\.)?([A-Za-z_][\w.]*?)(?:\(.*\))?")


class LinkNames(SphinxPostTransform):
    """In the guides (Markdown), a name in backticks that names one of our documented objects,
    and only one (`EventStreamHandler`, `Metrics.collector()`, `tornado_sse.client.EventSource`),
    links to its reference. Plain lowercase words (`data`, `close()`) stay text: too many things
    share them."""

    default_priority = 5

    def run(self, **kwargs: Any) -> None:
        if not self.env.doc2path(self.env.docname).suffix == ".md":
            return
        domain = self.env.get_domain("py")
        ours = [name for name in domain.objects if name.startswith("tornado_sse.")]
        for literal in list(self.document.findall(nodes.literal)):
            if isinstance(literal.parent, (nodes.reference, addnodes.pending_xref)):
                continue
            text = literal.astext()
            match = _NAME.fullmatch(text)
            if match is None:
                continue
            name = match[1]
            if "." not in name and "_" not in name and name.islower():
                continue
            found = [n for n in ours if n == f"tornado_sse.{name}" or n.endswith(f".{name}")]
            if len(found) != 1:
                continue
            obj = domain.objects[found[0]]
            reference = make_refnode(
                self.app.builder,
                self.env.docname,
                obj.docname,
                obj.node_id,
                literal.deepcopy(),
                found[0],
            )
            literal.replace_self(reference)


def setup(app: Any) -> None:
    app.add_post_transform(LinkNames)
    app.connect("source-read", _generated_content)
    app.connect("missing-reference", _missing_reference)
    app.connect("warn-missing-reference", _warn_missing_reference)
