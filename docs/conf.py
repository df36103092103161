"""Sphinx configuration for the trioconv documentation.

Build with::

    python -m sphinx -W -b html docs docs/_build/html
"""

from __future__ import annotations

import re
from typing import Any

from sphinx.application import Sphinx

import trioconv

project = "trioconv"
release = trioconv.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

# Google-style docstrings only.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_include_init_with_doc = False

autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_member_order = "bysource"
autodoc_class_signature = "mixed"

nitpicky = False
exclude_patterns = ["_build"]
templates_path: list[str] = []

html_theme = "alabaster"
html_title = f"trioconv {release}"
html_show_copyright = False
html_show_sourcelink = False
html_theme_options = {
    "description": "qemu-img convert, rebuilt on Trio with many requests in flight",
    "fixed_sidebar": True,
}


# The public classes live in private modules (``trioconv._cache.CacheMode``); show them
# under the names users import (``trioconv.CacheMode``).
_PRIVATE_PATH = re.compile(r"\btrioconv\.(?:[a-z_]+\.)+([A-Z]\w*)")


def _public_name(match: re.Match[str]) -> str:
    name = match.group(1)
    return f"trioconv.{name}" if hasattr(trioconv, name) else match.group(0)


def _public_types(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    lines[:] = [_PRIVATE_PATH.sub(_public_name, line) for line in lines]


def _attrs_factories(
    app: Sphinx,
    what: str,
    name: str,
    obj: Any,
    options: Any,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str | None, str | None] | None:
    # attrs shows a ``factory=`` default as NOTHING; dataclasses write <factory>.
    if signature is not None and "=NOTHING" in signature:
        return signature.replace("=NOTHING", "=<factory>"), return_annotation
    return None


def setup(app: Sphinx) -> None:
    # After napoleon (priority 500), which adds the attribute types.
    app.connect("autodoc-process-docstring", _public_types, priority=600)
    app.connect("autodoc-process-signature", _attrs_factories)
