"""Sphinx configuration of attnlab's documentation site (``make docs`` builds it into ``docs/_build/html``).

Why Sphinx: the docstrings are Google-style sections with Sphinx cross-references (single backticks name objects,
double backticks are literals), so autodoc + napoleon with ``default_role = "py:obj"`` render them unchanged and
link them; sphinx-argparse documents the CLI from the real parser (``attnlab.cli.build_parser``), so the flags are
written in one place; myst-parser lets the pages, ARCHITECTURE.md and MEASUREMENTS.md stay Markdown.

Why furo: a maintained theme from PyPI with a readable wide-table layout, a dark mode and a sidebar that shows the
whole page tree at once (a newcomer sees every page), with no JavaScript build or network access at build time.

Offline by design: no intersphinx (it downloads inventories); the build runs in CI with warnings as errors.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document this checkout's attnlab, not whatever an editable install points at

# Committed result figures live outside docs/; pages write ``@RESULTS@/claims/<preset>/...`` and this one line says
# where that is (relative to the source folder: a leading "/" is Sphinx's source root).
RESULTS = "/../studies/results"

project = "attnlab"
author = "the attnlab authors"
copyright = "attnlab authors, MIT licence"  # noqa: A001 (Sphinx's own name)
release = version = __import__("attnlab").__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",
    "myst_parser",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = [
    "_build",
    "_generated",
    "ARCHITECTURE.md",
    "MEASUREMENTS.md",  # included by other pages
    "Thumbs.db",
    ".DS_Store",
]

default_role = "py:obj"  # `name` in a docstring is a cross-reference, as the docstrings are written
nitpicky = False  # unresolved references render as code; broken markup still fails the build
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"  # types beside the documented arguments only
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_inherit_docstrings = False  # torch's nn.Module docstrings are not ours to render
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]  # included Markdown files (ARCHITECTURE.md) may start below heading level 1

html_theme = "furo"
html_title = f"attnlab {release}"
html_static_path: list[str] = []


# The API reference is generated at each build from the package itself (so a module that is added, split or moved is
# documented without editing a page): one page per floor, in the import order of docs/ARCHITECTURE.md. A package's
# page shows its docstring and what it defines itself, then every module below it with its members. The CLI wiring is
# documented by sphinx-argparse instead (cli.md).
FLOORS = {
    "attnlab": "The package and its shared modules (errors, io, schema, stats, plotting)",
    "attnlab.layers": "Attention layers, FMM merges, training hooks",
    "attnlab.data": "Datasets and batches",
    "attnlab.models": "Model registry and attention capture",
    "attnlab.train": "Training engine, checkpoints, cost",
    "attnlab.detection": "Detection backbones, detectors, their engine",
    "attnlab.analysis": "The analyses",
    "attnlab.experiment": "Comparisons, presets, claims",
    "attnlab.report": "The comparison report",
}
API = DOCS / "_api"  # generated, gitignored


def _skipped(name: str) -> bool:
    """Private modules, ``__main__`` and the command-line wiring (its reference is sphinx-argparse's)."""
    parts = name.split(".")
    return any(p.startswith("_") for p in parts) or parts[1:2] in (["cli"], ["cli_new"]) or parts[-1] == "cli"


def _write_api(app, config):  # noqa: ARG001 (Sphinx event signature)
    import importlib
    import pkgutil

    from sphinx.util import logging

    API.mkdir(exist_ok=True)
    top = importlib.import_module("attnlab")
    for sub in pkgutil.iter_modules(top.__path__):
        name = f"attnlab.{sub.name}"
        if sub.ispkg and name not in FLOORS and not _skipped(name):  # with -W this fails the build, as it should
            logging.getLogger(__name__).warning("package %s has no API page: add it to FLOORS in docs/conf.py", name)
    wanted = set()
    for floor, title in FLOORS.items():
        package = importlib.import_module(floor)
        if floor == "attnlab":  # the top-level modules only; each subpackage has its own page
            names = [f"attnlab.{m.name}" for m in pkgutil.iter_modules(package.__path__) if not m.ispkg]
        else:
            names = [m.name for m in pkgutil.walk_packages(package.__path__, floor + ".")]
        # autodoc writes reStructuredText, so its directives sit in eval-rst blocks (MyST would read its output as
        # Markdown)
        lines = [f"# `{floor}`", "", title + ".", ""]
        # the package's own definitions only (not what its __all__ re-exports from the modules documented below)
        lines += ["```{eval-rst}", f".. automodule:: {floor}", "   :ignore-module-all:", "```", ""]
        for name in sorted(n for n in names if not _skipped(n)):
            lines += [f"## `{name}`", "", "```{eval-rst}", f".. automodule:: {name}", "```", ""]
        page = API / f"{floor}.md"
        wanted.add(page.name)
        text = "\n".join(lines)
        if not page.exists() or page.read_text() != text:  # unchanged pages keep their mtime: no rebuild
            page.write_text(text)
    for stale in API.glob("*.md"):
        if stale.name not in wanted:
            stale.unlink()


def _metrics_table(match) -> str:
    """``@METRICS:name@`` → a Markdown table of analysis ``name``'s headline metrics and their one-line meanings, from
    the analysis module's ``METRIC_MEANINGS`` (the legend ``attnlab analyze`` prints), so the two cannot differ."""
    import importlib

    meanings = importlib.import_module(f"attnlab.analysis.{match.group(1)}").METRIC_MEANINGS
    rows = [f"| `{metric}` | {meaning} |" for metric, meaning in meanings.items()]
    return "\n".join(["| headline | meaning |", "|---|---|", *rows])


def _results_prefix(app, docname, source):  # noqa: ARG001 (Sphinx's event signature)
    import re

    source[0] = re.sub(r"@METRICS:(\w+)@", _metrics_table, source[0].replace("@RESULTS@", RESULTS))


def _results_prefix_included(app, relative_path, parent_docname, content):  # noqa: ARG001
    content[0] = content[0].replace("@RESULTS@", RESULTS)


def setup(app):
    app.connect("config-inited", _write_api)
    app.connect("source-read", _results_prefix)
    app.connect("include-read", _results_prefix_included)
